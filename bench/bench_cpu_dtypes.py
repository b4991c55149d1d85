"""fp32 vs bf16 exports of one checkpoint on ONNX Runtime's CPU EP, side by side: peak memory and speed.

    python -m bench.bench_cpu_dtypes                 # bench_moe's MoE fixture at 128 experts, top-8
    python -m bench.bench_cpu_dtypes --checkpoint PATH

The CPU EP has no bf16 kernels: bf16 exports run fp32-compute graphs that read the bf16 weights
(memory-mapped, held once) and cast each to fp32 where it is used (an expert after it is gathered),
so they hold half the weight bytes of an fp32 export. Each export runs in its own subprocess; peak
memory is that process's VmHWM after a 256-token encode and a denoise step (medians of --runs).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench_moe import MOE_PRESET, time_encode
from bench.bench_onnx import _peak_rss_mb

FIXTURE = {**MOE_PRESET, "num_experts": 128, "top_k_experts": 8, "vocab_size": 32768}


def side(export_dir: str, runs: int, threads: int) -> dict:
    r = time_encode(Path(export_dir), "cpu", [256], runs, threads)
    return {"encode_256_ms": r[256]["ms"], "denoise_step_ms": r["step"]["ms"], "peak_rss_mb": _peak_rss_mb()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="HF DiffusionGemma folder (default: the MoE fixture above)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.side:
        print(json.dumps(side(a.side, a.runs, a.threads)))
        return
    from dgport.exporters.export import ExportOptions, export

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.checkpoint
        if ckpt is None:
            from models.fixtures import build_fixture

            ckpt = build_fixture("tiny", Path(tmp) / "ckpt", **FIXTURE)
        for dtype in ("fp32", "bf16"):
            out = Path(tmp) / dtype
            export(ckpt, out, ExportOptions(dtype=dtype, validate=False))
            p = subprocess.run([sys.executable, "-m", "bench.bench_cpu_dtypes", "--side", str(out), "--runs",
                                str(a.runs), "--threads", str(a.threads)], capture_output=True, text=True, check=True)
            res[dtype] = json.loads(p.stdout.strip().splitlines()[-1])
            res[dtype]["weights_mb"] = (out / "weights.bin").stat().st_size / 2**20
    print(f"checkpoint: {a.checkpoint or 'MoE fixture ' + str(FIXTURE)}, CPU EP, {a.threads} threads")
    print("| metric | fp32 export | bf16 export | bf16/fp32 |")
    print("|---|---|---|---|")
    for k in ("weights_mb", "peak_rss_mb", "encode_256_ms", "denoise_step_ms"):
        print(f"| {k} | {res['fp32'][k]:.1f} | {res['bf16'][k]:.1f} | {res['bf16'][k] / res['fp32'][k]:.2f} |")


if __name__ == "__main__":
    main()
