"""Gemma 4's vision tower and DiffusionGemma's multimodal embedder in MLX (transformers'
Gemma4VisionModel + embed_vision; exporters/onnx_vision.py is the same computation as an ONNX graph):

    Vision(cfg)(pixel_values [N, P, 3 * patch**2] float32, positions [N, P, 2] int32 ((x, y); (-1, -1) pads))
      -> soft tokens [N, P / k**2, text_hidden] float32 (an image's first `soft_tokens` rows are its own)

Computed in float32 whatever the weights' dtype (half-precision weights are cast where used). Patch
embedding 2 * (pixels - 0.5) @ W plus the learned x and y position embeddings (none on padding);
layers with q/k norms, a scale-less v norm, 2-D axial RoPE (the first half of each head rotated by x,
the second by y), attention scaling 1 over an image's patches with padding keys masked, tanh-GELU
MLP, clipped linears when configured; k x k average pooling by position, sqrt(width) scaling,
optional standardization, a scale-less RMSNorm and the projection to the text width.

Also the text encoder's image inputs (`image_inputs`): which rows of the soft tokens replace which
placeholder embeddings, and the contiguous image-token runs that attend to each other.
The module tree mirrors transformers' names under `model.encoder.` (`vision_tower.*`, `embed_vision.*`),
so the exporter's vision.safetensors loads as is. Imports neither torch nor transformers.
"""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from dgport.errors import DgportError
from dgport.vision_config import VisionConfig

from .mlx_model import gelu_tanh, rms

F32 = mx.float32
PREFIX = "model.encoder."  # the HF names' prefix above vision_tower.* and embed_vision.*


def f32(w: mx.array) -> mx.array:
    return w.astype(F32)


