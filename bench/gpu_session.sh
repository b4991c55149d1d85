#!/usr/bin/env bash
# What issue #3 asks of a lent GPU machine, in two device calls of under 10 minutes each, logs under $OUT.
#
# Here, once:   bash bench/gpu_wheels.sh   (onnxruntime-gpu 1.31.1 + transformers 5.23.0, in parts
# that fit a device call beside this tree); then make the calls it prints; the last one (and, on the
# still-warm machine, the next) runs:
#   bash .dwN/install.sh && bash bench/gpu_session.sh check     # CUDA EP vs CPU EP and transformers
#   bash bench/gpu_session.sh bench                             # timings for bench/RESULTS.md
#   bash bench/gpu_session.sh batch                             # batched denoising and --max-batch
# (The image already has every other dependency: tokenizers, safetensors, jinja2, click, rich, onnx.)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/dgport-gpu}
mkdir -p "$out"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DGPORT_CACHE_DIR=/tmp/dgport-cache
export ORT_DISABLE_TELEMETRY=1  # the bare `import onnxruntime` checks below would start its telemetry (dgport/ort_env.py)
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.log" 2>&1 \
  || { cat "$out/install.log"; exit 1; }
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import onnxruntime as o, transformers as t, torch; print('onnxruntime', o.__version__, o.get_available_providers()); print('transformers', t.__version__, 'torch', torch.__version__)"
} 2>&1 | tee "$out/env.txt"
python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
  || { echo "onnxruntime-gpu is not the onnxruntime on PYTHONPATH: run .dwN/install.sh first" >&2; exit 1; }

case "${1:-check}" in
  check)
    python3 -m bench.cuda_check --json "$out/cuda_check.json" 2>&1 | tee "$out/cuda_check.log"
    ;;
  bench)
    python3 -m bench.bench_moe --device cuda --dtype bf16 --lengths 16,256,1024,4096 --runs 5 \
      --json "$out/bench_moe.json" 2>&1 | tee "$out/bench_moe.log"
    python3 -m bench.bench_moe --compare attention --device cuda --dtype bf16 --lengths 256,1024,4096 --runs 5 \
      --json "$out/bench_attention.json" 2>&1 | tee "$out/bench_attention.log"
    # grouped experts (one batched product per projection over the routed tokens) against dense, at the
    # real 128-expert top-8 ratio and canvas 256 (issue 31)
    python3 -m bench.bench_moe --compare grouped-dense --device cuda --dtype bf16 --experts 128 --top-k 8 \
      --canvas 256 --lengths 256,1024,4096 --runs 5 --json "$out/bench_grouped.json" 2>&1 | tee "$out/bench_grouped.log"
    # the CPU's unrolled experts on the GPU, against the sparse Loop (both graphs)
    python3 -m bench.bench_moe --compare unrolled --device cuda --dtype bf16 --experts 128 --top-k 8 \
      --canvas 256 --lengths 256,1024,4096 --runs 5 --json "$out/bench_unrolled.json" 2>&1 | tee "$out/bench_unrolled.log"
    python3 -m bench.bench_onnx --device cuda --dtype bf16 --preset real-slice --runs 3 2>&1 | tee "$out/bench_onnx_real_slice.log"
    python3 -m bench.bench_onnx --device cuda --dtype fp32 --preset tiny --runs 3 2>&1 | tee "$out/bench_onnx_tiny.log"
    python3 -m bench.bench_prefill --device cuda --dtype bf16 --tokens 16384 --chunks 0,4096,2048,1024,512 2>&1 \
      | tee "$out/bench_prefill.log"
    python3 -m bench.cuda_check --presets "" --sudoku-puzzles 0 --int4-speed --json "$out/int4_speed.json" 2>&1 \
      | tee "$out/int4_speed.log"
    ;;
  batch)  # batched denoising (issue 24): one step over B rows vs B single-row steps, and generate_batch
    python3 -m bench.bench_batch --backend cuda --model mid --sizes 1,2,4,8,16 --runs 5 \
      --json "$out/bench_batch_mid.json" 2>&1 | tee "$out/bench_batch_mid.log"
    python3 -m bench.bench_batch --backend cuda --model real-slice --sizes 1,2,4,8 --runs 3 \
      --json "$out/bench_batch_real_slice.json" 2>&1 | tee "$out/bench_batch_real_slice.log"
    python3 -m bench.bench_serve_batch --backend cuda --model mid --clients 1,4,8 --max-batch 1,4,8 --requests 16 \
      --json "$out/bench_serve_batch_mid.json" 2>&1 | tee "$out/bench_serve_batch_mid.log"
    ;;
  *) echo "usage: bench/gpu_session.sh check|bench|batch" >&2; exit 2 ;;
esac
