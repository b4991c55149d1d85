"""Seconds per Sudoku puzzle on each backend that runs on this machine, side by side in one process:
the shipped model on ONNX Runtime CPU (fp32), MLX fp32 and MLX int4 (exported into WORK), after one
warm-up puzzle each (MLX compiles its functions on the first call), and a whole `dgport run` process.

    python -m bench.backend_puzzle_times [--work /tmp/dgport-bench] [--puzzles 5]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    import dgport
    from dgport.default_model import default_checkpoint
    from dgport.exporters.export import ExportOptions, export
    from dgport.models.sudoku.puzzles import puzzle_from_seed

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/dgport-bench"))
    ap.add_argument("--puzzles", type=int, default=5)
    args = ap.parse_args()
    int4 = args.work / "sudoku-mlx-int4"
    if not int4.exists():
        export(default_checkpoint(), int4, ExportOptions(formats=("mlx",), quantize=4, validate=False))
    puzzles = [puzzle_from_seed(1000 + i, 40).puzzle for i in range(args.puzzles + 1)]
    for name, gen in [("cpu fp32", dgport.load(backend="cpu")), ("mlx fp32", dgport.load(backend="mlx")),
                      ("mlx int4", dgport.load(int4, backend="mlx"))]:
        gen.generate(puzzles[0], seed=0)  # warm-up: MLX compiles here
        start = time.perf_counter()
        for p in puzzles[1:]:
            gen.generate(p, seed=0)
        print(f"{name}: {(time.perf_counter() - start) / args.puzzles:.2f} s per puzzle", flush=True)
    for backend in ("cpu", "mlx"):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dgport.cli", "run", "--backend", backend, "--prompt", puzzles[1],
                        "--seed", "0"], check=True, capture_output=True)
        print(f"dgport run --backend {backend}, whole process: {time.perf_counter() - start:.2f} s", flush=True)


if __name__ == "__main__":
    main()
