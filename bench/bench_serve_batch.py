"""`dgport serve --max-batch`: continuous batching against one request at a time, side by side.

    python -m bench.bench_serve_batch                                  # shipped Sudoku model, CPU
    python -m bench.bench_serve_batch --model mid --requests 12        # ~190 M parameters, canvas 256
    python -m bench.bench_serve_batch EXPORT --clients 1,4 --max-batch 1,4 --json out.json

For each --max-batch value a server runs (its own process, loopback) and serves each client count in
turn: `clients` streaming clients take the same requests (held-out puzzles as chat prompts, fixed
seeds) until none are left. The servers take turns over --rounds rounds, so that the machine's other
load falls on each alike; each figure is the median over rounds. Reported per client count and
max-batch: requests/s, end-to-end latency p50/p99 and time to first canvas p50, and the ratios to
--max-batch 1; and whether every answer is the same text at every max-batch (a request's answer must
not depend on what else is in its batch). Prints the CPU's VNNI/BF16 flags.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from .bench_batch import cpu_flags, make_export
from .bench_serve import Server, concurrent, pct, workload


def run_round(export, backend: str, max_batch: int, clients: list[int], jobs, settings: dict, answers: dict) -> dict:
    """One server at `max_batch`, each client count in turn: {clients: figures}."""
    srv = Server(export, backend, "--max-batch", str(max_batch), "--max-queue", str(4 * max(clients)))
    out = {}
    try:
        for n in clients:
            results, wall = concurrent(srv.url, jobs, n, 3600, settings)
            ok = [r for r in results if r["status"] == 200]
            if len(ok) != len(results):
                bad = next(r for r in results if r["status"] != 200)
                raise RuntimeError(f"--max-batch {max_batch}, {n} clients: status {bad['status']} "
                                   f"{bad.get('error', '')}")
            for r in ok:
                answers.setdefault(r["job"], set()).add(r["text"])
            out[n] = {"requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
                      "e2e_ms_p50": 1000 * pct([r["e2e"] for r in ok], 50),
                      "e2e_ms_p99": 1000 * pct([r["e2e"] for r in ok], 99),
                      "ttfc_ms_p50": 1000 * pct([r["ttfc"] for r in ok], 50)}
    finally:
        srv.stop()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", nargs="?", help="export folder (default: --model's)")
    ap.add_argument("--model", choices=["sudoku", "mid"], default="sudoku",
                    help="without EXPORT: the shipped Sudoku model, or the mid-size fixture (bench_batch's)")
    ap.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "mlx"])
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--max-batch", default="1,2,4,8", help="servers compared (1 is the baseline)")
    ap.add_argument("--requests", type=int, default=24, help="requests per client count and server")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the report to this file")
    args = ap.parse_args(argv)
    try:
        clients = [int(c) for c in args.clients.split(",")]
        batches = sorted({int(b) for b in args.max_batch.split(",")} | {1})
    except ValueError:
        ap.error("--clients and --max-batch are comma-separated integers")
    if not all(1 <= c <= 64 for c in clients) or not all(1 <= b <= 256 for b in batches):
        ap.error("--clients 1..64, --max-batch 1..256")
    if not (1 <= args.requests <= 10_000 and 1 <= args.rounds <= 20):
        ap.error("--requests 1..10000, --rounds 1..20")

    with tempfile.TemporaryDirectory() as tmp:
        what = args.export
        if args.export is None and args.model == "mid":
            export, what = make_export("mid", Path(tmp))
            # random weights: a fixed number of steps over one canvas per request
            settings = {"max_tokens": 256, "max_denoising_steps": 8, "stability_threshold": 8}
        else:
            if args.export is None:
                from dgport.default_model import ensure_default_export

                export, what = ensure_default_export(args.backend), "shipped Sudoku model, fp32"
            else:
                export = args.export
            settings = {}
        settings["stream_options"] = {"include_usage": True}  # the last chunk counts the answer's tokens
        jobs = workload(args.requests, 0)
        print(f"{what}; backend {args.backend}; CPU flags: {cpu_flags()}; {args.requests} requests per point, "
              f"{args.rounds} rounds", flush=True)
        answers: dict = {}
        runs: dict = {b: [] for b in batches}
        for _ in range(args.rounds):
            for b in batches:
                runs[b].append(run_round(export, args.backend, b, clients, jobs, settings, answers))

    report = {"model": what, "backend": args.backend, "cpu_flags": cpu_flags(), "requests": args.requests,
              "rounds": args.rounds, "points": {}}
    print("clients  max-batch  req/s  x req/s  tokens/s  e2e p50 ms  x p50  e2e p99 ms  first canvas p50 ms")
    for n in clients:
        base = None
        for b in batches:
            med = {k: statistics.median(r[n][k] for r in runs[b]) for k in runs[b][0][n]}
            base = base or med
            point = {**med, "x_requests_per_s": med["requests_per_s"] / base["requests_per_s"],
                     "x_e2e_p50": med["e2e_ms_p50"] / base["e2e_ms_p50"]}
            report["points"][f"{n}x{b}"] = point
            print(f"{n:>7}  {b:>9}  {med['requests_per_s']:>5.2f}  {point['x_requests_per_s']:>7.2f}  "
                  f"{med['tokens_per_s']:>8.1f}  "
                  f"{med['e2e_ms_p50']:>10.0f}  {point['x_e2e_p50']:>5.2f}  {med['e2e_ms_p99']:>10.0f}  "
                  f"{med['ttfc_ms_p50']:>19.0f}", flush=True)
    differ = sum(len(texts) > 1 for texts in answers.values())
    report["answers_that_differ"] = differ
    print(f"requests whose answer differs between runs or max-batch values: {differ} of {len(answers)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