class ClippableLinear(nn.Module):
    """Gemma4ClippableLinear: clamp the input, multiply, clamp the output (when the config clips)."""

    def __init__(self, inp: int, out: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(inp, out, bias=False)
        if clipped:
            self.input_min, self.input_max = mx.array(-math.inf), mx.array(math.inf)
            self.output_min, self.output_max = mx.array(-math.inf), mx.array(math.inf)
        self._clipped = clipped

    def __call__(self, x: mx.array) -> mx.array:
        if self._clipped:
            x = mx.clip(x, f32(self.input_min), f32(self.input_max))
        y = x @ f32(self.linear.weight).T
        if self._clipped:
            y = mx.clip(y, f32(self.output_min), f32(self.output_max))
        return y


class Norm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self._eps = eps
        self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return rms(x, self._eps) * f32(self.weight)


def rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x [N, P, heads, d]: each half of a head rotated (half-split) by its own axis' angles."""
    a, b, c, e = mx.split(x, 4, axis=-1)
    return x * cos + mx.concatenate([-b, a, -e, c], axis=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        H, d, c = cfg.hidden_size, cfg.head_dim, cfg.clipped_linears
        self._nh, self._kv, self._d, self._eps = cfg.num_heads, cfg.kv_heads, d, cfg.rms_norm_eps
        self.q_proj = ClippableLinear(H, cfg.num_heads * d, c)
        self.k_proj = ClippableLinear(H, cfg.kv_heads * d, c)
        self.v_proj = ClippableLinear(H, cfg.kv_heads * d, c)
        self.o_proj = ClippableLinear(cfg.num_heads * d, H, c)
        self.q_norm = Norm(d, cfg.rms_norm_eps)
        self.k_norm = Norm(d, cfg.rms_norm_eps)

    def __call__(self, x, cos, sin, mask):
        N, P, _ = x.shape
        q = rope(self.q_norm(self.q_proj(x).reshape(N, P, self._nh, self._d)), cos, sin)
        k = rope(self.k_norm(self.k_proj(x).reshape(N, P, self._kv, self._d)), cos, sin)
        v = rms(self.v_proj(x).reshape(N, P, self._kv, self._d), self._eps)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)  # grouped heads as they are
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(N, P, self._nh * self._d))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        H, I, c = cfg.hidden_size, cfg.intermediate_size, cfg.clipped_linears
        self.gate_proj = ClippableLinear(H, I, c)
        self.up_proj = ClippableLinear(H, I, c)
        self.down_proj = ClippableLinear(I, H, c)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = Norm(H, eps)
        self.post_attention_layernorm = Norm(H, eps)
        self.pre_feedforward_layernorm = Norm(H, eps)
        self.post_feedforward_layernorm = Norm(H, eps)

    def __call__(self, h, cos, sin, mask):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class PatchEmbedder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * cfg.patch_size ** 2, cfg.hidden_size, bias=False)
        self.position_embedding_table = mx.zeros((2, cfg.position_embedding_size, cfg.hidden_size))

    def __call__(self, pixels: mx.array, positions: mx.array, pad: mx.array) -> mx.array:
        h = (2 * (pixels - 0.5)) @ f32(self.input_proj.weight).T
        p = mx.maximum(positions, 0)
        table = self.position_embedding_table
        pe = f32(table[0][p[..., 0]]) + f32(table[1][p[..., 1]])
        return h + mx.where(pad[..., None], mx.array(0.0, F32), pe)


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = [Layer(cfg) for _ in range(cfg.num_layers)]


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self._cfg = cfg
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = Encoder(cfg)
        if cfg.standardize:
            self.std_bias = mx.zeros((cfg.hidden_size,))
            self.std_scale = mx.ones((cfg.hidden_size,))
        spatial = cfg.head_dim // 2
        exps = np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)
        self._inv_freq = mx.array(np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exps, dtype=np.float32))

    def _rope_tables(self, positions: mx.array):
        """(cos, sin) [N, P, 1, d]: x angles on the first half of a head, y angles on the second."""
        ang = positions.astype(F32)[..., None] * self._inv_freq  # [N, P, 2, d/4]
        ang = mx.concatenate([ang[:, :, 0], ang[:, :, 0], ang[:, :, 1], ang[:, :, 1]], axis=-1)[:, :, None]
        return mx.cos(ang), mx.sin(ang)

    def _pool(self, h: mx.array, positions: mx.array, pad: mx.array) -> mx.array:
        """Average k x k patches by position into P / k**2 slots, then scale by sqrt(width)."""
        k = self._cfg.pooling_kernel_size
        h = mx.where(pad[..., None], mx.array(0.0, F32), h)
        p = mx.maximum(positions, 0)
        max_x = p[..., 0].max(axis=-1, keepdims=True) + 1
        kidx = p // k
        slot = kidx[..., 0] + (max_x // k) * kidx[..., 1]  # [N, P]
        S = h.shape[1] // (k * k)
        weights = (slot[..., None] == mx.arange(S)).astype(F32) / (k * k)  # [N, P, S]
        return (weights.swapaxes(1, 2) @ h) * math.sqrt(self._cfg.hidden_size)

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        pad = (positions == -1).all(axis=-1)  # [N, P]
        h = self.patch_embedder(pixels, positions, pad)
        cos, sin = self._rope_tables(positions)
        mask = ~pad[:, None, None, :]  # padding keys never attended
        for layer in self.encoder.layers:
            h = layer(h, cos, sin, mask)
        h = self._pool(h, positions, pad)
        if self._cfg.standardize:
            h = (h - f32(self.std_bias)) * f32(self.std_scale)
        return h


class Embedder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self._eps = cfg.rms_norm_eps
        self.embedding_projection = nn.Linear(cfg.hidden_size, cfg.text_hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return rms(x, self._eps) @ f32(self.embedding_projection.weight).T


class Vision(nn.Module):
    """Tower + embedder; `dtype` is the export's: the soft tokens are rounded to it (returned float32)."""

    def __init__(self, cfg: VisionConfig, dtype=F32):
        super().__init__()
        self._dtype = dtype
        self.vision_tower = VisionTower(cfg)
        self.embed_vision = Embedder(cfg)

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        out = self.embed_vision(self.vision_tower(pixels.astype(F32), positions))
        return out.astype(self._dtype).astype(F32)


def build_vision(cfg: VisionConfig, weights: dict, dtype) -> Vision:
    """A Vision holding `weights` (transformers' names, `model.encoder.vision_tower.*` and
    `model.encoder.embed_vision.*`); raises ValueError when they do not match the config."""
    model = Vision(cfg, dtype)
    model.load_weights([(k[len(PREFIX):], v) for k, v in weights.items()], strict=True)
    return model


# -- the text encoder's image inputs ----------------------------------------------------------
def image_inputs(ids: np.ndarray, image_token_id: int, rows: int, bidirectional: bool = True):
    """For ids [B, T] and `rows` soft tokens: index [B, T] int32 (the soft-token row each image
    placeholder takes, row-major; -1 elsewhere) and blocks [B, T] int32 (the contiguous run of image
    tokens each position belongs to, numbered per row from 0; -1 for text, and everywhere when the
    model's image blocks are not bidirectional)."""
    is_image = np.asarray(ids) == image_token_id
    n = int(is_image.sum())
    if n != rows:
        raise DgportError(f"{rows} image soft tokens for {n} image placeholder tokens (id {image_token_id}) "
                          "in the encoded ids: they must be equal")
    index = np.where(is_image, np.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1, -1)
    starts = is_image & ~np.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
    blocks = np.where(is_image & bidirectional, np.cumsum(starts, axis=1) - 1, -1)
    return index.astype(np.int32), blocks.astype(np.int32)


def block_mask(mask: mx.array, blocks: mx.array, past: int) -> mx.array:
    """mask [T, P + T] (causal, or sliding) OR the image blocks: a query and a key of the same run of
    image tokens among this call's new tokens (blocks [B, T]; past keys belong to none) -> [B, 1, T, P + T]."""
    B = blocks.shape[0]
    keys = mx.concatenate([mx.full((B, past), -1, mx.int32), blocks], axis=1) if past else blocks
    same = (blocks[:, :, None] == keys[:, None, :]) & (blocks[:, :, None] >= 0)
    return (mask[None] | same)[:, None]
