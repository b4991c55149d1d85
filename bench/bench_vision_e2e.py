"""One image to an answer: `dgport.load(export, backend="cpu").generate(prompt, images=[img])` on the fp32
and the `--quantize int8` ONNX exports against transformers fp32's own generate (its image processor's
pixel values), at the real vision geometry with a tiny text model, so the tower dominates.

    python -m bench.bench_vision_e2e                           # 27 layers, one 480x640 image, 2 threads
    python -m bench.bench_vision_e2e --layers 4 --rounds 1 --work /tmp/bv4

Random weights at the real vision geometry (width 1152, 16 heads of 72, MLP 4304, patch 16, pooling 3,
280 soft tokens at most, the 10,240-row position table, standardization) under the 'vision' fixture's
text model (models/fixtures.py). The checkpoint and the two exports are built once into --work. Each
run is a fresh process (one side, one generate, after loading; dgport opens its vision session
beforehand on a 9-patch image, so both sides time the tower's run, not its load); the sides
alternate, --rounds times; medians. Reported per side: seconds of the generate call, load seconds,
peak RSS of the process, the answer's tokens; the soft tokens' cosine similarity of int8 to fp32 and
fp32's max relative error to transformers (tower + embedder on transformers' pixel values)."""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .bench_batch import cpu_flags
from .bench_vision import REAL, cosine, tower_arguments

PROMPT = "What is in this picture?"
SIDES = ("dgport-fp32", "transformers", "dgport-int8")


def image(size: str):
    from PIL import Image

    h, w = (int(x) for x in size.split("x"))
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def build(work: Path, layers: int) -> tuple[Path, Path, Path]:
    """(checkpoint, fp32 export, int8 export), built on first use."""
    from dgport.exporters.export import ExportOptions, export
    from dgport.models.fixtures import build_fixture

    ckpt, fp32, int8 = work / "ckpt", work / "onnx-fp32", work / "onnx-int8"
    vision = {k: v for k, v in REAL.items()} | {"num_hidden_layers": layers}
    if not (ckpt / "config.json").exists():
        t = time.perf_counter()
        build_fixture("vision", ckpt, vision=vision,
                      image_processor=dict(patch_size=16, pooling_kernel_size=3, max_soft_tokens=280))
        print(f"checkpoint built in {time.perf_counter() - t:.0f} s", flush=True)
    for out, opts in ((fp32, ExportOptions(validate=False)), (int8, ExportOptions(quantize=8, validate=False))):
        if not (out / "dgport.json").exists():
            t = time.perf_counter()
            export(ckpt, out, opts)
            print(f"{out.name} exported in {time.perf_counter() - t:.0f} s", flush=True)
    return ckpt, fp32, int8


