"""The vision tower, image to soft tokens: dgport's vision graph (ONNX Runtime CPU) against transformers
fp32 (Gemma4VisionModel + the multimodal embedder), side by side, at the real vision geometry.

    python -m bench.bench_vision                       # 27 layers, one 480x640 image, 2 threads
    python -m bench.bench_vision --layers 4 --rounds 3 --json out.json
    python -m bench.bench_vision --layers 3 --forms explicit,fused,fused+int8,fused+blocks8,fused+blocks4

Each --forms entry is one vision graph: its attention form ("explicit": MatMul, Softmax, MatMul;
"fused": one opset-23 Attention node a layer), optionally with its encoder linears quantized
(exporters/onnx_vision.py vision_quant): +int8 the rows form (int8 activations per patch, int8 weights
per column, MatMulInteger), +blocks8 / +blocks4 8- or 4-bit blocks of 64 (MatMulNBits, accuracy level 4).
For the whole image-to-answer path (generate through the Python API): bench/bench_vision_e2e.py.

Random weights at the real geometry (width 1152, 16 heads of 72, MLP 4304, patch 16, pooling 3,
280 soft tokens at most, the 10,240-row position table, standardization), the text width 2816. The
image goes through dgport.images (equal to transformers' processor), then each side runs the tower on the
same patches, alternating, --rounds times after one warm-up each; medians. Reported: seconds per image,
the ratio, the soft tokens' max relative error and cosine similarity against transformers, peak RSS.
Prints the CPU's VNNI/BF16 flags."""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .bench_batch import cpu_flags

REAL = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_key_value_heads=16, head_dim=72,
            patch_size=16, pooling_kernel_size=3, position_embedding_size=10240, standardize=True)


def tower_arguments(ap: argparse.ArgumentParser) -> None:
    """The options both vision benches take: the tower's depth, the image, threads and rounds."""
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--size", default="480x640", help="the image's HxW")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tower_arguments(ap)
    ap.add_argument("--forms", default="fused", help="comma-separated vision graphs to time (see above)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import torch
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_onnx_vision import hf_tower, onnx_session  # the test's builders: one recipe for both

    from dgport.images import ImageSettings, preprocess

    torch.set_num_threads(args.threads)
    h, w = (int(x) for x in args.size.split("x"))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    p = preprocess(img, ImageSettings())
    pv, pos = p.pixel_values[None], p.positions[None]
    print(f"vision tower: {args.layers} layers at the real width, a {h}x{w} image -> {int((pos[0, :, 0] >= 0).sum())} "
          f"patches, {p.soft_tokens} soft tokens; {args.threads} threads; CPU flags: {cpu_flags()}", flush=True)
    cfg, tower, emb, tensors = hf_tower(3, 2816, num_hidden_layers=args.layers, **REAL)
    forms = args.forms.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for form in forms:
            attention, _, quant = form.partition("+")
            (Path(tmp) / form).mkdir()
            bits = int(quant[-1]) if quant else None
            sessions[form] = onnx_session(cfg, 2816, tensors, Path(tmp) / form, attention, 64 if quant else None,
                                          bits, "blocks" if quant.startswith("blocks") else "rows")
        del tensors

        def run_hf():
            with torch.no_grad():
                return emb(tower(torch.from_numpy(pv), torch.from_numpy(pos)).last_hidden_state).numpy()

        def runner(sess):
            return lambda: sess.run(None, {"pixel_values": pv, "pixel_position_ids": pos})[0][0, :p.soft_tokens]

        fns = [("transformers", run_hf)] + [(f, runner(s)) for f, s in sessions.items()]
        times = {name: [] for name, _ in fns}
        out = {name: fn() for name, fn in fns}  # warm-up
        for r in range(args.rounds):
            for name, fn in fns[:: 1 if r % 2 == 0 else -1]:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    ref = out["transformers"]
    hf_s = statistics.median(times["transformers"])
    report = {"layers": args.layers, "image": args.size, "threads": args.threads, "cpu_flags": cpu_flags(),
              "transformers_s": hf_s, "forms": {}, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "attn_implementation": tower.config._attn_implementation, "onnxruntime": ort.__version__,
              "torch": torch.__version__}
    print(f"transformers fp32 ({report['attn_implementation']}): {hf_s:.2f} s")
    fp32 = next((out[f] for f in forms if "+" not in f), None)
    for form in forms:
        got, s = out[form], statistics.median(times[form])
        err = float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())
        cos = cosine(got, ref)
        report["forms"][form] = {"seconds": s, "speedup": hf_s / s, "max_rel_err": err, "cosine": cos,
                                 "cosine_vs_fp32": None if fp32 is None else cosine(got, fp32)}
        print(f"dgport ONNX {form:<14} {s:6.2f} s   speed-up {hf_s / s:.2f}x   max rel err {err:.2e}   cosine {cos:.6f}"
              + ("" if fp32 is None else f" (to dgport fp32 {report['forms'][form]['cosine_vs_fp32']:.6f})"))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def cosine(a, b) -> float:
    """Mean cosine similarity of two [..., H] arrays' rows."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


if __name__ == "__main__":
    sys.exit(main())
