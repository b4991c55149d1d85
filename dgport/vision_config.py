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


VT = "model.encoder.vision_tower."
EMB = "model.encoder.embed_vision."


def expected_vision_tensors(c: VisionConfig) -> dict[str, tuple[int, ...]]:
    """The vision tower's and the embedder's tensors (transformers' names) and shapes."""
    H, I, d = c.hidden_size, c.intermediate_size, c.head_dim
    out = {VT + "patch_embedder.input_proj.weight": (H, 3 * c.patch_size ** 2),
           VT + "patch_embedder.position_embedding_table": (2, c.position_embedding_size, H)}
    linears = {"self_attn.q_proj": (c.num_heads * d, H), "self_attn.k_proj": (c.kv_heads * d, H),
               "self_attn.v_proj": (c.kv_heads * d, H), "self_attn.o_proj": (H, c.num_heads * d),
               "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
    for i in range(c.num_layers):
        p = f"{VT}encoder.layers.{i}."
        for name, shape in linears.items():
            out[f"{p}{name}.linear.weight"] = shape
            if c.clipped_linears:
                for bound in ("input_min", "input_max", "output_min", "output_max"):
                    out[f"{p}{name}.{bound}"] = ()
        out[f"{p}self_attn.q_norm.weight"] = (d,)
        out[f"{p}self_attn.k_norm.weight"] = (d,)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            out[f"{p}{norm}.weight"] = (H,)
    if c.standardize:
        out[VT + "std_bias"] = (H,)
        out[VT + "std_scale"] = (H,)
    out[EMB + "embedding_projection.weight"] = (c.text_hidden_size, H)
    return out


@dataclass(frozen=True)
class VisionInfo:
    """What a runtime needs to take images: the tower's config, the image processor's settings and the
    image token ids (`<|image>` boi, `<|image|>` the soft-token placeholder, `<image|>` eoi)."""
    config: VisionConfig
    image: "ImageSettings"
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int
    bidirectional: bool  # text_config.use_bidirectional_attention == "vision": image blocks see each other

    def __post_init__(self):  # images whose patches would fall off the tower's position table are refused
        from dataclasses import replace

        object.__setattr__(self, "image", replace(self.image, max_position=self.config.position_embedding_size))

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "image": self.image.to_dict(), "image_token_id": self.image_token_id,
                "boi_token_id": self.boi_token_id, "eoi_token_id": self.eoi_token_id,
                "bidirectional": self.bidirectional}

    @classmethod
    def from_dict(cls, d: dict, vocab_size: int, where: str = "vision") -> "VisionInfo":
        """From a manifest's `vision` section (untrusted: every value checked)."""
        from . import schema as S
        from .images import ImageSettings

        S.obj(d, where, required=("config", "image", "image_token_id", "boi_token_id", "eoi_token_id",
                                  "bidirectional"))
        ids = {k: S.integer(d[k], f"{where}.{k}", 0, vocab_size - 1)
               for k in ("image_token_id", "boi_token_id", "eoi_token_id")}
        S.obj(d["config"], f"{where}.config", extra=True)
        try:
            cfg = VisionConfig(**d["config"])
            VisionConfig.from_hf(_as_hf(cfg), cfg.text_hidden_size, f"{where}.config")  # the same checks
        except TypeError as e:
            raise S.SchemaError(f"{where}.config", f"not a vision config ({e})") from None
        image = ImageSettings.from_dict(d["image"], f"{where}.image")
        if image.patch_size != cfg.patch_size or image.pooling_kernel_size != cfg.pooling_kernel_size:
            raise S.SchemaError(f"{where}.image", "patch_size and pooling_kernel_size differ from the tower's")
        return cls(cfg, image, bidirectional=S.boolean(d["bidirectional"], f"{where}.bidirectional"), **ids)


def _as_hf(c: VisionConfig) -> dict:
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads, "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim,
            "patch_size": c.patch_size, "pooling_kernel_size": c.pooling_kernel_size,
            "position_embedding_size": c.position_embedding_size, "rms_norm_eps": c.rms_norm_eps,
            "rope_parameters": {"rope_type": "axial", "rope_theta": c.rope_theta}, "standardize": c.standardize,
            "use_clipped_linears": c.clipped_linears, "hidden_activation": c.hidden_activation}


def read_vision(raw: dict, folder, text_hidden: int, vocab_size: int, names, where: str) -> VisionInfo | None:
    """A checkpoint's vision tower, or None when it has none (no vision_config, no vision tensors, or
    image token ids its vocabulary cannot hold: a text-only checkpoint that kept the tower transformers
    builds with every model, as the shipped Sudoku model does). `names`: the tensor names its weight
    files hold."""
    from .images import ImageError, ImageSettings

    vision = raw.get("vision_config")
    if vision is None or not any(n.startswith(VT) for n in names):
        return None
    cfg = VisionConfig.from_hf(vision, text_hidden, where)
    ids = {}
    for key, default in (("image_token_id", 258880), ("boi_token_id", 255999), ("eoi_token_id", 258882)):
        v = raw.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CheckpointError(f"{where}: {key} must be a non-negative token id (got {v!r})")
        ids[key] = v
    if any(v >= vocab_size for v in ids.values()):
        return None  # no prompt can hold an image block: the tower is unreachable
    try:
        image = ImageSettings.from_folder(folder)
    except ImageError as e:
        raise CheckpointError(str(e)) from None
    if image.patch_size != cfg.patch_size or image.pooling_kernel_size != cfg.pooling_kernel_size:
        raise CheckpointError(f"{folder}: the image processor's patch_size/pooling_kernel_size ({image.patch_size}, "
                              f"{image.pooling_kernel_size}) differ from vision_config's ({cfg.patch_size}, "
                              f"{cfg.pooling_kernel_size}); fix processor_config.json")
    mode = (raw.get("text_config") or {}).get("use_bidirectional_attention")
    return VisionInfo(cfg, image, bidirectional=mode == "vision", **ids)
