"""Peak resident memory and step time of one ONNX export on the CPU EP, in this process:

    python -m bench.bench_memory EXPORT [--threads 1] [--prompt 64] [--steps 3]

loads the export, encodes a random prompt, runs denoise steps over one canvas and prints VmHWM / VmRSS
(MiB) after loading and after the steps, the milliseconds per call, the first argmax ids (to compare
two layouts of the same model) and the largest mappings by resident size (heap, anonymous, weights.bin).
Run each export in its own process: the peak is the process's."""
from __future__ import annotations

import argparse
import time

import numpy as np


def memory() -> dict:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) // 1024
    return fields


def largest_mappings(n: int = 4) -> list:
    sizes: dict = {}
    name = None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                name = parts[5] if len(parts) > 5 else "[anon]"
            elif parts and parts[0] == "Rss:":
                sizes[name] = sizes.get(name, 0) + int(parts[1]) // 1024
    return sorted(sizes.items(), key=lambda kv: -kv[1])[:n]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args(argv)
    from dgport.manifest import read_manifest
    from dgport.runtimes.onnx import OnnxBackend

    t = time.perf_counter()
    backend = OnnxBackend(read_manifest(a.export), device="cpu", threads=a.threads)
    print(f"loaded in {time.perf_counter() - t:.1f} s: {memory()}", flush=True)
    cfg = backend.config
    rng = np.random.default_rng(0)
    P, C = a.prompt, cfg.canvas_length
    t = time.perf_counter()
    backend.encode(rng.integers(0, cfg.vocab_size, (1, P)), np.arange(P)[None])
    encode_ms = (time.perf_counter() - t) * 1000
    steps = []
    for _ in range(a.steps):
        t = time.perf_counter()
        out = backend.denoise(rng.integers(0, cfg.vocab_size, (1, C)), np.arange(P, P + C)[None], np.float32(0.8),
                              rng.random((1, C), dtype=np.float32))
        steps.append(round((time.perf_counter() - t) * 1000))
    print(f"encode {P} tokens {encode_ms:.0f} ms; denoise steps (canvas {C}) ms {steps}; {memory()}; "
          f"argmax {out.argmax[0, :6].tolist()}")
    print("largest mappings (MiB):", largest_mappings())


if __name__ == "__main__":
    main()
