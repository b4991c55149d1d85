"""dgport's ONNX graphs, assembled from the model's layers (exporters/onnx_graph.py `Model`) and the head
(exporters/onnx_head.py): the causal `encoder`, the bidirectional `denoise_step` and, for quantized
exports, the joint `step` graph that does both; their inputs, attention masks and outputs (the
contract in docs/GRAPH_CONTRACT.md).

Masks come from absolute positions. The past keys of a cache of length P sit at the positions just
before the first new one: key j at `position_ids[:, 0] - P + j`. A key whose implied position is
negative is never attended: that is how a caller batches rows whose caches differ in length (each
row's cache left-padded with zeros to the batch's longest, so exactly its pad entries have negative
implied positions). The encoder adds causality (and the sliding window) to that rule; the denoise
step attends to every other key. Without padding every mask is all true, and the masked scores are
bit for bit the unmasked ones (Where with a true condition is exact; the denoise step adds the mask as
a 0 / -inf bias instead, about half the cost of a Where over the scores, and x + 0 is x).

`temperature` is a scalar [] or one per row [B] (declared [], see _step_inputs), broadcast to the
head's rows inside the graph; a scalar gives the same bits as before rows existed (the same divisions).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from dgport.config import TextConfig
from .checkpoint import DEC
from .onnx_builder import BOOL, FLOAT, INT64, Builder, WeightStore
from .onnx_graph import Model
from .onnx_head import constraint_inputs, denoise_head
from .onnx_quant import QuantSpec


def _i64(b: Builder, *v) -> str:
    return b.const(np.array(v, np.int64), INT64)


# ----------------------------------------------------------------------------------- masks


def key_positions(b: Builder, qpos: str, past_len: str) -> str:
    """Implied positions [B, S] of the keys [past ; new]: past key j at start - P + j (start = the
    row's first new position), then the new tokens' own positions."""
    start = b.op("Slice", qpos, _i64(b, 0), _i64(b, 1), _i64(b, 1))  # [B,1]
    rng = b.op("Range", b.const(np.int64(0), INT64), past_len, b.const(np.int64(1), INT64))  # [P]
    kpast = b.op("Add", b.op("Sub", start, past_len), rng)  # [B,P]
    return b.op("Concat", kpast, qpos, axis=1)


def attention_masks(b: Builder, cfg: TextConfig, qpos: str, lengths: tuple[str, str], mode: str,
                    denoise: str | None = None) -> dict:
    """Bool masks per layer kind (sliding?) over [past ; new], True = attend; `lengths` the full and
    sliding layers' past lengths. Every kind: the key's implied position is >= 0 (left padding is
    masked). mode 'encoder': also causal, full k <= q, sliding q - window < k <= q ([B,1,1,T,S]);
    'decoder': nothing else ([B,1,1,1,S]: every query alike); 'joint': the encoder's where the bool
    scalar `denoise` is false, the decoder's where it is true."""
    q = b.op("Unsqueeze", qpos, _i64(b, 1, 2, 4))  # [B,1,1,T,1]
    zero = b.const(np.int64(0), INT64)
    masks = {}
    for sliding, L in ((False, lengths[0]), (True, lengths[1])):
        k = b.op("Unsqueeze", key_positions(b, qpos, L), _i64(b, 1, 2, 3))  # [B,1,1,1,S]
        valid = b.op("GreaterOrEqual", k, zero)
        if mode == "decoder":
            masks[sliding] = valid
            continue
        causal = b.op("LessOrEqual", k, q)
        if sliding:
            causal = b.op("And", causal, b.op("Greater", k, b.op("Sub", q, b.const(np.int64(cfg.sliding_window),
                                                                                    INT64))))
        if mode == "joint":  # the denoiser attends to every (real) key
            causal = b.op("Or", causal, denoise)
        masks[sliding] = b.op("And", causal, valid)
    return masks


# ----------------------------------------------------------------------------------- inputs, cache


def _layers(cfg: TextConfig, progress, what: str):
    if progress is None:
        return range(cfg.num_layers)
    return progress.track(range(cfg.num_layers), f"onnx: {what}", total=cfg.num_layers)


def kv_dims(cfg: TextConfig, i: int, past: str):
    return ["batch", cfg.kv_heads[i], past, cfg.head_dims[i]]


def cache_inputs(b, cfg: TextConfig, md: int) -> list:
    """The per-layer past_key_{i} / past_value_{i} inputs both graphs read."""
    pasts = []
    for i in range(cfg.num_layers):
        past = "past_seq_s" if cfg.is_sliding(i) else "past_seq_f"
        pasts.append((b.input(f"past_key_{i}", md, kv_dims(cfg, i, past)),
                      b.input(f"past_value_{i}", md, kv_dims(cfg, i, past))))
    return pasts


def _past_lengths(b: Builder, cfg: TextConfig, pasts) -> tuple[str, str]:
    """Cached lengths (int64 scalars) of the full and the sliding layers, read off the past K shapes."""
    two = _i64(b, 2)

    def plen(i):
        return b.op("Squeeze", b.op("Slice", b.op("Shape", pasts[i][0]), two, _i64(b, 3)), _i64(b, 0))

    full, slid = cfg.full_layers, cfg.sliding_layers
    return (plen(full[0]) if full else b.const(np.int64(0), INT64),
            plen(slid[0]) if slid else b.const(np.int64(0), INT64))


def _sliding_tail(b: Builder, cfg: TextConfig):
    """(k, v) -> their last sliding_window - 1 positions along axis 2 (DynamicSlidingWindowLayer)."""
    keep = _i64(b, cfg.sliding_cache_len)
    zero = _i64(b, 0)
    two = _i64(b, 2)

    def tail(x, v):
        # in-range indices: start = max(S - keep, 0), end = S (a negative start beyond the axis is
        # clamped by the ONNX spec, but not by every runtime)
        s = b.op("Slice", b.op("Shape", x), two, _i64(b, 3))
        start = b.op("Max", b.op("Sub", s, keep), zero)
        return b.op("Slice", x, start, s, two), b.op("Slice", v, start, s, two)

    return tail


def _present(b: Builder, cfg: TextConfig, md: int, i: int, k: str, v: str) -> None:
    out = "present_seq_s" if cfg.is_sliding(i) else "present_seq_f"
    b.output(f"present_key_{i}", k, md, kv_dims(cfg, i, out))
    b.output(f"present_value_{i}", v, md, kv_dims(cfg, i, out))


def _denoise_input(b: Builder, m: Model, cfg: TextConfig, ids: str, sc: str, e: str | None = None) -> str:
    """The denoiser's input embedding with self-conditioning: rms(E[ids]*s + SC_MLP(RMSNorm_w(sc_embeds)))."""
    e = m.embed(ids) if e is None else e
    p = f"{DEC}self_conditioning."
    z = m.rms(sc, m.vec32(p + "pre_norm.weight"))
    gu = m.mm(z, m.lin("self_conditioning.gate_up", [p + "gate_proj.weight", p + "up_proj.weight"]))
    I = cfg.intermediate_size
    g, u = b.op("Split", gu, _i64(b, I, I), axis=-1, n_out=2)
    scm = m.mm(b.op("Mul", m.gelu(g), u), m.lin("self_conditioning.down", [p + "down_proj.weight"]))
    return m.rms(b.op("Add", e, scm))


def _step_inputs(b: Builder, cfg: TextConfig, md: int, ids_name: str, length: str):
    """The denoise step's inputs: token ids, positions, self-conditioning signal, temperature, uniforms.
    `temperature` is declared a scalar [] (ONNX's checker wants a shape on every graph input, and
    has no "rank 0 or 1"); onnxruntime checks no rank for an input declared [] (ValidateInputs skips
    shapes of rank 0), so a [B] of one temperature per row is fed the same way: the head reshapes it."""
    return (b.input(ids_name, INT64, ["batch", length]), b.input("position_ids", INT64, ["batch", length]),
            b.input("sc_embeds", md, ["batch", length, cfg.hidden_size]), b.input("temperature", FLOAT, []),
            b.input("uniforms", FLOAT, ["batch", length]))


# ----------------------------------------------------------------------------------- graphs


def _images(b: Builder, cfg: TextConfig, vision, ids: str):
    """The image_embeds input (exporters/onnx_images.py) when the export takes images, else None."""
    if vision is None:
        return None
    from .onnx_images import ImageInputs

    return ImageInputs(b, cfg.hidden_size, vision.image_token_id, ids, vision.bidirectional)


def build_encoder(cfg: TextConfig, store: WeightStore, md: int, emulate: bool = False, progress=None,
                  moe: str = "sparse", fused_attention: bool = False, vision=None):
    """`vision` (a VisionInfo): the graph also takes image soft tokens (exporters/onnx_images.py).
    `moe`: the experts' form (onnx_graph.MOE_FORMS)."""
    b = Builder("dgport_encoder", store, md, emulate)
    m = Model(b, cfg, "encoder", moe, fused_attention)
    ids = b.input("input_ids", INT64, ["batch", "seq"])
    pos = b.input("position_ids", INT64, ["batch", "seq"])
    pasts = cache_inputs(b, cfg, md)
    images = _images(b, cfg, vision, ids)
    lengths = _past_lengths(b, cfg, pasts)
    m.masks = attention_masks(b, cfg, pos, lengths, "encoder")
    rope = m.rope_tables(pos)
    h = m.embed(ids)
    if images is not None:
        m.masks = images.overlay(m.masks, lengths)
        h = images.embed(h)
    trim = _sliding_tail(b, cfg)
    for i in _layers(cfg, progress, "encoder layers"):
        last = i == cfg.num_layers - 1
        h, k_all, v_all = m.layer(i, h, rope, *pasts[i], pos, kv_only=last)
        _present(b, cfg, md, i, *(trim(k_all, v_all) if cfg.is_sliding(i) else (k_all, v_all)))
    return b


def build_denoise(cfg: TextConfig, store: WeightStore, md: int, with_logits: bool, emulate: bool = False,
                  progress=None, moe: str = "dense", fused_attention: bool = False):
    b = Builder("dgport_denoise_step", store, md, emulate)
    m = Model(b, cfg, "decoder", moe, fused_attention)
    ids, pos, sc, temp, unif = _step_inputs(b, cfg, md, "canvas_ids", "canvas")
    pasts = cache_inputs(b, cfg, md)
    constraint = constraint_inputs(b, cfg.vocab_size, ids)
    m.masks = attention_masks(b, cfg, pos, _past_lengths(b, cfg, pasts), "decoder")
    if not fused_attention:  # [B,1,1,1,S] fp32 0 / -inf: an Add over the scores costs less than a Where
        zero, ninf = b.const(np.float32(0), FLOAT), b.const(np.float32(-np.inf), FLOAT)
        m.biases = {k: b.op("Where", v, zero, ninf) for k, v in m.masks.items()}
    rope = m.rope_tables(pos)
    h = _denoise_input(b, m, cfg, ids, sc)
    for i in _layers(cfg, progress, "denoise layers"):
        h, _, _ = m.layer(i, h, rope, *pasts[i], None)
    denoise_head(b, m, cfg, md, h, temp, unif, with_logits, constraint)
    return b


def build_step(cfg: TextConfig, store: WeightStore, md: int, with_logits: bool, progress=None,
               fused_attention: bool = False, quant: "QuantSpec | None" = None, vision=None):
    """Encoder and denoiser in one graph (quantized exports), selected by the scalar input `denoise`:
    false: encode `input_ids` causally and return the extended cache (the encoder graph's contract;
    the sampler outputs are empty [B, 0]); true: one denoising step of the canvas `input_ids`
    (the denoise_step graph's contract; the present_* outputs are then to be discarded).
    Why one graph: onnxruntime repacks every constant 4/8-bit weight for its MatMulNBits kernel once
    per kernel, and two sessions (or two branches of an If) are two kernels per weight, so two
    packed copies of the model (and Python offers no shared prepacked-weights container). Here every
    weight feeds one MatMulNBits node, used by both modes. The modes differ only in the input
    embedding (self-conditioning), the causal mask, the layer scalars, and whether the head runs
    (on zero rows when encoding)."""
    b = Builder("dgport_step", store, md)
    m = Model(b, cfg, "joint", "unrolled", fused_attention, quant)
    ids, pos, sc, temp, unif = _step_inputs(b, cfg, md, "input_ids", "seq")
    den = b.input("denoise", BOOL, [])
    m.denoise = den
    pasts = cache_inputs(b, cfg, md)
    token_masks, classes = constraint_inputs(b, cfg.vocab_size, ids)
    images = _images(b, cfg, vision, ids)
    lengths = _past_lengths(b, cfg, pasts)
    m.masks = attention_masks(b, cfg, pos, lengths, "joint", den)
    rope = m.rope_tables(pos)
    e = m.embed(ids)
    if images is not None:  # (encoding only: a denoising call never feeds image_embeds)
        m.masks = images.overlay(m.masks, lengths)
        e = images.embed(e)
    h = b.op("Where", den, _denoise_input(b, m, cfg, ids, sc, e), e)
    trim = _sliding_tail(b, cfg)
    for i in _layers(cfg, progress, "step layers"):
        h, k_all, v_all = m.layer(i, h, rope, *pasts[i], pos)
        _present(b, cfg, md, i, *(trim(k_all, v_all) if cfg.is_sliding(i) else (k_all, v_all)))
    # the head on the first T rows when denoising, on none when encoding
    one, zero = _i64(b, 1), _i64(b, 0)
    rows = b.op("Mul", b.op("Slice", b.op("Shape", ids), one, _i64(b, 2)), b.op("Cast", b.op("Reshape", den, one),
                                                                                 to=INT64))
    h = b.op("Slice", h, zero, rows, one)
    unif = b.op("Slice", unif, zero, rows, one)
    classes = b.op("Slice", classes, zero, rows, one)
    denoise_head(b, m, cfg, md, h, temp, unif, with_logits, (token_masks, classes))
    return b


def io_spec(b: Builder) -> dict:
    """Graph inputs/outputs (weights excluded) for the manifest."""
    def one(vi):
        t = vi.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": vi.name, "dtype": TensorProto.DataType.Name(t.elem_type).lower(), "shape": dims}

    return {"inputs": [one(v) for v in b.inputs if v.name not in b.weights and v.name not in b.optional],
            "outputs": [one(v) for v in b.outputs],
            "optional_inputs": [one(v) for v in b.inputs if v.name in b.optional]}
