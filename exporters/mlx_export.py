"""MLX exporter: a checkpoint's text weights as MLX safetensors for `runtimes/mlx_model.py`.

Layout (entry["layout"] == "dgport-mlx/1"), under `mlx/` in the export folder:
  mlx/globals.safetensors      embed_tokens (input embedding = tied lm_head), norm, self_conditioning
  mlx/layer-{i:03d}.safetensors one file per layer (memory stays at one layer while exporting):
      layers.{i}.self_attn.{q,k,v,o}_proj.weight (no v_proj on full layers), q_norm, k_norm,
      layers.{i}.{input,post_attention,pre_feedforward,post_feedforward}_layernorm.weight,
      layers.{i}.{pre_feedforward_layernorm_2,post_feedforward_layernorm_1,post_feedforward_layernorm_2}.weight,
      layers.{i}.mlp.{gate,up,down}_proj.weight, layers.{i}.router.{proj.weight,scale,per_expert_scale},
      layers.{i}.experts.gate_up_proj.weight [E, 2M, H], layers.{i}.experts.down_proj.weight [E, H, M]
          (stacked for mx.gather_mm / mx.gather_qmm),
      layers.{i}.layer_scalar (decoder scalar), layers.{i}.encoder_layer_scalar (encoder scalar).
All tensors are cast to the export dtype. With --quantize 4|8 every projection, the stacked
experts, the self-conditioning MLP and the embedding table (also the tied lm_head and the
self-conditioning expectation p @ E; it and attention stay 8-bit in 4-bit exports) are affine-quantized in MLX's layout
(`<name>.weight` packed uint32, `<name>.scales`, `<name>.biases`) with the scheme ONNX exports use
(exporters/quantize.py: bf16-valued scales, biases = -zero_point * scale), so in fp32 exports both
formats dequantize to the same numbers bit for bit; norms, scalars and the router stay in the export dtype
(the router decides which experts run: it is 0.01 % of the weights). One group size serves every
quantized tensor, as in ONNX (quantize.choose_group).

  mlx/vision.safetensors       (checkpoints with a vision tower, unless --text-only; entry["vision"] true)
      the vision tower and the multimodal embedder under their transformers names
      (model.encoder.vision_tower.*, model.encoder.embed_vision.*) for runtimes/mlx_vision.py, never
      quantized; in the export dtype, except the standardization vectors and the clipped linears'
      bounds, which stay float32 as in the ONNX vision graph (the tower computes in float32).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dgport.errors import BackendUnavailable, CheckpointError, ExportError
from dgport.safe_files import WriteFailed, writing

from .checkpoint import DEC, first_non_finite
from .safetensors_np import SafetensorsFile
from .quantize import SCHEME, mlx_quantize
from .validation import max_abs_rel_err

ENC_SCALAR = "model.encoder.language_model.layers.{i}.layer_scalar"
QUANTIZED_SUFFIXES = ("_proj.weight", "embed_tokens.weight", "experts.gate_up_proj.weight",
                      "experts.down_proj.weight")


def _mx():
    try:
        import mlx.core as mx
    except ImportError as e:
        raise BackendUnavailable("--format mlx needs MLX: pip install mlx (macOS) or 'mlx[cpu]' (Linux)") from e
    return mx


def _quantizable(name: str) -> bool:
    return name.endswith(QUANTIZED_SUFFIXES) and ".router." not in name


def _bits(name: str, bits: int) -> int:
    """The embedding table (input embedding, tied lm_head) and the attention projections stay at 8 bits
    in 4-bit exports, as in ONNX (exporters/quantize.py says why)."""
    return 8 if name.endswith("embed_tokens.weight") or ".self_attn." in name else bits


def _convert(tensors: dict, dtype, opts) -> dict:
    """name -> numpy tensor  =>  name -> mx arrays in the export dtype, quantized when asked."""
    mx = _mx()
    out = {}
    for name, t in tensors.items():
        a = mx.array(np.asarray(t)).astype(dtype)
        if opts.quantize and _quantizable(name):
            g = opts.group_size  # divides every quantized width (export.py, quantize.choose_group)
            if a.shape[-1] % g:
                raise ExportError(f"tensor {name}: group size {g} does not divide its input width {a.shape[-1]}")
            # the scheme ONNX exports use (exporters/quantize.py): same dequantized values
            base = name[: -len(".weight")]
            wq, sc, bi = mlx_quantize(np.asarray(t, np.float32), _bits(name, opts.quantize), g)
            for label, v in (("scales", sc), ("biases", bi)):
                bad = first_non_finite(v)
                if bad is not None:
                    raise ExportError(f"tensor {name}: quantization {label} not finite ({v.reshape(-1)[bad]}; "
                                      "its scale is not finite): the weights of a group span more than float32 "
                                      "can hold; the checkpoint's weights are damaged, or export without --quantize")
            out[f"{base}.weight"] = mx.array(wq)
            out[f"{base}.scales"], out[f"{base}.biases"] = mx.array(sc).astype(dtype), mx.array(bi).astype(dtype)
            continue
        out[name] = a
    return out


def layer_tensors(ckpt, i: int) -> dict:
    """Our names -> checkpoint tensors for layer i."""
    cfg = ckpt.config
    p, q = f"{DEC}layers.{i}.", f"layers.{i}."
    names = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
             "self_attn.q_norm.weight", "self_attn.k_norm.weight",
             "input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
             "post_feedforward_layernorm.weight", "pre_feedforward_layernorm_2.weight",
             "post_feedforward_layernorm_1.weight", "post_feedforward_layernorm_2.weight",
             "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
             "router.proj.weight", "router.scale", "router.per_expert_scale", "layer_scalar"]
    if cfg.is_sliding(i):
        names.append("self_attn.v_proj.weight")
    t = {q + n: ckpt.tensor(p + n) for n in names}
    t[q + "experts.gate_up_proj.weight"] = ckpt.tensor(p + "experts.gate_up_proj")
    t[q + "experts.down_proj.weight"] = ckpt.tensor(p + "experts.down_proj")
    t[q + "encoder_layer_scalar"] = ckpt.tensor(ENC_SCALAR.format(i=i))
    return t


def global_tensors(ckpt) -> dict:
    names = ["embed_tokens.weight", "norm.weight", "self_conditioning.pre_norm.weight",
             "self_conditioning.gate_proj.weight", "self_conditioning.up_proj.weight",
             "self_conditioning.down_proj.weight"]
    return {n: ckpt.tensor(DEC + n) for n in names}


def vision_tensors(ckpt) -> dict:
    """The vision tower's and the embedder's tensors, by their transformers names."""
    from dgport.vision_config import expected_vision_tensors

    return {n: ckpt.tensor(n) for n in expected_vision_tensors(ckpt.vision.config)}


def _fp32_in_vision(name: str) -> bool:
    return name.endswith(("std_bias", "std_scale", "input_min", "input_max", "output_min", "output_max"))


def _check_written(path: Path, arrays: dict) -> None:
    """MLX reports no error when a write fails (a full disk leaves a short file): the header and
    length of what was written are checked instead."""
    try:
        names = SafetensorsFile(path, root=path.parent).names
    except CheckpointError as e:
        raise WriteFailed(path, f"the file on disk is incomplete ({str(e).removeprefix(f'{path}: ').split(';')[0]}); "
                                "the disk may be full") from None
    if set(names) != set(arrays):
        raise WriteFailed(path, "the file on disk lacks tensors; the disk may be full")


def export(ckpt, out_dir, opts, progress) -> dict:
    mx = _mx()
    from dgport.runtimes.mlx import DTYPES, LAYOUT

    out_dir = Path(out_dir)
    (out_dir / "mlx").mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[opts.dtype]
    files = []
    meta = {"format": "dgport-mlx", "layout": LAYOUT, "dtype": opts.dtype}

    def save(rel, tensors=None, arrays=None):
        arrays = _convert(tensors, dtype, opts) if arrays is None else arrays
        mx.eval(arrays)
        path = out_dir / rel
        with writing(path):
            mx.save_safetensors(str(path), arrays, metadata=meta)
        _check_written(path, arrays)
        files.append(rel)

    with progress.step("writing MLX embedding and self-conditioning weights"):
        save("mlx/globals.safetensors", global_tensors(ckpt))
    for i in progress.track(range(ckpt.config.num_layers), "writing MLX layer weights",
                            total=ckpt.config.num_layers):
        save(f"mlx/layer-{i:03d}.safetensors", layer_tensors(ckpt, i))
    vision = getattr(ckpt, "vision", None) is not None and not getattr(opts, "text_only", False)
    if vision:
        with progress.step("writing MLX vision tower weights"):
            save("mlx/vision.safetensors", arrays={
                n: mx.array(np.asarray(t)).astype(mx.float32 if _fp32_in_vision(n) else dtype)
                for n, t in vision_tensors(ckpt).items()})
    quant = None
    if opts.quantize:
        quant = {"bits": opts.quantize, "group_size": opts.group_size, "mode": "affine", "scheme": SCHEME,
                 "embedding_bits": _bits("embed_tokens.weight", opts.quantize),
                 "attention_bits": _bits("layers.0.self_attn.q_proj.weight", opts.quantize),
                 "quantized": "projections, experts, self-conditioning MLP, embedding (tied lm_head)",
                 "unquantized": "norms, layer scalars, router"}
    entry = {"files": files, "layout": LAYOUT, "dtype": opts.dtype, "quantization": quant}
    if vision:
        entry["vision"] = True
    return entry


VALIDATION_METRIC = max_abs_rel_err  # elementwise, stricter than the norm-wise ONNX measure


def validation_backends(ckpt, out_dir, entry):
    """The export opened on MLX, keeping logits, for the driver's comparison with the source model:
    [(label, open)], label None for the format's one graph set."""
    from dgport.runtimes.mlx import MlxBackend

    vision = getattr(ckpt, "vision", None) if entry.get("vision") else None
    return [(None, lambda: MlxBackend(folder=Path(out_dir), entry=entry, config=ckpt.config, vision=vision,
                                      keep_logits=True))]
