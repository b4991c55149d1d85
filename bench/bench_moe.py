"""Two ONNX export variants of one checkpoint, side by side on one machine in one run: experts
sparse (a Loop over experts, each on its routed tokens) vs dense (every expert on every token), for
both graphs; or (`--compare attention`) attention spelled out vs one fused ONNX `Attention` node.

    python -m bench.bench_moe                          # MoE-heavy fixture, CPU EP
    python -m bench.bench_moe --device cuda --dtype bf16
    python -m bench.bench_moe --checkpoint PATH --lengths 256,2048
    python -m bench.bench_moe --experts 128 --top-k 8 --canvas 256   # the real model's expert counts
    python -m bench.bench_moe --compare attention --lengths 256,2048
    python -m bench.bench_moe --compare grouped        # grouped experts vs sparse (grouped-dense: vs dense)
    python -m bench.bench_moe --compare unrolled       # the unrolled expert loop vs the Loop (CPU)
    python -m bench.bench_moe --compare images         # text prompts: encoder with image input vs --text-only

Reports ms per encode call for prompts of each length and ms per denoise step over one canvas
(medians of --runs after a warm-up), the dense/sparse ratios, and the largest K/V and entropy
differences between the two forms (they compute the same function; only summation order differs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# the export variants compared, side by side on one checkpoint
VARIANTS = {
    "moe": {"dense": dict(encoder_moe="dense", denoise_moe="dense"),
            "sparse": dict(encoder_moe="sparse", denoise_moe="sparse")},
    "attention": {"explicit": dict(attention="explicit"), "fused": dict(attention="fused")},
    # grouped experts (exporters/onnx_grouped.py) against the CPU's form and against the GPU's
    "grouped": {"grouped": dict(encoder_moe="grouped", denoise_moe="grouped"),
                "sparse": dict(encoder_moe="sparse", denoise_moe="sparse")},
    # the CPU's experts: the Loop unrolled, each expert's weights read in place instead of gathered
    "unrolled": {"unrolled": dict(encoder_moe="unrolled", denoise_moe="unrolled"),
                 "sparse": dict(encoder_moe="sparse", denoise_moe="sparse")},
    "grouped-dense": {"grouped": dict(encoder_moe="grouped", denoise_moe="grouped"),
                      "dense": dict(encoder_moe="dense", denoise_moe="dense")},
    # the encoder with the optional image_embeds input (fed nothing: a text prompt) against --text-only's
    "images": {"image-input": dict(), "text-only": dict(text_only=True)},
}

# a fixture whose feed-forward cost is mostly experts, in the real model's 16:1 experts-to-top-k ratio
MOE_PRESET = dict(vocab_size=2048, hidden_size=256, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, global_head_dim=64, num_experts=32, top_k_experts=2,
                  moe_intermediate_size=256, sliding_window=128, canvas_length=64, router_std=2.0,
                  qk_norm_scale=0.25)


def time_encode(export_dir: Path, device: str, lengths, runs: int, threads: int):
    from dgport.manifest import open_export
    from dgport.runtimes.onnx import OnnxBackend

    backend = OnnxBackend(open_export(export_dir, device), device=device, threads=threads)
    V = backend.config.vocab_size
    rng = np.random.default_rng(0)
    out = {}
    for T in lengths:
        ids = rng.integers(0, V, size=(1, T))
        pos = np.arange(T)[None]
        times = []
        for r in range(runs + 1):
            backend.reset()
            t = time.perf_counter()
            backend.encode(ids, pos)
            backend.cache_numpy(0)  # waits for the device
            if r:
                times.append(time.perf_counter() - t)
        out[T] = {"ms": 1e3 * statistics.median(times),
                  "kv": [backend.cache_numpy(i) for i in range(backend.config.num_layers)]}
    # one denoise step over a canvas, after the longest prompt
    C = backend.config.canvas_length
    canvas, cpos = rng.integers(0, V, size=(1, C)), np.arange(T, T + C)[None]
    u = rng.random((1, C), dtype=np.float32)
    times = []
    for r in range(runs + 1):
        backend.new_canvas()
        t = time.perf_counter()
        step = backend.denoise(canvas, cpos, np.float32(0.8), u)
        if r:
            times.append(time.perf_counter() - t)
    out["step"] = {"ms": 1e3 * statistics.median(times), "entropy": step.entropy}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="HF DiffusionGemma folder (default: the MoE-heavy fixture)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--lengths", default="16,256,1024", help="prompt lengths for the encode timings")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--experts", type=int, help="fixture: number of experts (default 32)")
    ap.add_argument("--top-k", type=int, help="fixture: experts per token (default 2)")
    ap.add_argument("--canvas", type=int, help="fixture: canvas length (default 64)")
    ap.add_argument("--compare", default="moe", choices=list(VARIANTS),
                    help="moe: dense vs sparse experts; attention: explicit vs fused (ONNX Attention); grouped: "
                         "grouped vs sparse experts; grouped-dense: grouped vs dense; unrolled: the unrolled expert "
                         "loop vs the Loop; images: the encoder with its image input, on text, vs a --text-only export")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    from dgport.exporters.export import ExportOptions, export

    lengths = [int(x) for x in args.lengths.split(",")]
    overrides = {k: v for k, v in (("num_experts", args.experts), ("top_k_experts", args.top_k),
                                   ("canvas_length", args.canvas)) if v}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = args.checkpoint
        if ckpt is None:
            from models.fixtures import build_fixture

            ckpt = build_fixture("tiny", tmp / "ckpt", **{**MOE_PRESET, **overrides})
        results = {}
        for name, options in VARIANTS[args.compare].items():
            out = tmp / name
            export(ckpt, out, ExportOptions(dtype=args.dtype, validate=False, **options))
            results[name] = time_encode(out, args.device, lengths, args.runs, args.threads)
    A, B = VARIANTS[args.compare]
    rows = []
    for T in lengths:
        a, b = results[A][T], results[B][T]
        diff = max(float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30))
                   for ka, kb in zip(a["kv"], b["kv"]) for x, y in zip(ka, kb))
        rows.append({"prompt_tokens": T, f"{A}_ms": a["ms"], f"{B}_ms": b["ms"], f"{A}_over_{B}": a["ms"] / b["ms"],
                     "kv_max_rel_diff": diff})
    fixture = "MoE fixture " + str({**MOE_PRESET, **overrides}) if not args.checkpoint else args.checkpoint
    print(f"device {args.device}, dtype {args.dtype}, checkpoint {fixture}")
    print(f"| prompt tokens | {A} ms / encode | {B} ms / encode | {A}/{B} | K/V max rel diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompt_tokens']} | {r[f'{A}_ms']:.1f} | {r[f'{B}_ms']:.1f} | {r[f'{A}_over_{B}']:.2f}x "
              f"| {r['kv_max_rel_diff']:.1e} |")
    a, b = results[A]["step"], results[B]["step"]
    step = {"canvas_tokens": len(a["entropy"][0]), f"{A}_ms": a["ms"], f"{B}_ms": b["ms"],
            f"{A}_over_{B}": a["ms"] / b["ms"], "entropy_max_abs_diff": float(np.abs(a["entropy"] - b["entropy"]).max())}
    print(f"\n| denoise step, canvas {step['canvas_tokens']} | {A} {a['ms']:.1f} ms | {B} {b['ms']:.1f} ms "
          f"| {A}/{B} {step[f'{A}_over_{B}']:.2f}x | entropy max abs diff {step['entropy_max_abs_diff']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"encode": rows, "denoise_step": step}, indent=2))


if __name__ == "__main__":
    main()
