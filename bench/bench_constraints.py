"""Vocabulary constraints: the denoise step's time with and without token masks (ONNX Runtime CPU, MLX).

    python -m bench.bench_constraints

A head-heavy fixture (vocab 32768, hidden 256, 2 layers, canvas 64: the lm_head and sampler are most of
the step, so the masks' share is at its largest; the real model's layers dwarf its head far more) is
exported twice: with the graphs as they were before vocabulary constraints (no token_masks /
token_classes inputs, built by leaving them out) and as dgport exports them now. Measured, alternating
rounds, median ms per denoise step of one canvas:

- before: the graph without the constraint inputs;
- default: today's graph fed only the old inputs (the If that applies masks is not taken);
- constrained: a 6-row mask table, every position in a constrained class (the worst case);
- MLX: the plain compiled step and the masked one.

Prints the CPU's flags and the figures as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_batch import cpu_flags

MODEL = dict(vocab_size=32768, hidden_size=256, intermediate_size=512, layer_types=("sliding_attention", "full_attention"),
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=64, num_experts=4,
             top_k_experts=2, moe_intermediate_size=128, sliding_window=128, canvas_length=64)
K = 6


def export_pair(tmp: Path) -> tuple[Path, Path]:
    from unittest import mock

    from dgport.exporters import onnx_steps
    from dgport.exporters.export import ExportOptions, export
    from models.fixtures import build_fixture

    ckpt = build_fixture("tiny", tmp / "ckpt", **MODEL)
    now, before = tmp / "now", tmp / "before"
    export(ckpt, now, ExportOptions(formats=("onnx", "mlx"), validate=False))
    with mock.patch.object(onnx_steps, "constraint_inputs", lambda *a: None):  # the graphs before #30
        export(ckpt, before, ExportOptions(formats=("onnx",), validate=False))
    return now, before


def stepper(backend, masks=None, classes=None):
    cfg = backend.config
    C, V = cfg.canvas_length, cfg.vocab_size
    rng = np.random.default_rng(0)
    backend.reset()
    backend.encode(rng.integers(0, V, (1, 32)), np.arange(32)[None])
    backend.set_token_masks(masks) if masks is not None else None
    canvas, pos = rng.integers(0, V, (1, C)), np.arange(32, 32 + C)[None]
    u = rng.random((1, C), dtype=np.float32)
    kw = {} if classes is None else {"classes": classes}

    def step():
        backend.new_canvas()
        return backend.denoise(canvas, pos, np.float32(0.8), u, **kw)

    return step


def timed(step, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n * 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from dgport.manifest import open_export
    from dgport.runtimes.onnx import OnnxBackend

    with tempfile.TemporaryDirectory() as d:
        now, before = export_pair(Path(d))
        V, C = MODEL["vocab_size"], MODEL["canvas_length"]
        r = np.random.default_rng(1)
        masks = np.ones((K, V), bool)
        masks[1:] = r.random((K - 1, V)) < 0.1
        classes = r.integers(1, K, (1, C))
        old = OnnxBackend(open_export(before, "cpu"), device="cpu", threads=args.threads)
        new = OnnxBackend(open_export(now, "cpu"), device="cpu", threads=args.threads)
        variants = {"onnx before": stepper(old), "onnx default": stepper(new),
                    "onnx constrained": None}
        try:
            from dgport.runtimes.mlx import MlxBackend

            mlx = MlxBackend(open_export(now, "mlx"))
            variants["mlx plain"] = stepper(mlx)
            variants["mlx constrained"] = None
        except Exception:  # noqa: BLE001  (no MLX here)
            mlx = None
        times = {k: [] for k in variants}
        for _ in range(args.rounds):
            for name in variants:
                if name == "onnx constrained":  # the backend's table is set per variant, as a run sets it
                    step = stepper(new, masks, classes)
                elif name == "mlx constrained":
                    step = stepper(mlx, masks, classes)
                elif name == "onnx default":
                    new.set_token_masks(None)
                    step = stepper(new)
                elif name == "mlx plain":
                    mlx.set_token_masks(None)
                    step = stepper(mlx)
                else:
                    step = variants[name]
                step()  # warm (and compile, on MLX)
                times[name].append(timed(step, args.steps))
    med = {k: round(statistics.median(v), 2) for k, v in times.items()}
    print(json.dumps({"cpu_flags": cpu_flags(), "threads": args.threads, "model": MODEL, "mask_rows": K,
                      "ms_per_step": med, "rounds": args.rounds, "steps": args.steps}))
    for name, ms in med.items():
        base = med["onnx before"] if name.startswith("onnx") else med.get("mlx plain")
        print(f"{name:18s} {ms:8.2f} ms/step  {ms / base:5.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
