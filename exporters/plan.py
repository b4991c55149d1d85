"""`dgport export SRC --plan`: the ONNX export's size (and the MLX one's with --format mlx), computed from config.json alone (no weights
read, nothing written), and an estimate of a CPU-EP run's peak memory.

The weights file is exact up to alignment: every tensor the ONNX exporter stores (each transformers
tensor once, q/k/v and gate/up fused, plus (unquantized) the encoder's last layer's own k (and v) projection; in
a quantized export each quantized tensor, each expert on its own, as integers, bf16 scales and zero
points, exporters/quantize.py)
with its byte count, each tensor starting on a 64-byte boundary. The graphs (.onnx, a few hundred
KB) and tokenizer files are not counted.
"""
from __future__ import annotations

import math
from pathlib import Path

from dgport.config import TextConfig

from .checkpoint import DEC, expected_tensors, read_config
from .onnx_builder import ALIGN
from .onnx_head import VOCAB_CHUNK
from .onnx_vision import VISION_BITS, VISION_QUANT
from .plan_vision import read_vision_config, vision_plan
from .quantize import check, choose_group, quantized_tensors, tensor_bytes

ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
SAMPLER_ARRAYS = 5
HEAD_CHUNK_ARRAYS = 6  # [C, chunk] fp32 arrays of one streamed-head iteration (logits, proc, exp, ...)
# resident bytes per stored byte of a quantized export's weights once onnxruntime has packed them for
# MatMulNBits and freed the originals, by (bits, accuracy level): peak RSS after loading the
# real-geometry slice (0.94 / 1.74 GB of int4 / int8 weights) minus the interpreter and onnxruntime
# (75 MB), bench/RESULTS.md. Level 4 (int8 activations) keeps block sums beside the packed blocks.
PACKED_RSS = {(4, 4): 1.25, (4, 0): 1.14, (8, 4): 1.12, (8, 0): 1.06}
# the quantized tower's resident bytes per stored byte: 8-bit blocks as MatMulNBits packs them; int8 rows
# (MatMulInteger): onnxruntime prepacks the constant int8 weights for its GEMM, about their own size
VISION_PACKED = PACKED_RSS[VISION_BITS, 4] if VISION_QUANT == "blocks" else 1.0
FP32_SUFFIXES = ("layernorm.weight", "layernorm_1.weight", "layernorm_2.weight", "q_norm.weight", "k_norm.weight",
                 "norm.weight", "pre_norm.weight", "per_expert_scale")


def _role(name: str) -> str:
    for key, role in (("experts.", "experts"), ("self_attn.", "attention"), (".mlp.", "dense MLP"),
                      ("self_conditioning.", "self-conditioning MLP"), ("embed_tokens", "embedding"),
                      ("router.", "router")):
        if key in name and not name.endswith(("norm.weight",)):
            return role
    return "norms and scalars"


def stored_tensors(cfg: TextConfig, dtype: str, bits: int | None, group: int) -> list[tuple[str, str, int, int]]:
    """(transformers name, role, stored tensors, bytes) for everything the ONNX weights file holds."""
    shapes = expected_tensors(cfg)
    quant = quantized_tensors(cfg, bits) if bits else {}
    md = "fp32" if bits else dtype
    last = cfg.num_layers - 1
    # the encoder graph's last layer: K (and V) only (quantized exports have one graph, build_step)
    extra = [] if bits else [f"{DEC}layers.{last}.self_attn.k_proj.weight"]
    if extra and cfg.is_sliding(last):
        extra.append(f"{DEC}layers.{last}.self_attn.v_proj.weight")
    rows = []
    for name in list(shapes) + extra:
        shape = shapes[name]
        if name in quant:
            b = quant[name][1]
            if "experts." in name:  # one constant tensor per expert (three stored tensors each)
                E = shape[0]
                rows.append((name, quant[name][0], 3 * E, E * tensor_bytes(shape[1:], b, group)))
            else:
                rows.append((name, quant[name][0], 3, tensor_bytes(shape, b, group)))
        else:
            size = ITEMSIZE["fp32" if name.endswith(FP32_SUFFIXES) else md]
            rows.append((name, _role(name), 1, math.prod(shape) * size))
    return rows


