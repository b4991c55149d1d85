"""The vision tower's dimensions (a checkpoint's `vision_config`, Gemma 4's), checked as untrusted input."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import CheckpointError


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    patch_size: int
    pooling_kernel_size: int
    position_embedding_size: int
    rms_norm_eps: float
    rope_theta: float
    standardize: bool
    clipped_linears: bool
    text_hidden_size: int  # the embedder's output width
    hidden_activation: str = "gelu_pytorch_tanh"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        return cls(**d)

    @classmethod
    def from_hf(cls, vision: dict, text_hidden_size: int, where: str = "config.json") -> "VisionConfig":
        if not isinstance(vision, dict):
            raise CheckpointError(f"{where}: vision_config must be an object")

        def integer(key, default, lo, hi):
            v = vision.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise CheckpointError(f"{where}: vision_config.{key} must be an integer in [{lo}, {hi}] (got {v!r})")
            return v

        def flag(key, default):
            v = vision.get(key, default)
            if not isinstance(v, bool):
                raise CheckpointError(f"{where}: vision_config.{key} must be true or false (got {v!r})")
            return v

        hidden = integer("hidden_size", 768, 1, 1 << 16)
        heads = integer("num_attention_heads", 12, 1, 1024)
        head_dim = vision.get("head_dim") or hidden // heads
        head_dim = integer("head_dim", head_dim, 4, 1 << 12)
        if head_dim % 4:
            raise CheckpointError(f"{where}: vision_config.head_dim {head_dim} must be a multiple of 4 (2-D rotary)")
        kv = integer("num_key_value_heads", heads, 1, heads)
        if heads % kv:
            raise CheckpointError(f"{where}: vision_config.num_attention_heads must be a multiple of num_key_value_heads")
        rope = vision.get("rope_parameters") or {"rope_type": "axial", "rope_theta": 100.0}
        if not isinstance(rope, dict) or rope.get("rope_type", "axial") != "axial":
            raise CheckpointError(f"{where}: vision_config.rope_parameters: only axial rope is known")
        theta = rope.get("rope_theta", 100.0)
        eps = vision.get("rms_norm_eps", 1e-6)
        for key, v in (("rope_theta", theta), ("rms_norm_eps", eps)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise CheckpointError(f"{where}: vision_config.{key} must be a positive number (got {v!r})")
        act = vision.get("hidden_activation", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise CheckpointError(f"{where}: vision_config.hidden_activation {act!r} is not supported (gelu_pytorch_tanh)")
        if vision.get("output_proj_dims") not in (None, hidden):
            raise CheckpointError(f"{where}: vision_config.output_proj_dims is not supported")
        if vision.get("pooling_kernel_size", 3) == 1:  # the reference then keeps the padding tokens instead
            raise CheckpointError(f"{where}: vision_config.pooling_kernel_size 1 is not supported (transformers' "
                                  "pooler returns the padding tokens there); the model uses 3")
        return cls(hidden_size=hidden, intermediate_size=integer("intermediate_size", 3072, 1, 1 << 18),
                   num_layers=integer("num_hidden_layers", 16, 1, 1024), num_heads=heads, kv_heads=kv,
                   head_dim=head_dim, patch_size=integer("patch_size", 16, 1, 64),
                   pooling_kernel_size=integer("pooling_kernel_size", 3, 1, 8),
                   position_embedding_size=integer("position_embedding_size", 10240, 1, 1 << 20),
                   rms_norm_eps=float(eps), rope_theta=float(theta), standardize=flag("standardize", False),
                   clipped_linears=flag("use_clipped_linears", False), text_hidden_size=text_hidden_size)
