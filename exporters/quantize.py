"""The one quantization scheme dgport writes (ONNX now; the MLX writer can share it): which tensors are
quantized to how many bits, how they are grouped, how the integers are packed.

Scheme ("affine-zp"): each group of `group_size` consecutive weights along a tensor's input dimension
(the last axis of the transformers layout [..., out, in]; the hidden axis of the embedding table) gets
  q = clip(round(w / s) + z, 0, 2^bits - 1),   w' = (q - z) * s
with an unsigned integer zero point z in [0, 2^bits - 1] (ONNX DequantizeLinear's uint4/uint8 form)
and a scale s rounded up to a bfloat16 value (every weight is within half a step of its value).
The range always includes 0 (z is then in range). A bf16
scale times an integer of at most 8 bits is exact in fp32, so `(q - z) * s` (ONNX) and `q * s + b`
with b = -z * s (MLX's affine form) are the same fp32 numbers, bit for bit.

Groups never straddle output channels, so quantizing a fused tensor (q/k/v side by side along the
output axis) equals quantizing its parts: the dequantized checkpoint the validation compares against
is built per transformers tensor.

What stays in higher precision (fp32 in the ONNX export): the router (it chooses the experts), every
norm, layer scalars and per-expert scales (0.01 % of the parameters). Int4 exports keep the
attention projections and the embedding table (input embedding, tied lm_head, self-conditioning
expectation) at 8 bits, as mlx-community's mixed 4-bit recipe does; chosen by measurement on the
shipped Sudoku model (100 held-out puzzles, 50-60 givens, group 64; fp32 46 % solved, 91.7 % of blank
cells right): everything but the embedding at 4 bits solved 39 % (90.6 %), 42 % with group 32; with
attention at 8 bits 47 % (91.9 %). On the 26B-A4B config that costs 0.57 GB (14.8 GB, `--plan`).
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from dgport.config import TextConfig
from dgport.errors import DgportError

from .checkpoint import DEC

GROUP_SIZES = (32, 64, 128)
SCHEME = "affine-zp"


def quantize(w, bits: int, group: int):
    """w [..., n] (any float dtype) -> (q uint8 [..., n], scale float32 [..., n/group] holding bf16
    values, zero point uint8 [..., n/group]); groups along the last axis."""
    w = np.asarray(w, dtype=np.float32)
    n = w.shape[-1]
    if n % group:
        raise DgportError(f"group size {group} does not divide the input width {n}")
    qmax = (1 << bits) - 1
    g = w.reshape(*w.shape[:-1], n // group, group)
    lo = np.minimum(g.min(axis=-1), 0.0)
    hi = np.maximum(g.max(axis=-1), 0.0)
    s = bf16_ceil((hi - lo) / qmax)  # rounded up: the grid spans the group's range
    s = np.where(s > 0, s, np.float32(1.0))  # an all-zero group: any scale, z = 0
    z = np.clip(np.rint(-lo / s), 0, qmax)
    q = np.clip(np.rint(g / s[..., None]) + z[..., None], 0, qmax)
    return q.reshape(w.shape).astype(np.uint8), s, z.astype(np.uint8)


def bf16_ceil(x) -> np.ndarray:
    """The smallest bfloat16 values >= x (x >= 0), as float32."""
    x = np.asarray(x, np.float32)
    b = np.atleast_1d(x.astype(ml_dtypes.bfloat16))
    bits = b.view(np.uint16)
    bits[np.atleast_1d(b.astype(np.float32) < x)] += 1
    return b.astype(np.float32).reshape(x.shape)


def dequantize(q, s, z, group: int) -> np.ndarray:
    """The exact fp32 values `(q - z) * s` of `quantize`'s output (groups along the last axis)."""
    q = np.asarray(q)
    g = q.reshape(*q.shape[:-1], q.shape[-1] // group, group).astype(np.float32)
    return ((g - np.asarray(z, np.float32)[..., None]) * np.asarray(s, np.float32)[..., None]).reshape(q.shape)


def pack4(q: np.ndarray) -> np.ndarray:
    """uint8 values < 16 [..., n] -> bytes [..., n/2], element 2j in the low nibble (ONNX's int4 order)."""
    q = np.asarray(q, np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack4(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, np.uint8)
    return np.stack([p & 15, p >> 4], axis=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def to_bf16(s: np.ndarray) -> np.ndarray:
    return np.asarray(s, np.float32).astype(ml_dtypes.bfloat16)


# ----------------------------------------------------------------------------------- which tensors


EIGHT_BIT_ROLES = ("embedding", "attention")


def quantized_tensors(cfg: TextConfig, bits: int) -> dict[str, tuple[str, int]]:
    """transformers tensor name -> (role, bits) for every tensor a `bits`-bit export quantizes.
    Every other text-model tensor stays in the export's float dtype. Attention and the embedding
    are 8-bit in either (EIGHT_BIT_ROLES)."""
    out = {f"{DEC}embed_tokens.weight": ("embedding", 8)}
    for part in ("gate_proj", "up_proj", "down_proj"):
        out[f"{DEC}self_conditioning.{part}.weight"] = ("self-conditioning MLP", bits)
    for i in range(cfg.num_layers):
        p = f"{DEC}layers.{i}."
        projs = ("q_proj", "k_proj", "v_proj", "o_proj") if cfg.is_sliding(i) else ("q_proj", "k_proj", "o_proj")
        for part in projs:
            out[f"{p}self_attn.{part}.weight"] = ("attention", 8)
        for part in ("gate_proj", "up_proj", "down_proj"):
            out[f"{p}mlp.{part}.weight"] = ("dense MLP", bits)
        out[f"{p}experts.gate_up_proj"] = ("experts", bits)
        out[f"{p}experts.down_proj"] = ("experts", bits)
    return out


DEFAULT_GROUPS = (64, 32)  # the default: 64, or 32 where 64 does not divide a quantized tensor's width


def choose_group(cfg: TextConfig, bits: int, requested: int | None) -> tuple[int, str | None]:
    """(the group size of the whole export, a line saying why when it is not the default's first
    choice). One rule for ONNX and MLX: the group size divides the input width of every quantized
    tensor. `requested` (--group-size) is used as given or refused, naming the tensor; without it the
    first of DEFAULT_GROUPS that divides every width."""
    if requested is not None:
        check(cfg, bits, requested)
        return requested, None
    from .checkpoint import expected_tensors

    widths = {name: expected_tensors(cfg)[name][-1] for name in quantized_tensors(cfg, bits)}
    for g in DEFAULT_GROUPS:
        if all(w % g == 0 for w in widths.values()):
            if g == DEFAULT_GROUPS[0]:
                return g, None
            name, width = next((n, w) for n, w in widths.items() if w % DEFAULT_GROUPS[0])
            return g, (f"quantization group size {g}: {DEFAULT_GROUPS[0]} does not divide the input width {width} "
                       f"of {name} (--group-size chooses)")
    check(cfg, bits, DEFAULT_GROUPS[-1])  # raises, naming the tensor
    raise AssertionError("check() accepted a group that divides no width")


def check(cfg: TextConfig, bits: int, group: int) -> None:
    """Refuse (one line, naming the tensor) a group size that does not divide a quantized tensor's
    input width, or an odd output width a 4-bit tensor cannot be packed along."""
    from .checkpoint import expected_tensors

    shapes = expected_tensors(cfg)
    for name, (_, b) in quantized_tensors(cfg, bits).items():
        shape = shapes[name]
        if shape[-1] % group:
            fits = [g for g in GROUP_SIZES if shape[-1] % g == 0]
            raise DgportError(f"--group-size {group}: does not divide the input width {shape[-1]} of {name}; "
                              + (f"choose --group-size {' or '.join(map(str, fits))}" if fits else
                                 "no supported group size divides it, so this model cannot be quantized"))
        if b == 4 and shape[-2] % 2:
            raise DgportError(f"--quantize int4: {name} has an odd output width {shape[-2]}, which 4-bit packing "
                              "cannot hold; use --quantize int8")


def tensor_bytes(shape, bits: int, group: int) -> int:
    """Bytes one quantized tensor takes in an ONNX export: integers and zero points (uint4, two a
    byte, at 4 bits; uint8 at 8) and bf16 scales."""
    n = math.prod(shape)
    groups = n // group
    zp = groups if bits == 8 else (groups + 1) // 2
    return (n * bits + 7) // 8 + 2 * groups + zp


def write_dequantized_checkpoint(ckpt, bits: int, group: int, out_dir) -> None:
    """The checkpoint with every tensor this scheme quantizes replaced by its dequantized values, all in
    fp32, as a transformers-loadable folder: what a quantized export must compute (tightly)."""
    import shutil
    from pathlib import Path

    from safetensors.numpy import save_file

    from .safetensors_np import SafetensorsFile
    from .checkpoint import weight_files

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quant = {name: (bits_, group) for name, (_, bits_) in quantized_tensors(ckpt.config, bits).items()}
    if getattr(ckpt, "vision", None) is not None:  # the ONNX vision graph's 8-bit blocks, if it has them (its
        from .onnx_vision import vision_quant     # "rows" form quantizes activations too: nothing to match)

        quant.update({name: (q.bits, q.group) for name, q in vision_quant(ckpt.vision.config, group).items()
                      if q.group is not None})
    for f in ckpt.path.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.endswith(".safetensors.index.json"):
            shutil.copy2(f, out_dir / f.name)
    tensors = {}
    for path in weight_files(ckpt.path):
        sf = SafetensorsFile(path)
        for name in sf.names:
            w = np.asarray(sf.tensor(name))
            if name in quant:
                b, g = quant[name]
                w = dequantize(*quantize(w, b, g), g)
            elif w.dtype.kind == "f" or w.dtype == ml_dtypes.bfloat16:
                w = w.astype(np.float32)
            tensors[name] = np.ascontiguousarray(w)
        sf.close()
    save_file(tensors, str(out_dir / "model.safetensors"))
    cfg = out_dir / "config.json"
    import json

    raw = json.loads(cfg.read_text())
    for d in (raw, raw.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            if key in d:
                d[key] = "float32"
    cfg.write_text(json.dumps(raw, indent=2))


def pack_mlx(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values [..., n] -> MLX's packed uint32 [..., n * bits / 32] (element j of a word at bit j * bits)."""
    per = 32 // bits
    q32 = np.asarray(q, np.uint32).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    out = np.zeros(q32.shape[:-1], np.uint32)
    for j in range(per):
        out |= q32[..., j] << np.uint32(bits * j)
    return out


def mlx_quantize(w, bits: int, group: int):
    """This scheme in MLX's affine form (packed uint32 weight, scales, biases = -z * s, float32) for
    mx.quantized_matmul / gather_qmm: mx.dequantize gives exactly `dequantize(*quantize(w))`."""
    q, s, z = quantize(w, bits, group)
    return pack_mlx(q, bits), s, -(z.astype(np.float32) * s)
