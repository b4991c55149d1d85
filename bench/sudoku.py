"""Solve held-out Sudoku puzzles with the shipped Sudoku DiffusionGemma through dgport.

    python -m bench.sudoku models/sudoku --backend torch --puzzles 100 --seed 0
    python -m bench.sudoku EXPORT --backend cpu|mlx [--min-givens 36 --max-givens 45]

Puzzles come from `models.sudoku.puzzles.generate(seed, n, min_givens, max_givens)` (seeds disjoint
from the training seeds). Each puzzle is solved with `Generator.generate(puzzle, seed=<its seed>)`,
so two backends see the same randomness. A puzzle counts as solved only if the answer is a complete
valid grid that keeps every given. Prints the solve rate per number of givens, tokens per decoder
forward pass, decoder passes per puzzle and puzzles per second (load time excluded).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

from models.sudoku.puzzles import eval_seeds_disjoint, generate, is_valid_solution


def parse_answer(text: str) -> str:
    """The model's answer text (special tokens already stripped) -> the 81-character grid it claims."""
    return "".join(text.split())


def run(path, backend="torch", puzzles=100, seed=0, min_givens=36, max_givens=45, overrides=None,
        verbose=False, generator=None, template=False):
    """Solve `puzzles` puzzles; returns a dict of results (see `main` for the report). `template`: each
    puzzle through the task's answer template (givens fixed, a one-cell hole per blank)."""
    import dgport
    from dgport.task import answer_template

    if not eval_seeds_disjoint(seed, puzzles):
        raise SystemExit(f"seed {seed} with {puzzles} puzzles would overlap the training seeds; use seed 0..8")
    items = generate(seed, puzzles, min_givens, max_givens)
    t_load = time.time()
    gen = generator if generator is not None else dgport.load(path, backend=backend)
    t_load = time.time() - t_load
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    by_givens = defaultdict(lambda: [0, 0])
    rows = []
    tokens = passes = 0
    blanks = right = 0
    t0 = time.time()
    for p in items:
        res = gen.generate(p.puzzle, seed=p.seed, template=answer_template("sudoku", p.puzzle) if template else None,
                           **overrides)
        answer = parse_answer(res.text)
        ok = is_valid_solution(p.puzzle, answer)
        by_givens[p.givens][0] += ok
        by_givens[p.givens][1] += 1
        n_passes = sum(res.steps_per_canvas)
        for q, a, sol in zip(p.puzzle, answer.ljust(81, "?"), p.solution):
            if q == ".":
                blanks += 1
                right += a == sol
        passes += n_passes
        tokens += res.tokens_per_forward * n_passes
        rows.append({"seed": p.seed, "givens": p.givens, "solved": ok, "passes": n_passes,
                     "token_ids": res.token_ids[0], "answer": answer})
        if verbose:
            wrong = sum(a != b for a, b in zip(answer, p.solution)) if len(answer) == 81 else None
            print(f"seed {p.seed} givens {p.givens} solved {ok} passes {n_passes} wrong_cells {wrong}", flush=True)
    elapsed = time.time() - t0
    solved = sum(r["solved"] for r in rows)
    return {
        "path": str(path), "backend": backend, "seed": seed, "puzzles": len(rows),
        "min_givens": min_givens, "max_givens": max_givens, "overrides": overrides, "template": template,
        "solved": solved, "solve_rate": solved / len(rows),
        "blank_cell_accuracy": right / blanks if blanks else 1.0,
        "by_givens": {g: {"solved": s, "total": n, "rate": s / n} for g, (s, n) in sorted(by_givens.items())},
        "tokens_per_forward": tokens / passes if passes else 0.0,
        "passes_per_puzzle": passes / len(rows),
        "puzzles_per_second": len(rows) / elapsed,
        "seconds": elapsed, "load_seconds": t_load,
        "rows": rows,
    }


def report(r) -> str:
    lines = [f"{r['path']}  backend={r['backend']}  seed={r['seed']}  givens {r['min_givens']}-{r['max_givens']}"
             + (f"  overrides {r['overrides']}" if r["overrides"] else "")
             + ("  answer template" if r.get("template") else "")]
    lines.append(" givens  solved/total  rate")
    for g, v in r["by_givens"].items():
        lines.append(f"  {g:>5}  {v['solved']:>6}/{v['total']:<5} {100 * v['rate']:5.1f}%")
    buckets = defaultdict(lambda: [0, 0])
    for g, v in r["by_givens"].items():
        lo = (g // 5) * 5
        buckets[lo][0] += v["solved"]
        buckets[lo][1] += v["total"]
    lines.append(" by range: " + ", ".join(f"{lo}-{lo + 4}: {s}/{n}" for lo, (s, n) in sorted(buckets.items())))
    lines.append(f"solved {r['solved']}/{r['puzzles']} = {100 * r['solve_rate']:.1f}%   "
                 f"blank cells right {100 * r['blank_cell_accuracy']:.1f}%   "
                 f"tokens/forward {r['tokens_per_forward']:.2f}   passes/puzzle {r['passes_per_puzzle']:.2f}   "
                 f"puzzles/s {r['puzzles_per_second']:.2f}   (load {r['load_seconds']:.1f}s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="checkpoint folder (backend torch) or dgport export folder (cpu, cuda, mlx)")
    ap.add_argument("--backend", default="torch", choices=["torch", "cpu", "cuda", "mlx"])
    ap.add_argument("--puzzles", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="evaluation seed 0..8 (disjoint from training)")
    ap.add_argument("--min-givens", type=int, default=36)
    ap.add_argument("--max-givens", type=int, default=45)
    ap.add_argument("--max-denoising-steps", type=int, default=None)
    ap.add_argument("--entropy-bound", type=float, default=None)
    ap.add_argument("--t-min", type=float, default=None)
    ap.add_argument("--t-max", type=float, default=None)
    ap.add_argument("--template", action="store_true", help="solve through the answer template (givens fixed)")
    ap.add_argument("--json", default=None, help="also write the full results (with token ids) to this file")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.min_givens > args.max_givens:
        ap.error("--min-givens must not exceed --max-givens")
    overrides = {"max_denoising_steps": args.max_denoising_steps, "entropy_bound": args.entropy_bound,
                 "t_min": args.t_min, "t_max": args.t_max}
    r = run(args.path, args.backend, args.puzzles, args.seed, args.min_givens, args.max_givens, overrides,
            verbose=args.verbose, template=args.template)
    print(report(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
