"""Sudoku solve rates with and without the answer template, side by side in one run.

    python -m bench.sudoku_templates EXPORT --backend cpu [--seeds 0,3,4,7,8]

For each band of givens (23-29, 30-35: 50 puzzles per eval seed; 36-45: 100) and each eval seed, the
same puzzles with the same sampler seeds are solved twice through `bench.sudoku.run`: free (the
model writes all 82 positions) and through `dgport.task.answer_template` (givens fixed, a one-cell
hole per blank). Prints solved counts, decoder passes per puzzle and seconds, per band and pooled.
"""
from __future__ import annotations

import argparse
import json
import sys

from bench.sudoku import run

BANDS = ((23, 29, 50), (30, 35, 50), (36, 45, 100))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", default=None, help="export folder (default: the shipped Sudoku model)")
    ap.add_argument("--backend", default="cpu", choices=["torch", "cpu", "cuda", "mlx"])
    ap.add_argument("--seeds", default="0,3,4,7,8")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of each band's puzzles (for a quick look)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import dgport

    gen = dgport.load(args.path, backend=args.backend)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    print("givens  seed  puzzles  free solved  template solved  free passes  template passes  free s  template s",
          flush=True)
    for lo, hi, n in BANDS:
        n = max(1, round(n * args.scale))
        for seed in seeds:
            pair = [run(args.path, args.backend, n, seed, lo, hi, generator=gen, template=t) for t in (False, True)]
            for r in pair:
                r.pop("rows")
            rows.append({"givens": f"{lo}-{hi}", "seed": seed, "puzzles": n, "free": pair[0], "template": pair[1]})
            f, t = pair
            print(f"{lo}-{hi}  {seed:>4}  {n:>7}  {f['solved']:>11}  {t['solved']:>15}  {f['passes_per_puzzle']:>11.1f}"
                  f"  {t['passes_per_puzzle']:>15.1f}  {f['seconds']:>6.1f}  {t['seconds']:>10.1f}", flush=True)
    print("pooled:")
    for lo, hi, _ in BANDS:
        band = [r for r in rows if r["givens"] == f"{lo}-{hi}"]
        total = sum(r["puzzles"] for r in band)
        free = sum(r["free"]["solved"] for r in band)
        tmpl = sum(r["template"]["solved"] for r in band)
        print(f"  {lo}-{hi}: free {free}/{total} ({100 * free / total:.1f} %), "
              f"template {tmpl}/{total} ({100 * tmpl / total:.1f} %)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
