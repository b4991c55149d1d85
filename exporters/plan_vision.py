"""The vision tower's part of `dgport export --plan`: the bytes the vision graph stores (exactly the tensors
exporters/onnx_vision.py writes: q/k/v and gate/up side by side, the position table split in its x and y
halves, norms in the export dtype, standardization and clip bounds in fp32; in quantized exports the
encoder layers' linears as int8, `vision_quant`), the MLX tower's, and the activation peak of
one image at the checkpoint's max_soft_tokens, all from config.json (and the processor config, if the
folder has one) alone.

The activation peak is the attention step of a layer, where the graph holds the scores and their
softmax ([heads, P, P] fp32 each, both live in the spelled-out form; onnxruntime's Attention kernel
keeps as much) beside about ten [P, width] fp32 arrays (the residual, q, k, v with their rotary
copies, the mask). Measured at the real geometry (2,520 patches, width 1152, 16 heads; 2026-12-06):
0.96 GB (explicit) and 1.06 GB (Attention node) of peak RSS over the loaded session; the estimate
says 0.93 GB. The tower's session opens at the first image, so text-only prompts never pay it."""
from __future__ import annotations

import math
from pathlib import Path

from dgport.vision_config import VisionConfig, expected_vision_tensors

from .onnx_vision import VISION_BITS, vision_quant
from .quantize import tensor_bytes

ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
FP32 = ("std_bias", "std_scale", "input_min", "input_max", "output_min", "output_max")
LAYER_ARRAYS = 10  # [P, width] fp32 arrays live beside the attention scores (module docstring)
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def read_vision_config(raw: dict, text_hidden: int, vocab_size: int, where: str) -> VisionConfig | None:
    """The config's vision tower, as the export reads it (exporters/checkpoint.py read_vision, without
    the weights): none without vision_config, or with image token ids outside the vocabulary."""
    vision = raw.get("vision_config")
    if vision is None:
        return None
    ids = [raw.get(k, d) for k, d in (("image_token_id", 258880), ("boi_token_id", 255999), ("eoi_token_id", 258882))]
    if any(not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab_size for v in ids):
        return None
    return VisionConfig.from_hf(vision, text_hidden, where)


def max_patches(folder: Path) -> tuple[int, int]:
    """(max_soft_tokens, patches) of one image at the checkpoint's default detail."""
    from dgport.images import ImageSettings

    s = ImageSettings.from_folder(folder) if (folder / "processor_config.json").exists() or \
        (folder / "preprocessor_config.json").exists() else ImageSettings()
    return s.max_soft_tokens, s.max_patches


def onnx_tensors(vc: VisionConfig, dtype: str, bits: int | None, group: int | None) -> list[tuple[str, int, int]]:
    """(stored name, stored tensors, bytes) of the vision graph's weights in an ONNX export (`bits`:
    the export's quantization, None for float exports; quantized exports keep the rest in fp32)."""
    md = "fp32" if bits else dtype
    shapes = expected_vision_tensors(vc)
    quant = vision_quant(vc, group) if bits else {}
    fused = not vc.clipped_linears
    rows, done = [], set()
    for name, shape in shapes.items():
        if name in done:
            continue
        parts = [name]
        if fused and name.endswith("linear.weight"):
            for group_ in FUSED:
                head = f".{group_[0]}.linear.weight"
                if name.endswith(head):
                    stem = name[: -len(head)]
                    parts = [f"{stem}.{p}.linear.weight" for p in group_]
        done.update(parts)
        n_out, n_in = sum(shapes[p][0] for p in parts), shape[-1] if shape else 1
        if name in quant and quant[name].group is None:  # int8 rows: int8 weights and an fp32 scale a column
            rows.append((name, 2, n_out * n_in + 4 * n_out))
        elif name in quant:
            rows.append((name, 3, tensor_bytes((n_out, n_in), VISION_BITS, quant[name].group)))
        elif name.endswith("position_embedding_table"):  # stored as its x and its y half
            rows.append((name, 2, math.prod(shape) * ITEMSIZE[md]))
        else:
            size = ITEMSIZE["fp32" if name.endswith(FP32) else md]
            rows.append((name, 1, math.prod((n_out,) + tuple(shape[1:])) * size if shape else size))
    return rows


def mlx_bytes(vc: VisionConfig, dtype: str) -> int:
    """mlx/vision.safetensors: every tensor by its transformers name, in the export dtype (the bounds and
    the standardization in fp32), never quantized."""
    return sum(math.prod(s) * ITEMSIZE["fp32" if n.endswith(FP32) else dtype]
               for n, s in expected_vision_tensors(vc).items())


def activations(vc: VisionConfig, patches: int) -> list[tuple[str, int]]:
    """The tower's activation peak for one image of `patches` patches (fp32 compute on every dtype)."""
    P, heads = patches, vc.num_heads
    return [(f"attention scores + softmax, 2 x {heads} x {P:,}^2 fp32", 2 * heads * P * P * 4),
            (f"~{LAYER_ARRAYS} [{P:,}, {vc.hidden_size}] fp32 arrays of the layer", LAYER_ARRAYS * P * vc.hidden_size * 4)]


def vision_plan(src: Path, cfg, raw: dict, dtype: str, bits: int | None, group: int | None, packed: float) -> dict | None:
    """The `vision` part of exporters/plan.py's plan: {"config", "soft_tokens", "patches", "weights_bytes",
    "stored", "activations": [(what, bytes)], "resident_bytes"}; None for a text-only config. `packed`:
    resident bytes per stored byte once onnxruntime has repacked the 8-bit blocks (quantized exports)."""
    vc = read_vision_config(raw, cfg.hidden_size, cfg.vocab_size, str(src / "config.json"))
    if vc is None:
        return None
    soft, P = max_patches(src)
    rows = onnx_tensors(vc, dtype, bits, group)
    weights = sum(n for *_, n in rows)
    quantized = sum(n for name, _, n in rows if bits and name in vision_quant(vc, group))
    act = activations(vc, P)
    return {"config": vc, "soft_tokens": soft, "patches": P, "weights_bytes": weights,
            "stored": sum(k for _, k, _ in rows), "activations": act, "activation_bytes": sum(n for _, n in act),
            "resident_bytes": round(weights - quantized + packed * quantized), "mlx_bytes": mlx_bytes(vc, dtype)}
