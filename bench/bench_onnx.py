"""ONNX Runtime backend vs transformers generate, side by side on one machine and settings.

    python -m bench.bench_onnx                      # fixture 'tiny' (built into a temp folder)
    python -m bench.bench_onnx --preset long-context --threads 2
    python -m bench.bench_onnx --checkpoint PATH    # any HF DiffusionGemma checkpoint
    python -m bench.bench_onnx --device cuda --dtype bf16 --preset real-slice   # both sides on the GPU

Each side runs in its own subprocess (so peak RSS is its own): generated tokens/s, ms per denoise
step, ms per encode, steps per canvas, tokens per forward, peak memory; then the ratios.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = [2, 105, 300, 301, 302, 303, 304, 305, 106, 107]


def _peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss survives exec on Linux and would report the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __init__(self, sync=None):
        self.encode, self.denoise = [], []
        self.sync = sync or (lambda: None)  # waits for the device, so a call's time includes its kernels

    def wrap(self, obj, name, bucket):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            self.sync()
            bucket.append(time.perf_counter() - t)
            return out
        setattr(obj, name, timed)


def _stats(timer, wall, tokens, steps, tpf, label, runs):
    return {
        "side": label, "runs": runs, "generated_tokens": tokens, "seconds": wall,
        "tokens_per_s": tokens / wall,
        "ms_per_denoise_step": 1e3 * sum(timer.denoise) / max(len(timer.denoise), 1),
        "ms_per_encode": 1e3 * sum(timer.encode) / max(len(timer.encode), 1),
        "steps_per_canvas": steps, "tokens_per_forward": tpf,
        "peak_rss_mb": _peak_rss_mb(),
    }


def side_ort(export_dir, threads, runs, max_new, device):
    import dgport

    gen = dgport.load(export_dir, backend=device, threads=threads)
    gen.generate(PROMPT, seed=99, max_new_tokens=max_new)  # warm-up
    timer = Timer()
    timer.wrap(gen.backend, "encode", timer.encode)
    timer.wrap(gen.backend, "denoise", timer.denoise)
    pad = gen.defaults.pad_token_id
    tokens, steps, tpf = 0, [], []
    t = time.perf_counter()
    for s in range(runs):
        r = gen.generate(PROMPT, seed=s, max_new_tokens=max_new)
        tokens += sum(1 for x in r.token_ids[0] if x != pad)
        steps += r.steps_per_canvas
        tpf.append(r.tokens_per_forward)
    wall = time.perf_counter() - t
    return _stats(timer, wall, tokens, sum(steps) / len(steps), sum(tpf) / len(tpf), f"onnxruntime-{device}", runs)


def side_hf(ckpt, threads, runs, max_new, device, dtype):
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt, dtype=dtype, use_safetensors=True).to(device).eval()
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # as dgport's CUDA EP sessions
    ids = torch.tensor([PROMPT], device=device)
    max_new = max_new or model.generation_config.max_new_tokens
    with torch.no_grad():
        model.generate(ids, max_new_tokens=max_new)  # warm-up
        timer = Timer(torch.cuda.synchronize if device == "cuda" else None)
        timer.wrap(model.model.encoder, "forward", timer.encode)
        timer.wrap(model, "forward", timer.denoise)
        pad = model.generation_config.pad_token_id or 0
        tokens, steps, tpf = 0, [], []
        t = time.perf_counter()
        for s in range(runs):
            torch.manual_seed(s)
            n_dec = len(timer.denoise)
            out = model.generate(ids, max_new_tokens=max_new)
            new = out.sequences[0, ids.shape[1]:].tolist()
            tokens += sum(1 for x in new if x != pad)
            canvases = len(new) // model.config.canvas_length
            steps.append((len(timer.denoise) - n_dec) / max(canvases, 1))
            tpf.append(float(out.tokens_per_forward[0]))
        wall = time.perf_counter() - t
    return _stats(timer, wall, tokens, sum(steps) / len(steps), sum(tpf) / len(tpf), "transformers", runs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="both sides run here")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="export and reference dtype")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--side", choices=["ort", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--export", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.side == "ort":
        print(json.dumps(side_ort(a.export, a.threads, a.runs, a.max_new_tokens, a.device)))
        return
    if a.side == "hf":
        print(json.dumps(side_hf(a.checkpoint, a.threads, a.runs, a.max_new_tokens, a.device, a.dtype)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.checkpoint
        if ckpt is None:
            from models.fixtures import build_fixture

            ckpt = str(build_fixture(a.preset, Path(tmp) / "ckpt"))
        from dgport.exporters.export import ExportOptions, export

        exp = Path(tmp) / "onnx"
        export(ckpt, exp, ExportOptions(dtype=a.dtype, validate=False))
        common = ["--threads", str(a.threads), "--runs", str(a.runs), "--checkpoint", ckpt,
                  "--device", a.device, "--dtype", a.dtype] + (
            ["--max-new-tokens", str(a.max_new_tokens)] if a.max_new_tokens else [])
        res = {}
        for side in ("ort", "hf"):
            p = subprocess.run([sys.executable, "-m", "bench.bench_onnx", "--side", side, "--export", str(exp)]
                               + common, capture_output=True, text=True, check=True)
            res[side] = json.loads(p.stdout.strip().splitlines()[-1])
    o, h = res["ort"], res["hf"]
    keys = ["tokens_per_s", "ms_per_denoise_step", "ms_per_encode", "steps_per_canvas", "tokens_per_forward",
            "peak_rss_mb"]
    print(f"checkpoint: {a.checkpoint or 'fixture ' + a.preset}, device {a.device}, dtype {a.dtype}, "
          f"threads {a.threads}, runs {a.runs}")
    print(f"{'metric':24s}{'onnxruntime-' + a.device:>18s}{'transformers':>16s}{'ort/hf':>10s}")
    for k in keys:
        print(f"{k:24s}{o[k]:18.3f}{h[k]:16.3f}{o[k] / h[k] if h[k] else float('nan'):10.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