def plan(src, opts) -> dict:
    """{"rows": [(component, bytes)], "weights_bytes": int, "padding_max": int, "rss": [(component, bytes)],
    "rss_bytes": int} for exporting the checkpoint (or config.json) at `src` to ONNX with `opts`."""
    src = Path(src)
    folder = src.parent if src.name == "config.json" else src
    cfg, _, raw = read_config(folder)
    bits = opts.quantize
    group = None
    if bits:
        group, _ = choose_group(cfg, bits, opts.group_size)
        check(cfg, bits, group)
    rows = stored_tensors(cfg, opts.dtype, bits, group)
    by_role: dict[str, int] = {}
    for _, role, _, nbytes in rows:
        by_role[role] = by_role.get(role, 0) + nbytes
    # each stored tensor starts on an ALIGN boundary; fused parts share stored tensors, so this bounds it
    weights = sum(n for *_, n in rows)
    padding_max = sum(k for _, _, k, _ in rows) * (ALIGN - 1)
    vision = None if getattr(opts, "text_only", False) else \
        vision_plan(folder, cfg, raw, opts.dtype, bits, group, VISION_PACKED)
    if vision is not None:  # vision.onnx's weights share weights.bin
        by_role["vision tower (vision.onnx)"] = vision["weights_bytes"]
        padding_max += vision["stored"] * (ALIGN - 1)
    # a CPU-EP run, canvas C. Unquantized: weights.bin memory-mapped and shared by both sessions.
    # Quantized (one step graph, one session): onnxruntime repacks every 4/8-bit weight for MatMulNBits
    # and frees the original (PACKED_RSS: the resident bytes per weights.bin byte, measured); the 8-bit
    # embedding stays as stored. The head: where the CPU's graphs compute in fp32 (fp32, bf16 and
    # quantized exports) it streams the vocabulary (onnx_head._streamed_head): the logits/T [C, V]
    # twice while its Loop stacks them, one fp32 chunk of the table and a few [C, chunk] arrays; fp16
    # exports run the whole-array head: ~5 [C, V] fp32 arrays live at once (measured: a canvas-256 step
    # of a 131,072-token vocabulary raised peak RSS by 5.1 such arrays).
    V, H, C = cfg.vocab_size, cfg.hidden_size, cfg.canvas_length
    chunk = min(VOCAB_CHUNK, V)
    if bits or opts.dtype in ("fp32", "bf16"):
        head = [("streamed head: logits [canvas, V] fp32, x2 while stacked", 2 * C * V * 4),
                ("streamed head: one fp32 chunk of the table + its arrays",
                 chunk * H * 4 + HEAD_CHUNK_ARRAYS * C * chunk * 4)]
    else:
        head = [("sampler's vocabulary-wide arrays (~5 x [canvas, V] fp32)", SAMPLER_ARRAYS * C * V * 4)]
    if bits:
        emb = by_role.get("embedding", 0)
        rss, rss_by_level = {}, {}
        for level in (4, 0):
            rss[level] = [(f"weights packed for MatMulNBits ({PACKED_RSS[bits, level]:g} x stored)",
                           round(PACKED_RSS[bits, level] * (weights - emb))),
                          ("8-bit embedding table (input rows, the head's chunks)", emb)] + head
            rss_by_level[level] = sum(n for _, n in rss[level])
        rss_rows, rss_total = rss[4], rss_by_level[4]
    else:
        rss_rows = [("weights.bin, memory-mapped", weights)] + head
        rss_total, rss_by_level = sum(n for _, n in rss_rows), None
    if vision is not None:  # what the first image adds: its session's weights and its activations
        vision["image_bytes"] = rss_total + vision["resident_bytes"] + vision["activation_bytes"]
    return {"config": cfg, "group": group, "rows": sorted(by_role.items(), key=lambda kv: -kv[1]),
            "weights_bytes": weights + (vision["weights_bytes"] if vision else 0), "vision": vision, "src": folder,
            "padding_max": padding_max, "rss": rss_rows, "rss_bytes": rss_total, "rss_by_level": rss_by_level}


MLX_QUANTIZED = ("_proj.weight", "embed_tokens.weight", "experts.gate_up_proj", "experts.down_proj")


def plan_mlx(src, opts) -> dict:
    """{"rows": [(role, bytes)], "weights_bytes": int} of an MLX export (exporters/mlx_export.py): every
    tensor in the export dtype; with --quantize, the projections, experts and embedding as MLX affine
    integers (attention and the embedding at 8 bits in 4-bit exports) with a scale and a bias per group
    in the export dtype. Safetensors headers are not counted."""
    src = Path(src)
    folder = src.parent if src.name == "config.json" else src
    cfg, _, raw = read_config(folder)
    item = ITEMSIZE[opts.dtype]
    group = choose_group(cfg, opts.quantize, opts.group_size)[0] if opts.quantize else None
    by_role: dict[str, int] = {}
    for name, shape in expected_tensors(cfg).items():
        n = math.prod(shape)
        if opts.quantize and name.endswith(MLX_QUANTIZED) and ".router." not in name:
            bits = 8 if name.endswith("embed_tokens.weight") or ".self_attn." in name else opts.quantize
            nbytes = n * bits // 8 + 2 * (n // group) * item
        else:
            nbytes = n * item
        by_role[_role(name)] = by_role.get(_role(name), 0) + nbytes
    vc = None if getattr(opts, "text_only", False) else \
        read_vision_config(raw, cfg.hidden_size, cfg.vocab_size, str(folder / "config.json"))
    vision = None
    if vc is not None:  # mlx/vision.safetensors: the tower unquantized, in the export dtype
        from .plan_vision import activations, max_patches, mlx_bytes

        soft, P = max_patches(folder)
        by_role["vision tower (mlx/vision.safetensors)"] = mlx_bytes(vc, opts.dtype)
        vision = {"soft_tokens": soft, "patches": P, "activations": activations(vc, P)}
    return {"group": group, "rows": sorted(by_role.items(), key=lambda kv: -kv[1]),
            "weights_bytes": sum(by_role.values()), "vision": vision}


