"""DiffusionGemma text model in MLX (spec §3-§5), in the style of mlx-lm.

One set of weights serves two modes:
  encode(ids, positions, cache)                 causal prefill / canvas commit; returns the cache
                                                 with the new K/V appended (sliding layers trimmed
                                                 to the last `sliding_window - 1` positions)
  denoise_step(canvas, positions, sc, T, u, cache)
                                                 bidirectional pass over [cache ; canvas] (read-only
                                                 cache), then temperature, argmax, entropy,
                                                 inverse-CDF sample and the next self-conditioning
                                                 signal, all on the device
`logits(...)` is the denoiser's softcapped fp32 logits (parity tests and export validation).
`denoise_rows_step` is the batched form (runtimes/mlx.py's rows): caches of different lengths
left-padded with zeros, per-row temperatures [b, 1, 1], and a mask over the padding (a past key
whose implied position, first canvas position - padded cache length + index, is negative).

Math follows transformers 5.23.0 exactly: fp32 RMSNorm with weights as is (x * w), scale-less
v_norm, K = V projection on full-attention layers (no v_proj), attention scaling 1.0, half-split
RoPE (partial "proportional" rotary on full layers: zero inverse frequencies leave dims unrotated),
router on the un-normed residual, top-k softmax renormalized times per_expert_scale, tanh-GELU,
dense MLP and MoE in parallel, per-mode layer_scalar (the encoder's scalars are separate buffers),
final norm, tied lm_head, fp32 softcap.

A cache is a list with one (keys, values) pair per layer, each [B, kv_heads, L, head_dim].
This module imports neither torch nor transformers.
"""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from dgport.config import TextConfig

MASKED = -1e30  # a disallowed token's logit / T under a vocabulary constraint (exporters/onnx_head.py's)


def rope_inv_freq(cfg: TextConfig, layer: int) -> np.ndarray:
    """float32 inverse frequencies of one layer's half-split RoPE, computed in float32 as the
    reference's rope init does: 1 / base ** (arange(0, 2n, 2) / head_dim) for the n rotated
    frequencies (all of them on sliding layers; partial_rotary_factor * head_dim / 2 on full,
    "proportional" layers), zeros for the rest (those dims pass through unrotated)."""
    d = cfg.head_dims[layer]
    if cfg.is_sliding(layer):
        base, n = cfg.sliding_rope_theta, d // 2
    else:
        base, n = cfg.full_rope_theta, int(cfg.full_partial_rotary_factor * d // 2)
    out = np.zeros(d // 2, dtype=np.float32)
    exps = np.arange(0, 2 * n, 2, dtype=np.float32) / np.float32(d)
    out[:n] = np.float32(1.0) / np.power(np.float32(base), exps, dtype=np.float32)
    return out


def rms(x: mx.array, eps: float) -> mx.array:
    """Scale-less RMS normalization in float32 (returns float32)."""
    x = x.astype(mx.float32)
    return x * mx.power(mx.mean(x * x, axis=-1, keepdims=True) + eps, -0.5)


def gelu_tanh(x: mx.array) -> mx.array:
    """tanh-approximate GELU computed in float32, rounded to the input dtype once (torch's opmath)."""
    xf = x.astype(mx.float32)
    y = 0.5 * xf * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (xf + 0.044715 * xf * xf * xf)))
    return y.astype(x.dtype)


def rotate_half(x: mx.array) -> mx.array:
    h = x.shape[-1] // 2
    return mx.concatenate([-x[..., h:], x[..., :h]], axis=-1)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float, with_scale: bool = True):
        super().__init__()
        self._eps = eps
        if with_scale:
            self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        y = rms(x, self._eps)
        if "weight" in self:
            y = y * self.weight.astype(mx.float32)
        return y.astype(x.dtype)


class TiedEmbedding(nn.Module):
    """The embedding table E [V, H]: input embedding, tied lm_head (h @ E^T) and the
    self-conditioning expectation (p @ E)."""

    def __init__(self, vocab: int, dims: int):
        super().__init__()
        self.weight = mx.zeros((vocab, dims))

    def __call__(self, ids: mx.array) -> mx.array:
        return self.weight[ids]

    def as_linear(self, h: mx.array) -> mx.array:
        return h @ self.weight.T

    def expect(self, p: mx.array) -> mx.array:
        return p @ self.weight

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        q = QuantizedTiedEmbedding(self.weight.shape[0], self.weight.shape[1], group_size, bits, mode)
        q.weight, q.scales, q.biases = mx.quantize(self.weight, group_size, bits, mode=mode)
        return q


