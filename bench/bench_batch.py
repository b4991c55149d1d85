"""Batched denoising: one step over B rows against B single-row steps, side by side in one run.

    python -m bench.bench_batch --model mid                 # ~190 M parameters, canvas 256, fp32 sparse experts
    python -m bench.bench_batch --model real-slice          # the real 26B-A4B layer geometry, int4
    python -m bench.bench_batch --model sudoku --sizes 1,2,4,8

For each batch size B: B rows with prompts of different lengths (so caches are left-padded), the
median wall time of `denoise_rows` over the B rows, against B times the single-row `denoise` step
measured in the same process, alternating. Reported: ms per batched step, ms per row, and the
throughput ratio (rows per second batched / single). Then `generate_batch` of B prompts against B
`generate` calls (fixed steps, same seeds): tokens per second, and whether every row's tokens are
the single run's. Prints the CPU's VNNI/BF16 flags and the thread count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# a mid-size model: experts dominate the feed-forward, as in the real model (16 experts, top-4)
MID = dict(vocab_size=32768, hidden_size=768, intermediate_size=1536, layer_types=("sliding_attention", "full_attention") * 4,
           num_attention_heads=8, num_key_value_heads=4, head_dim=96, global_head_dim=96, num_experts=16, top_k_experts=4,
           moe_intermediate_size=384, sliding_window=512, canvas_length=256, router_std=2.0, qk_norm_scale=0.25)


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return " ".join(f for f in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags) or "none"


def make_export(model: str, tmp: Path) -> tuple[Path, str]:
    from dgport.exporters.export import ExportOptions, export
    from models.fixtures import build_fixture

    if model == "sudoku":
        from dgport.default_model import default_checkpoint

        ckpt, opts, what = default_checkpoint(), ExportOptions(validate=False), "shipped Sudoku model, fp32"
    elif model == "mid":
        ckpt = build_fixture("tiny", tmp / "ckpt", **MID)
        opts, what = ExportOptions(validate=False), "mid-size fixture " + json.dumps(MID) + ", fp32"
    else:
        ckpt = build_fixture("real-slice", tmp / "ckpt", canvas_length=256)
        opts, what = ExportOptions(validate=False, quantize=4), "real-geometry slice (canvas 256), int4"
    out = tmp / "export"
    export(ckpt, out, opts)
    return out, what


def prompts_for(V: int, n: int, rng) -> list[list[int]]:
    lengths = [17 + 29 * i for i in range(n)]  # different lengths: padded caches
    return [[2] + rng.integers(3, V, size=L - 1).tolist() for L in lengths]


def step_times(backend, prompts, runs: int) -> dict:
    """Median ms of one batched step over all rows, and of one single-row step per row (same process, alternating)."""
    cfg = backend.config
    C, V = cfg.canvas_length, cfg.vocab_size
    rng = np.random.default_rng(0)
    rows = []
    for p in prompts:
        r = backend.open_row()
        backend.encode_row(r, np.asarray([p]), np.arange(len(p))[None])
        rows.append(r)
    B = len(rows)
    canvas = rng.integers(0, V, size=(B, C))
    pos = np.stack([np.arange(len(p), len(p) + C) for p in prompts])
    temps = np.full(B, 0.8, np.float32)
    unif = rng.random((B, C), dtype=np.float32)
    batched, single = [], []
    for i in range(runs + 1):
        t = time.perf_counter()
        backend.denoise_rows(rows, canvas, pos, temps, unif, np.array([i == 0] * B))
        if i:
            batched.append(time.perf_counter() - t)
        t = time.perf_counter()
        for b in range(B):  # the same rows one at a time
            backend.denoise_rows([rows[b]], canvas[b:b + 1], pos[b:b + 1], temps[b:b + 1], unif[b:b + 1],
                                 np.array([i == 0]))
        if i:
            single.append(time.perf_counter() - t)
    for r in rows:
        backend.close_row(r)
    bt, st = 1000 * statistics.median(batched), 1000 * statistics.median(single)
    return {"batched_step_ms": bt, "single_steps_ms": st, "ms_per_row_batched": bt / B, "ms_per_row_single": st / B,
            "throughput_ratio": st / bt}


def profile_ops(export, backend: str, threads: int, prompts, runs: int, prefix: Path) -> dict:
    """onnxruntime's profile of `runs` batched steps over len(prompts) rows (ONNX backends): ms per step
    by op type (the Loops split into the sparse experts' and the streamed vocabulary head's; the ops
    inside a Loop are counted again under their own types) and the whole run's ms."""
    import collections

    import dgport

    gen = dgport.load(export, backend=backend, threads=threads, profile_prefix=str(prefix))
    be, cfg = gen.backend, gen.config
    rows = []
    for p in prompts:
        rows.append(be.open_row())
        be.encode_row(rows[-1], np.asarray([p]), np.arange(len(p))[None])
    B, C = len(rows), cfg.canvas_length
    rng = np.random.default_rng(0)
    canvas = rng.integers(0, cfg.vocab_size, size=(B, C))
    pos = np.stack([np.arange(len(p), len(p) + C) for p in prompts])
    for i in range(runs):  # the batched step alone: its session's profile holds nothing else
        be.denoise_rows(rows, canvas, pos, np.full(B, 0.8, np.float32), rng.random((B, C), dtype=np.float32),
                        np.array([i == 0] * B))
    ev = json.loads(Path(gen.backend._sessions["denoise_step"].end_profiling()).read_text())
    runs_ev = sorted((e for e in ev if e.get("name") == "model_run"), key=lambda e: e["ts"])
    # the last runs - 1 are the steps after the first (a quantized export's one session also encoded)
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in runs_ev[-(runs - 1):]]
    H = gen.config.hidden_size
    by_op = collections.Counter()
    for e in ev:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and any(a <= e["ts"] <= b for a, b in spans):
            op = e["args"].get("op_name", "?")
            if op == "Loop":  # the sparse experts' loop returns hidden states; the streamed head, logit statistics
                shapes = [next(iter(o.values())) for o in e["args"].get("output_type_shape", [])]
                op = "Loop:experts" if shapes and shapes[0] and shapes[0][-1] == H else "Loop:head"
            by_op[op] += e["dur"]
    n = max(len(spans), 1)
    return {"run_ms": sum(b - a for a, b in spans) / n / 1000, "ops_ms": {k: v / n / 1000 for k, v in by_op.items()}}


