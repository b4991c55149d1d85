"""Long-prompt encode: one encode call vs the step loop's chunks (dgport.loop.ENCODE_CHUNK), side by
side on one export: time and the memory the encode adds to the loaded model.

    python -m bench.bench_prefill                               # MoE fixture, 8192-token prompt, CPU EP
    python -m bench.bench_prefill --tokens 16384 --chunks 0,2048,1024,512
    python -m bench.bench_prefill --device cuda --dtype bf16

Each setting runs in its own subprocess; memory is the rise of the process's peak RSS (VmHWM) over
its value after loading (CPU), or ORT's device arena growth read from nvidia-smi (CUDA, reported
as measured by the driver). Chunk 0 means the whole prompt in one call.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_moe import MOE_PRESET
from bench.bench_onnx import _peak_rss_mb


def gpu_used_mb() -> float:
    """Device memory in use on GPU 0, as the driver reports it (MB)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[0])


def side(export_dir: str, device: str, tokens: int, chunk: int, threads: int) -> dict:
    import dgport
    from dgport.loop import encode_chunked

    gen = dgport.load(export_dir, backend=device, threads=threads)
    backend = gen.backend
    rng = np.random.default_rng(0)
    ids = rng.integers(0, backend.config.vocab_size, size=(1, tokens))
    pos = np.arange(tokens)[None]
    encode_chunked(backend, ids[:, :16], pos[:, :16], 16)  # warm-up: sessions initialized
    backend.reset()
    base = gpu_used_mb() if device == "cuda" else _peak_rss_mb()
    t = time.perf_counter()
    encode_chunked(backend, ids, pos, chunk or tokens)
    backend.cache_numpy(0)  # waits for the device
    seconds = time.perf_counter() - t
    peak = gpu_used_mb() if device == "cuda" else _peak_rss_mb()
    return {"chunk": chunk or tokens, "seconds": seconds, "added_mb": peak - base}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="HF DiffusionGemma folder (default: bench_moe's MoE fixture)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunks", default="0,1024,256", help="tokens per encode call; 0 = one call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.side:
        print(json.dumps(side(a.side, a.device, a.tokens, a.chunk, a.threads)))
        return
    from dgport.exporters.export import ExportOptions, export

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.checkpoint
        if ckpt is None:
            from models.fixtures import build_fixture

            ckpt = build_fixture("tiny", Path(tmp) / "ckpt", **{**MOE_PRESET, "sliding_window": 1024})
        exp = Path(tmp) / "export"
        export(ckpt, exp, ExportOptions(dtype=a.dtype, validate=False))
        rows = []
        for chunk in (int(c) for c in a.chunks.split(",")):
            p = subprocess.run([sys.executable, "-m", "bench.bench_prefill", "--side", str(exp), "--chunk", str(chunk),
                                "--device", a.device, "--tokens", str(a.tokens), "--threads", str(a.threads)],
                               capture_output=True, text=True)
            if p.returncode:
                rows.append({"chunk": chunk or a.tokens, "error": (p.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"device {a.device}, dtype {a.dtype}, {a.tokens}-token prompt, "
          f"checkpoint {a.checkpoint or 'MoE fixture (sliding window 1024)'}")
    print("| tokens per encode call | seconds | memory added (MB) |")
    print("|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['chunk']} | failed: {r['error']} | |")
        else:
            print(f"| {r['chunk']} | {r['seconds']:.2f} | {r['added_mb']:.0f} |")


if __name__ == "__main__":
    main()
