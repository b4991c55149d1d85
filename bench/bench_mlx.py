"""MLX backend vs Hugging Face `generate`, side by side on one fixture checkpoint.

    python -m bench.bench_mlx [--preset tiny] [--size bench|preset] [--dtype fp32] [--quantize 4]
                              [--runs 3] [--max-new-tokens N] [--json]

Builds the fixture (random weights, fixed seed), exports it with `--format mlx`, then runs each
side in its own subprocess (so peak memory is per side): a warm-up generate (MLX compiles its
graphs there), then `--runs` timed generates with the same prompt and seeds. Reports generated
tokens/s, ms per denoise step, ms per encode, steps per canvas, tokens per forward, peak memory
(process max RSS; MLX also its allocator peak), and the MLX/HF ratios. Settings: the checkpoint's
generation_config (max_denoising_steps, entropy bound, temperatures) on both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# a fixture big enough that compute, not Python overhead, dominates a step (~8 M parameters)
BENCH_SIZE = dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
                  num_experts=16, top_k_experts=4, moe_intermediate_size=128, canvas_length=64,
                  sliding_window=64)
PROMPT = [2, 105, 300, 301, 302, 303, 304, 305, 106, 107]


def _max_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def run_mlx(export_dir: str, runs: int, max_new_tokens: int | None) -> dict:
    import mlx.core as mx

    import dgport
    from dgport.timing import TimedBackend

    gen = dgport.load(export_dir, backend="mlx")
    gen.generate(PROMPT, seed=0, max_new_tokens=max_new_tokens)  # warm-up: compiles encode + step
    gen.backend = TimedBackend(gen.backend)
    wall, tokens, steps, tpf = 0.0, 0, [], []
    for s in range(runs):
        t = time.perf_counter()
        out = gen.generate(PROMPT, seed=100 + s, max_new_tokens=max_new_tokens)
        wall += time.perf_counter() - t
        tokens += sum(1 for x in out.token_ids[0] if x != gen.defaults.pad_token_id)
        steps += out.steps_per_canvas
        tpf.append(out.tokens_per_forward)
    tm = gen.backend.timings.as_dict()
    return {"side": "mlx", "device": str(mx.default_device()), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ms_per_step": tm["ms_per_step"], "ms_per_encode": tm["ms_per_encode"],
            "steps_per_canvas": sum(steps) / len(steps), "tokens_per_forward": sum(tpf) / len(tpf),
            "peak_rss_mb": _max_rss_mb(), "mlx_peak_mb": mx.get_peak_memory() / 2**20}


def run_hf(ckpt_dir: str, runs: int, max_new_tokens: int | None) -> dict:
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt_dir, dtype=torch.float32,
                                                            use_safetensors=True).eval()
    times = {"encoder": [], "decoder": []}

    def timer(name):
        start = {}

        def pre(*_a, **_k):
            start["t"] = time.perf_counter()

        def post(*_a, **_k):
            times[name].append(time.perf_counter() - start["t"])

        return pre, post

    for name, mod in (("encoder", model.model.encoder), ("decoder", model.model.decoder)):
        pre, post = timer(name)
        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)
    ids = torch.tensor([PROMPT])
    kw = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    with torch.no_grad():
        model.generate(ids, **kw)  # warm-up
        for v in times.values():
            v.clear()
        wall, tokens, tpf, canvases = 0.0, 0, [], 0
        pad = model.generation_config.pad_token_id or 0
        C = model.config.canvas_length
        for s in range(runs):
            torch.manual_seed(100 + s)
            t = time.perf_counter()
            out = model.generate(ids, **kw)
            wall += time.perf_counter() - t
            new = out.sequences[0, ids.shape[1]:]
            tokens += int((new != pad).sum())
            canvases += new.numel() // C
            tpf.append(float(out.tokens_per_forward[0]))
    # the decoder also runs (no lm_head) inside the forward; encoder calls = canvases committed + prompt
    dec, enc = times["decoder"], times["encoder"]
    return {"side": "hf", "device": "cpu", "torch_threads": torch.get_num_threads(), "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall, "ms_per_step": 1000 * sum(dec) / max(len(dec), 1),
            "ms_per_encode": 1000 * sum(enc) / max(len(enc), 1), "steps_per_canvas": len(dec) / max(canvases, 1),
            "tokens_per_forward": sum(tpf) / len(tpf), "peak_rss_mb": _max_rss_mb()}


def _side(args, which: str, path: str) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_mlx", "--side", which, "--path", path, "--runs", str(args.runs)]
    if args.max_new_tokens:
        cmd += ["--max-new-tokens", str(args.max_new_tokens)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if res.returncode:
        raise SystemExit(f"{which} side failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", choices=("bench", "preset"), default="bench",
                    help="bench: the preset scaled up to ~8 M parameters; preset: as defined")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--quantize", type=int, default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--side", choices=("mlx", "hf"), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        fn = run_mlx if args.side == "mlx" else run_hf
        print(json.dumps(fn(args.path, args.runs, args.max_new_tokens)))
        return

    from dgport.exporters.export import ExportOptions, export
    from models.fixtures import build_fixture

    with tempfile.TemporaryDirectory() as tmp:
        overrides = BENCH_SIZE if args.size == "bench" else {}
        ckpt = build_fixture(args.preset, Path(tmp) / "ckpt", **overrides)
        out = Path(tmp) / "export"
        export(ckpt, out, ExportOptions(formats=("mlx",), dtype=args.dtype, quantize=args.quantize, validate=False))
        mlx_res = _side(args, "mlx", str(out))
        hf_res = _side(args, "hf", str(ckpt))
    ratios = {k: mlx_res[k] / hf_res[k] for k in ("tokens_per_s", "ms_per_step", "ms_per_encode", "peak_rss_mb")
              if hf_res.get(k)}
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.system()} {platform.machine()}, "
              f"{os.cpu_count()} CPUs", "preset": args.preset, "size": args.size, "dtype": args.dtype,
              "quantize": args.quantize, "runs": args.runs, "mlx": mlx_res, "hf": hf_res, "mlx_over_hf": ratios}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    rows = [("generated tokens/s", "tokens_per_s", "{:.1f}"), ("ms per denoise step", "ms_per_step", "{:.2f}"),
            ("ms per encode", "ms_per_encode", "{:.2f}"), ("steps per canvas", "steps_per_canvas", "{:.2f}"),
            ("tokens per forward", "tokens_per_forward", "{:.2f}"), ("peak RSS (MB)", "peak_rss_mb", "{:.0f}")]
    print(f"{args.preset} ({args.size}), {args.dtype}{f', {args.quantize}-bit' if args.quantize else ''}, "
          f"{args.runs} runs, {report['machine']}; MLX device {mlx_res['device']}, "
          f"HF torch threads {hf_res['torch_threads']}")
    print(f"{'metric':24s} {'MLX':>10s} {'HF generate':>12s} {'MLX/HF':>8s}")
    for label, key, fmt in rows:
        r = ratios.get(key)
        print(f"{label:24s} {fmt.format(mlx_res[key]):>10s} {fmt.format(hf_res[key]):>12s} "
              f"{(f'{r:.2f}x' if r else ''):>8s}")
    print(f"MLX allocator peak: {mlx_res['mlx_peak_mb']:.1f} MB")


if __name__ == "__main__":
    main()