def size(n: int) -> str:
    """Bytes for a person: the unit that keeps 1-3 digits before the point."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _what(p: dict, opts) -> str:
    return f"int{opts.quantize} group {p['group']}" if opts.quantize else opts.dtype


def format_plan(p: dict, opts) -> str:
    lines = [f"ONNX export plan ({_what(p, opts)}), from config.json; nothing written"]
    for role, n in p["rows"]:
        lines.append(f"  {role:<40} {size(n):>10}")
    lines.append(f"  {'weights.bin':<40} {size(p['weights_bytes']):>10}  ({p['weights_bytes']} bytes "
                 f"+ at most {p['padding_max']} bytes of alignment)")
    lines.append("CPU-EP run, estimated peak resident memory" +
                 (" (MatMulNBits accuracy level 4, dgport's default):" if p["rss_by_level"] else ":"))
    for what_, n in p["rss"]:
        lines.append(f"  {what_:<56} {size(n):>10}")
    lines.append(f"  {'total':<56} {size(p['rss_bytes']):>10} (+ activations and onnxruntime itself)")
    if p["rss_by_level"]:
        lines.append(f"  {'total at accuracy level 0 (fp32 activations, ~2x slower)':<56} "
                     f"{size(p['rss_by_level'][0]):>10} (DGPORT_ORT_ACCURACY_LEVEL=0)")
    v = p.get("vision")
    if v is not None:
        lines.append(f"With an image (the vision graph's session opens at the first one; one image at "
                     f"{v['soft_tokens']} soft tokens, {v['patches']:,} patches; the tower computes in fp32):")
        what = (f"vision weights, resident (int8, packed {VISION_PACKED:g} x)" if opts.quantize
                else "vision weights, memory-mapped")
        for w, n in [(what, v["resident_bytes"])] + v["activations"]:
            lines.append(f"  {w:<56} {size(n):>10}")
        lines.append(f"  {'total with an image':<56} {size(v['image_bytes']):>10}")
        lines += precision_table(p["src"])
    return "\n".join(lines)


PRECISIONS = (("fp32", "fp32", None), ("bf16", "bf16", None), ("int8", "fp32", 8), ("int4", "fp32", 4))


def precisions(src) -> list[tuple[str, dict]]:
    """(precision, plan) of the ONNX export at fp32, bf16, int8 and int4 (default group sizes); a
    precision the config cannot be quantized to is left out."""
    from types import SimpleNamespace

    from dgport.errors import DgportError

    out = []
    for label, dtype, bits in PRECISIONS:
        try:
            out.append((label, plan(src, SimpleNamespace(dtype=dtype, quantize=bits, group_size=None))))
        except DgportError:
            pass
    return out


def precision_table(src) -> list[str]:
    """The memory plan with vision at every precision: weights.bin, the vision graph's share, a CPU run's
    estimated peak for text and with one image at the default detail."""
    lines = ["At each precision (ONNX, CPU EP; peaks estimated as above):",
             f"  {'':<6} {'weights.bin':>12} {'of it vision':>13} {'vision act.':>12} {'text peak':>11} {'with an image':>14}"]
    for label, q in precisions(src):
        v = q["vision"]
        lines.append(f"  {label:<6} {size(q['weights_bytes']):>12} {size(v['weights_bytes']):>13} "
                     f"{size(v['activation_bytes']):>12} {size(q['rss_bytes']):>11} {size(v['image_bytes']):>14}")
    return lines


def format_plan_mlx(p: dict, opts) -> str:
    lines = [f"MLX export plan ({_what(p, opts)}), from config.json; nothing written"]
    for role, n in p["rows"]:
        lines.append(f"  {role:<40} {size(n):>10}")
    lines.append(f"  {'mlx/*.safetensors':<40} {size(p['weights_bytes']):>10}  (MLX loads the weights once: "
                 "about this much memory, + activations)")
    v = p.get("vision")
    if v is not None:
        lines.append(f"  {'an image: activation peak':<40} {size(sum(n for _, n in v['activations'])):>10}  "
                     f"({v['soft_tokens']} soft tokens, {v['patches']:,} patches; the tower unquantized)")
    return "\n".join(lines)
