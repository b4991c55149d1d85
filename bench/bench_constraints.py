"""Vocabulary constraints: the denoise step's time with and without token masks (ONNX Runtime CPU, MLX).

    python -m bench.bench_constraints

A head-heavy fixture (vocab 32768, hidden 1024, 2 layers, canvas 64: the lm_head and sampler are about
half the step, so the masks' share is far larger than in the real model, whose 30 layers dwarf its head)
is exported twice: with the graphs as they were before vocabulary constraints (no token_masks /
token_classes inputs, built by leaving them out) and as dgport exports them now. Measured, alternating
rounds, median ms per denoise step of one canvas:

- before: the graph without the constraint inputs;
- default: today's graph fed only the old inputs (the If that applies masks is not taken);
- constrained: a 6-row mask table, every position in a constrained class (the worst case);
- with --mlx: MLX's plain compiled step and the masked one (MLX on a Linux CPU is slow: its correctness
  target, not its speed target).

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

MODEL = dict(vocab_size=32768, hidden_size=1024, intermediate_size=2048, layer_types=("sliding_attention", "full_attention"),
             num_attention_heads=8, num_key_value_heads=4, head_dim=128, global_head_dim=128, num_experts=8,
             top_k_experts=2, moe_intermediate_size=512, sliding_window=128, canvas_length=64)
K = 6


def export_pair(tmp: Path, mlx: bool) -> tuple[Path, Path]:
    from unittest import mock

    from dgport.exporters import onnx_steps
    from dgport.exporters.export import ExportOptions, export
    from models.fixtures import build_fixture

    ckpt = build_fixture("tiny", tmp / "ckpt", **MODEL)
    now, before = tmp / "now", tmp / "before"
    export(ckpt, now, ExportOptions(formats=("onnx", "mlx") if mlx else ("onnx",), validate=False))
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
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mlx", action="store_true", help="MLX too (minutes on a Linux CPU)")
    args = ap.parse_args(argv)
    from dgport.manifest import open_export
    from dgport.runtimes.onnx import OnnxBackend

    with tempfile.TemporaryDirectory() as d:
        now, before = export_pair(Path(d), args.mlx)
        V, C = MODEL["vocab_size"], MODEL["canvas_length"]
        r = np.random.default_rng(1)
        masks = np.ones((K, V), bool)
        masks[1:] = r.random((K - 1, V)) < 0.1
        classes = r.integers(1, K, (1, C))
        old = OnnxBackend(open_export(before, "cpu"), device="cpu", threads=args.threads)
        new = OnnxBackend(open_export(now, "cpu"), device="cpu", threads=args.threads)
        variants = {"onnx before": stepper(old), "onnx default": stepper(new),
                    "onnx constrained": None}
        mlx = None
        if args.mlx:
            from dgport.runtimes.mlx import MlxBackend

            mlx = MlxBackend(open_export(now, "mlx"))
            variants["mlx plain"] = stepper(mlx)
            variants["mlx constrained"] = None
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
    # each round's ratio to its own baseline (measured right before it): robust to load that drifts
    ratio = {k: round(statistics.median(a / b for a, b in zip(v, times["onnx before" if k.startswith("onnx")
                                                                        else "mlx plain"])), 3)
             for k, v in times.items()}
    print(json.dumps({"cpu_flags": cpu_flags(), "threads": args.threads, "model": MODEL, "mask_rows": K,
                      "ms_per_step": med, "ratio": ratio, "rounds": args.rounds, "steps": args.steps}))
    for name, ms in med.items():
        print(f"{name:18s} {ms:8.2f} ms/step  {ratio[name]:5.3f}x (median of the rounds' ratios)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