def generate_times(gen, prompts, steps: int) -> dict:
    settings = dict(max_denoising_steps=steps, stability_threshold=steps)  # the stopping rule cannot end it earlier
    seeds = list(range(len(prompts)))
    max_new = gen.config.canvas_length
    t = time.perf_counter()
    singles = [gen.generate(p, seed=s, raw=True, max_new_tokens=max_new, **settings) for p, s in zip(prompts, seeds)]
    single_s = time.perf_counter() - t
    t = time.perf_counter()
    batch = gen.generate_batch(prompts, seeds=seeds, raw=True, max_new_tokens=max_new, **settings)
    batch_s = time.perf_counter() - t
    tokens = sum(len(r.token_ids[0]) for r in singles)
    return {"single_tokens_per_s": tokens / single_s, "batch_tokens_per_s": tokens / batch_s,
            "ratio": single_s / batch_s,
            "rows_identical": sum(a.token_ids == b.token_ids for a, b in zip(singles, batch))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["mid", "real-slice", "sudoku"], default="mid")
    ap.add_argument("--backend", choices=["cpu", "cuda", "mlx"], default="cpu")
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="denoising steps per canvas in the generate comparison")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="also profile the step by op type at B = 1 and the largest B (ONNX backends)")
    args = ap.parse_args(argv)
    import dgport

    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        export, what = make_export(args.model, Path(tmp))
        opts = {"threads": args.threads} if args.backend != "mlx" else {}
        gen = dgport.load(export, backend=args.backend, **opts)
        print(f"{what}; backend {args.backend}, {args.threads} threads; CPU flags: {cpu_flags()}", flush=True)
        rng = np.random.default_rng(0)
        report = {"model": what, "backend": args.backend, "cpu_flags": cpu_flags(), "threads": args.threads, "sizes": {}}
        print(" B  batched step ms  B single steps ms  ms/row batched  ms/row single  throughput x  "
              "generate x  rows identical", flush=True)
        for B in sizes:
            prompts = prompts_for(gen.config.vocab_size, B, rng)
            st = step_times(gen.backend, prompts, args.runs)
            gt = generate_times(gen, prompts, args.steps)
            report["sizes"][B] = {**st, "generate": gt}
            print(f"{B:>2}  {st['batched_step_ms']:>15.1f}  {st['single_steps_ms']:>17.1f}  "
                  f"{st['ms_per_row_batched']:>14.1f}  {st['ms_per_row_single']:>13.1f}  {st['throughput_ratio']:>12.2f}  "
                  f"{gt['ratio']:>10.2f}  {gt['rows_identical']}/{B}", flush=True)
        if args.profile and args.backend != "mlx":
            ends = (1, max(sizes))
            prof = {B: profile_ops(export, args.backend, args.threads, prompts_for(gen.config.vocab_size, B, rng),
                                   args.runs + 2, Path(tmp) / f"profile{B}") for B in ends}
            report["profile"] = prof
            a, b = (prof[B] for B in ends)
            print(f"profile (ms per step; ops inside the Loops are counted again under their own type): "
                  f"B = 1 {a['run_ms']:.1f}, B = {ends[1]} {b['run_ms']:.1f}")
            for op in sorted(b["ops_ms"], key=lambda k: -b["ops_ms"][k])[:14]:
                x, y = a["ops_ms"].get(op, 0.0), b["ops_ms"][op]
                print(f"  {op:<14} {x:>9.1f} {y:>9.1f}  x{y / x if x else float('inf'):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