class QuantizedTiedEmbedding(nn.Module):
    def __init__(self, vocab: int, dims: int, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self._q = dict(group_size=group_size, bits=bits, mode=mode)
        self.weight, self.scales, self.biases = mx.quantize(mx.zeros((vocab, dims)), group_size, bits, mode=mode)

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.dequantize(self.weight[ids], self.scales[ids], self.biases[ids], **self._q)

    def as_linear(self, h: mx.array) -> mx.array:
        return mx.quantized_matmul(h, self.weight, self.scales, self.biases, transpose=True, **self._q)

    def expect(self, p: mx.array) -> mx.array:
        return mx.quantized_matmul(p, self.weight, self.scales, self.biases, transpose=False, **self._q)


class SwitchLinear(nn.Module):
    """Stacked expert weights [E, out, in], applied to a per-row expert choice with gather_mm."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        # computes in the weights' dtype: float32 weights for a half-precision model on MLX's CPU
        # backend, whose gather_mm is float32-only (see `build`); same fp32 accumulation either way
        w = self.weight.swapaxes(-1, -2)
        y = mx.gather_mm(x.astype(w.dtype), w, rhs_indices=indices, sorted_indices=sorted_indices)
        return y.astype(x.dtype)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        E, out, inp = self.weight.shape
        q = QuantizedSwitchLinear(inp, out, E, group_size, bits, mode)
        q.weight, q.scales, q.biases = mx.quantize(self.weight, group_size, bits, mode=mode)
        return q


class QuantizedSwitchLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, num_experts: int, group_size: int, bits: int,
                 mode: str = "affine"):
        super().__init__()
        self._q = dict(group_size=group_size, bits=bits, mode=mode)
        self.weight, self.scales, self.biases = mx.quantize(
            mx.zeros((num_experts, output_dims, input_dims)), group_size, bits, mode=mode)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(x, self.weight, self.scales, self.biases, rhs_indices=indices, transpose=True,
                             sorted_indices=sorted_indices, **self._q)


def _gather_sort(x, indices):
    """Sort (token, expert) pairs by expert so gather_mm reads each expert's weights once."""
    k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    inv_order = mx.argsort(order)
    return x.flatten(0, -3)[order // k], flat[order], inv_order


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        H, d, kv, nh = cfg.hidden_size, cfg.head_dims[layer], cfg.kv_heads[layer], cfg.num_heads
        self._d, self._kv, self._nh = d, kv, nh
        self.q_proj = nn.Linear(H, nh * d, bias=False)
        self.k_proj = nn.Linear(H, kv * d, bias=False)
        if cfg.is_sliding(layer):  # full layers: V is the k_proj output (K = V), before k_norm
            self.v_proj = nn.Linear(H, kv * d, bias=False)
        self.o_proj = nn.Linear(nh * d, H, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(d, cfg.rms_norm_eps, with_scale=False)

    def kv(self, x: mx.array, cos: mx.array, sin: mx.array) -> tuple[mx.array, mx.array]:
        """K (k_norm + RoPE) and V (scale-less v_norm) of x [B, T, H] -> [B, kv, T, d] each."""
        B, T, _ = x.shape
        kr = self.k_proj(x).reshape(B, T, self._kv, self._d)
        vr = self.v_proj(x).reshape(B, T, self._kv, self._d) if "v_proj" in self else kr
        k = self.k_norm(kr)
        k = k * cos[:, :, None] + rotate_half(k) * sin[:, :, None]
        v = self.v_norm(vr)
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def attend(self, x, cos, sin, keys, values, mask) -> mx.array:
        """Attention of x's queries over keys/values [B, kv, S, d] (no 1/sqrt(d) scaling)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, T, self._nh, self._d))
        q = (q * cos[:, :, None] + rotate_half(q) * sin[:, :, None]).transpose(0, 2, 1, 3)
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, self._nh * self._d))


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self._eps, self._k, self._root = cfg.rms_norm_eps, cfg.top_k_experts, cfg.hidden_size ** -0.5
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = mx.ones((cfg.hidden_size,))
        self.per_expert_scale = mx.ones((cfg.num_experts,))

    def __call__(self, r: mx.array) -> tuple[mx.array, mx.array]:
        """Routing weights [N, k] (float32) and expert ids [N, k] for the raw residual r [N, H]."""
        x = rms(r, self._eps).astype(r.dtype) * self.scale * self._root
        probs = mx.softmax(self.proj(x).astype(mx.float32), axis=-1)
        idx = mx.argpartition(-probs, kth=self._k - 1, axis=-1)[..., : self._k]
        w = mx.take_along_axis(probs, idx, axis=-1)
        w = w / w.sum(axis=-1, keepdims=True)
        return w * self.per_expert_scale[idx].astype(mx.float32), idx


class Experts(nn.Module):
    """Routed experts: gate_up_proj [E, 2M, H] (rows :M gate, M: up), down_proj [E, H, M]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        E, H, M = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self._m = M
        self.gate_up_proj = SwitchLinear(H, 2 * M, E)
        self.down_proj = SwitchLinear(M, H, E)

    def __call__(self, y: mx.array, idx: mx.array, w: mx.array) -> mx.array:
        """sum_k w[:, k] * expert_{idx[:, k]}(y) for y [N, H]."""
        N, k = idx.shape
        x = mx.expand_dims(y, (-2, -3))  # [N, 1, 1, H]
        do_sort = idx.size >= 64
        if do_sort:
            x, sidx, inv = _gather_sort(x, idx)  # [N*k, 1, H], [N*k]
        else:
            sidx = idx
        gu = self.gate_up_proj(x, sidx, sorted_indices=do_sort)
        h = gelu_tanh(gu[..., : self._m]) * gu[..., self._m:]
        out = self.down_proj(h, sidx, sorted_indices=do_sort)
        if do_sort:
            out = out[inv].reshape(N, k, 1, -1)
        out = out.squeeze(-2)  # [N, k, H]
        return (out.astype(mx.float32) * w[..., None]).sum(axis=-2).astype(y.dtype)


class Layer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(H, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "pre_feedforward_layernorm_2",
                     "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"):
            setattr(self, name, RMSNorm(H, eps))
        self.layer_scalar = mx.ones((1,))  # decoder (denoiser) mode
        self.encoder_layer_scalar = mx.ones((1,))  # encoder mode

    def feed_forward(self, h: mx.array) -> mx.array:
        """Dense MLP and MoE in parallel on the same residual h [B, T, H]."""
        B, T, H = h.shape
        h1 = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
        flat = h.reshape(B * T, H)
        w, idx = self.router(flat)  # router reads the raw residual
        h2 = self.experts(self.pre_feedforward_layernorm_2(flat), idx, w).reshape(B, T, H)
        h2 = self.post_feedforward_layernorm_2(h2)
        return h + self.post_feedforward_layernorm(h1 + h2)

    def __call__(self, h, cos, sin, keys, values, mask, scalar) -> mx.array:
        """One layer given the full keys/values it attends to."""
        a = self.self_attn.attend(self.input_layernorm(h), cos, sin, keys, values, mask)
        h = h + self.post_attention_layernorm(a)
        return self.feed_forward(h) * scalar


class SelfConditioning(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self._eps = eps
        self.pre_norm = RMSNorm(H, eps)
        self.gate_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, H, bias=False)

    def __call__(self, embeds: mx.array, signal: mx.array) -> mx.array:
        z = self.pre_norm(signal)
        sc = self.down_proj(gelu_tanh(self.gate_proj(z)) * self.up_proj(z))
        x = embeds + sc
        return rms(x, self._eps).astype(x.dtype)  # scale-less post_norm


class DiffusionGemma(nn.Module):
    def __init__(self, cfg: TextConfig, dtype=mx.float32):
        super().__init__()
        self._cfg, self._dtype = cfg, dtype
        self.embed_tokens = TiedEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Layer(cfg, i) for i in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        self._inv_freq = {t: mx.array(rope_inv_freq(cfg, cfg.layer_types.index(t))) for t in set(cfg.layer_types)}

    # -- helpers ---------------------------------------------------------------------------
    def _scaled_embed(self, ids: mx.array) -> mx.array:
        scale = mx.array(self._cfg.embed_scale, dtype=mx.float32).astype(self._dtype)
        return self.embed_tokens(ids).astype(self._dtype) * scale

    def _rope(self, positions: mx.array) -> dict:
        """layer type -> (cos, sin) [B, T, d] in the model dtype, from float32 angles."""
        out = {}
        pos = positions.astype(mx.float32)[..., None]
        for t, inv in self._inv_freq.items():
            ang = pos * inv
            emb = mx.concatenate([ang, ang], axis=-1)
            out[t] = (mx.cos(emb).astype(self._dtype), mx.sin(emb).astype(self._dtype))
        return out

    def empty_cache(self, batch: int = 1) -> list:
        cfg = self._cfg
        return [(mx.zeros((batch, cfg.kv_heads[i], 0, cfg.head_dims[i]), self._dtype),) * 2
                for i in range(cfg.num_layers)]

    # -- encoder mode ----------------------------------------------------------------------
    def encode(self, ids: mx.array, positions: mx.array, cache: list) -> list:
        """Causal pass over ids [B, T] at absolute positions [B, T] (contiguous, continuing the
        cache). Returns the new cache: past ; new, sliding layers trimmed to sliding_window - 1."""
        return self._encode(self._scaled_embed(ids), positions, cache)

    def encode_images(self, ids, positions, cache, soft, index, blocks) -> list:
        """encode with images: soft tokens [S, H] (float32) replace the embeddings where index [B, T]
        >= 0 (row index[b, t]), cast to the model dtype; queries and keys of the same image block
        (blocks [B, T] >= 0) also see each other in every layer (runtimes/mlx_vision.image_inputs)."""
        rows = soft.astype(self._dtype)[mx.maximum(index, 0)]
        h = mx.where((index >= 0)[..., None], rows, self._scaled_embed(ids))
        return self._encode(h, positions, cache, blocks)

    def _encode(self, h: mx.array, positions: mx.array, cache: list, blocks: mx.array | None = None) -> list:
        from .mlx_vision import block_mask

        cfg = self._cfg
        rope = self._rope(positions)
        T = h.shape[1]
        q = positions[0]
        new_cache = []
        for i, layer in enumerate(self.layers):
            cos, sin = rope[cfg.layer_types[i]]
            pk, pv = cache[i]
            P = pk.shape[2]
            x = layer.input_layernorm(h)
            k, v = layer.self_attn.kv(x, cos, sin)
            keys, values = mx.concatenate([pk, k], axis=2), mx.concatenate([pv, v], axis=2)
            if cfg.is_sliding(i):
                W = cfg.sliding_window
                new_cache.append((keys[:, :, -(W - 1):], values[:, :, -(W - 1):]))
            else:
                new_cache.append((keys, values))
            if i == cfg.num_layers - 1:
                break  # only the cache matters: the last layer's output is never used
            kpos = q[0] - P + mx.arange(P + T)
            mask = kpos[None, :] <= q[:, None]
            if cfg.is_sliding(i):
                mask = mask & (kpos[None, :] > q[:, None] - cfg.sliding_window)
            if blocks is not None:
                mask = block_mask(mask, blocks, P)
            a = layer.self_attn.attend(x, cos, sin, keys, values, mask)
            h = h + layer.post_attention_layernorm(a)
            h = layer.feed_forward(h) * layer.encoder_layer_scalar.astype(self._dtype)
        return new_cache

    # -- denoiser mode ---------------------------------------------------------------------
    def logits(self, canvas: mx.array, positions: mx.array, sc: mx.array, cache: list,
               padded: bool = False) -> mx.array:
        """Softcapped float32 logits [B, C, V] of a canvas; sc [B, C, H] is the self-conditioning
        signal (zeros on a canvas' first step). The cache is read, not written. No mask unless
        `padded` (left-padded caches): then past key j of a layer's cache of length P sits at
        position positions[:, 0] - P + j and the negative ones (the padding) are masked out."""
        cfg = self._cfg
        h = self.self_conditioning(self._scaled_embed(canvas), sc.astype(self._dtype))
        rope = self._rope(positions)
        C = canvas.shape[1]
        for i, layer in enumerate(self.layers):
            cos, sin = rope[cfg.layer_types[i]]
            k, v = layer.self_attn.kv(layer.input_layernorm(h), cos, sin)
            pk, pv = cache[i]
            keys, values = mx.concatenate([pk, k], axis=2), mx.concatenate([pv, v], axis=2)
            mask = None
            if padded:
                P = pk.shape[2]
                past = (positions[:, :1] - P + mx.arange(P)) >= 0  # [B, P]
                mask = mx.concatenate([past, mx.ones((past.shape[0], C), mx.bool_)], axis=1)[:, None, None, :]
            h = layer(h, cos, sin, keys, values, mask, layer.layer_scalar.astype(self._dtype))
        h = self.norm(h)
        x = self.embed_tokens.as_linear(h.astype(self._dtype)).astype(mx.float32)
        cap = cfg.final_logit_softcapping
        return mx.tanh(x / cap) * cap

    def sample(self, logits: mx.array, temperature: mx.array, uniforms: mx.array, allowed: mx.array | None = None):
        """argmax, entropy (nats), inverse-CDF sample and next self-conditioning signal from the
        logits divided by the temperature; `allowed` [B, C, V] bool (vocabulary constraints): the other
        tokens' values become MASKED, as in the ONNX graphs."""
        proc = logits / temperature
        if allowed is not None:
            proc = mx.where(allowed, proc, mx.array(MASKED, dtype=mx.float32))
        V = proc.shape[-1]
        argmax = mx.argmax(proc, axis=-1)
        logp = proc - mx.logsumexp(proc, axis=-1, keepdims=True)
        probs = mx.exp(logp)
        entropy = -(probs * logp).sum(axis=-1)
        cdf = mx.cumsum(mx.softmax(proc, axis=-1), axis=-1)
        sampled = mx.minimum((cdf <= uniforms[..., None]).astype(mx.int32).sum(axis=-1), V - 1)
        # next step's self-conditioning: softmax_fp32(dtype(proc)) -> dtype, @ E, * dtype(sqrt(H))
        p_sc = mx.softmax(proc.astype(self._dtype).astype(mx.float32), axis=-1).astype(self._dtype)
        scale = mx.array(self._cfg.embed_scale, dtype=mx.float32).astype(self._dtype)
        next_sc = self.embed_tokens.expect(p_sc).astype(self._dtype) * scale
        return argmax, entropy, sampled, next_sc

    def denoise_step(self, canvas, positions, sc, temperature, uniforms, cache):
        return self.sample(self.logits(canvas, positions, sc, cache), temperature, uniforms)

    def denoise_step_with_logits(self, canvas, positions, sc, temperature, uniforms, cache):
        logits = self.logits(canvas, positions, sc, cache)
        return (*self.sample(logits, temperature, uniforms), logits)

    def denoise_step_masked(self, canvas, positions, sc, temperature, uniforms, cache, masks, classes):
        """denoise_step under vocabulary constraints: masks [K, V] bool, classes [B, C] (rows of masks)."""
        return self.sample(self.logits(canvas, positions, sc, cache), temperature, uniforms, masks[classes])

    def denoise_rows_step_masked(self, canvas, positions, sc, temperatures, uniforms, cache, masks, classes):
        return self.sample(self.logits(canvas, positions, sc, cache, padded=True), temperatures, uniforms,
                           masks[classes])

    def denoise_rows_step(self, canvas, positions, sc, temperatures, uniforms, cache):
        """denoise_step over left-padded caches, temperatures [B, 1, 1] (one per row)."""
        return self.sample(self.logits(canvas, positions, sc, cache, padded=True), temperatures, uniforms)

    def denoise_rows_step_with_logits(self, canvas, positions, sc, temperatures, uniforms, cache):
        logits = self.logits(canvas, positions, sc, cache, padded=True)
        return (*self.sample(logits, temperatures, uniforms), logits)


# -- weights ------------------------------------------------------------------------------
def build(cfg: TextConfig, weights: dict, dtype, bits: int | None) -> DiffusionGemma:
    """A model holding `weights` (flat names as written by the MLX exporter)."""
    model = DiffusionGemma(cfg, dtype)
    if bits is not None:
        def predicate(path, module):
            s = weights.get(f"{path}.scales")
            if s is None:
                return False
            w = weights[f"{path}.weight"]
            in_dims = module.weight.shape[-1]  # per tensor: 4-bit exports keep the embedding at 8 bits
            return {"group_size": in_dims // s.shape[-1], "bits": w.shape[-1] * 32 // in_dims, "mode": "affine"}

        nn.quantize(model, class_predicate=predicate)
    model.load_weights(list(weights.items()), strict=True)
    if dtype != mx.float32 and mx.default_device() == mx.cpu:
        for layer in model.layers:  # MLX's CPU gather_mm supports float32 only
            for lin in (layer.experts.gate_up_proj, layer.experts.down_proj):
                if isinstance(lin, SwitchLinear):
                    lin.weight = lin.weight.astype(mx.float32)
    return model