def child(side: str, work: Path, size: str, threads: int) -> dict:
    """One side's run in this (fresh) process."""
    img = image(size)
    cfg = json.loads((work / "ckpt" / "config.json").read_text())
    t = time.perf_counter()
    if side == "transformers":
        import torch
        from transformers import DiffusionGemmaForBlockDiffusion
        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from hf_reference import hf_generate

        torch.set_num_threads(threads)
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(work / "ckpt", use_safetensors=True).eval()
        prompt_ids = json.loads((work / "prompt_ids.json").read_text())
        feats = Gemma4ImageProcessorPil(patch_size=16, pooling_kernel_size=3, max_soft_tokens=280)([img],
                                                                                                    return_tensors="pt")
        ids = torch.tensor([prompt_ids])
        load = time.perf_counter() - t
        t = time.perf_counter()
        tokens, _ = hf_generate(model, prompt_ids, 0, pixel_values=feats["pixel_values"],
                                image_position_ids=feats["image_position_ids"],
                                mm_token_type_ids=(ids == cfg["image_token_id"]).long())
        seconds = time.perf_counter() - t
        with torch.no_grad():
            enc = model.model.encoder
            soft = enc.embed_vision(enc.vision_tower(feats["pixel_values"], feats["image_position_ids"]).last_hidden_state)
        np.save(work / f"{side}.npy", soft.numpy().reshape(-1, soft.shape[-1]))
    else:
        import dgport
        from dgport.images import preprocess

        gen = dgport.load(work / f"onnx-{side.split('-')[1]}", backend="cpu", threads=threads)
        settings = gen.backend.vision.image
        small = preprocess(image("48x48"), settings.with_soft_tokens(70))  # opens the vision session
        gen.backend.encode_images(small.pixel_values[None], small.positions[None])
        load = time.perf_counter() - t
        t = time.perf_counter()
        res = gen.generate(PROMPT, images=[img], seed=0)
        seconds = time.perf_counter() - t
        tokens, prompt_ids = res.token_ids[0], res.prompt_ids
        if side == "dgport-fp32":
            (work / "prompt_ids.json").write_text(json.dumps(list(prompt_ids)))
        p = preprocess(img, settings)
        soft = gen.backend.encode_images(p.pixel_values[None], p.positions[None])[0, :p.soft_tokens]
        np.save(work / f"{side}.npy", soft)
    return {"side": side, "seconds": seconds, "load_s": load, "tokens": list(map(int, tokens)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tower_arguments(ap)
    ap.add_argument("--work", default="/tmp/dgport-bench-vision", help="checkpoint and exports (kept)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = Path(args.work) / f"layers{args.layers}"
    if args.child:
        print(json.dumps(child(args.child, work, args.size, args.threads)))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    build(work, args.layers)
    print(f"image to answer: {args.layers}-layer tower at the real width, a {args.size} image, {args.threads} threads; "
          f"CPU flags: {cpu_flags()}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for r in range(args.rounds):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        if r == 0 and not (work / "prompt_ids.json").exists():
            order = SIDES  # transformers reads the prompt dgport built
        for side in order:
            out = subprocess.run([sys.executable, "-m", "bench.bench_vision_e2e", "--child", side, "--layers",
                                  str(args.layers), "--size", args.size, "--threads", str(args.threads),
                                  "--work", args.work], env=env, capture_output=True, text=True,
                                 cwd=Path(__file__).resolve().parent.parent)
            if out.returncode:
                sys.stderr.write(out.stderr)
                return 1
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[side].append(res)
            print(f"  round {r}: {side:<13} {res['seconds']:7.2f} s (load {res['load_s']:.1f} s)  "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    med = {s: statistics.median(x["seconds"] for x in runs[s]) for s in SIDES}
    soft = {s: np.load(work / f"{s}.npy") for s in SIDES}
    ref = soft["transformers"]
    report = {"layers": args.layers, "image": args.size, "threads": args.threads, "cpu_flags": cpu_flags(),
              "seconds": med, "speedup_fp32": med["transformers"] / med["dgport-fp32"],
              "speedup_int8": med["transformers"] / med["dgport-int8"],
              "same_tokens_fp32": all(x["tokens"] == runs["transformers"][0]["tokens"] for x in runs["dgport-fp32"]),
              "same_tokens_int8": all(x["tokens"] == runs["transformers"][0]["tokens"] for x in runs["dgport-int8"]),
              "cosine_int8_vs_fp32": cosine(soft["dgport-int8"], soft["dgport-fp32"]),
              "fp32_max_rel_err_vs_transformers": float(np.abs(soft["dgport-fp32"] - ref).max() / np.abs(ref).max()),
              "peak_rss_mb": {s: max(x["peak_rss_mb"] for x in runs[s]) for s in SIDES},
              "load_s": {s: statistics.median(x["load_s"] for x in runs[s]) for s in SIDES}}
    print(f"transformers fp32 {med['transformers']:.2f} s   dgport fp32 {med['dgport-fp32']:.2f} s "
          f"({report['speedup_fp32']:.2f}x, same tokens: {report['same_tokens_fp32']})   dgport int8 "
          f"{med['dgport-int8']:.2f} s ({report['speedup_int8']:.2f}x, soft-token cosine to fp32 "
          f"{report['cosine_int8_vs_fp32']:.6f}, same tokens: {report['same_tokens_int8']})")
    print(f"fp32 soft tokens' max rel err to transformers {report['fp32_max_rel_err_vs_transformers']:.2e}; peak RSS MB "
          + ", ".join(f"{s} {v:.0f}" for s, v in report["peak_rss_mb"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
