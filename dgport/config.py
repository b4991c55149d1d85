"""The model and sampler settings dgport needs, read from a checkpoint's JSON files.

`TextConfig` is the text-model subset of a DiffusionGemma `config.json` with the per-layer geometry
resolved the way transformers 5.23.0 resolves it; `GenerationDefaults` is `generation_config.json`
with the reference's fallback defaults. Both round-trip through plain dicts (the export manifest).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import DgportError

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_types: tuple[str, ...]
    head_dims: tuple[int, ...]  # per layer
    kv_heads: tuple[int, ...]  # per layer
    sliding_window: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    canvas_length: int
    rms_norm_eps: float = 1e-6
    sliding_rope_theta: float = 10_000.0
    full_rope_theta: float = 1_000_000.0
    full_partial_rotary_factor: float = 0.25
    final_logit_softcapping: float = 30.0
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2

    @property
    def sliding_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == SLIDING]

    @property
    def full_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL]

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def sliding_cache_len(self) -> int:
        """Positions a sliding layer keeps in its cache (the reference keeps `sliding_window - 1`)."""
        return self.sliding_window - 1

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def rope_inv_freq(self, layer: int) -> list[float]:
        """Inverse frequencies for the half-split RoPE of one layer: head_dim // 2 values, zero where
        a proportional (partial) rotary leaves dimensions unrotated."""
        d = self.head_dims[layer]
        if self.is_sliding(layer):
            return [1.0 / (self.sliding_rope_theta ** (2 * i / d)) for i in range(d // 2)]
        rotated = int(self.full_partial_rotary_factor * d) // 2
        return [1.0 / (self.full_rope_theta ** (2 * i / d)) if i < rotated else 0.0 for i in range(d // 2)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        d = dict(d)
        for k in ("layer_types", "head_dims", "kv_heads"):
            d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def from_hf(cls, config: dict, where: str = "config.json") -> "TextConfig":
        """Resolve a DiffusionGemma `config.json` (top level, with `text_config`)."""
        if config.get("model_type") != "diffusion_gemma":
            raise DgportError(
                f"{where}: model_type is {config.get('model_type')!r}, expected 'diffusion_gemma'; "
                "point dgport at a DiffusionGemma checkpoint folder"
            )
        tc = config.get("text_config")
        if not isinstance(tc, dict):
            raise DgportError(f"{where}: no 'text_config' section; the file is not a DiffusionGemma config")

        def need(key):
            if tc.get(key) is None:
                raise DgportError(f"{where}: text_config.{key} is missing; re-save the checkpoint with transformers")
            return tc[key]

        n_layers = int(need("num_hidden_layers"))
        layer_types = tc.get("layer_types") or [
            SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)
        ]
        layer_types = list(layer_types)
        if len(layer_types) != n_layers:
            raise DgportError(f"{where}: text_config.layer_types has {len(layer_types)} entries for {n_layers} layers")
        bad = sorted(set(layer_types) - {SLIDING, FULL})
        if bad:
            raise DgportError(f"{where}: unknown layer type(s) {bad} in text_config.layer_types")
        layer_types[-1] = FULL  # the reference forces the last layer to full attention

        head_dim = int(tc.get("head_dim", 256))
        kv = int(tc.get("num_key_value_heads", 4))
        head_dims, kv_heads = [head_dim] * n_layers, [kv] * n_layers
        per_layer = tc.get("per_layer_config")
        if per_layer is not None:  # written by transformers >= 5.2x: explicit per-layer overrides
            for key, over in per_layer.items():
                i = int(key)
                head_dims[i] = int(over.get("head_dim", head_dims[i]))
                kv_heads[i] = int(over.get("num_key_value_heads", kv_heads[i]))
        else:  # the released checkpoint's form: global_head_dim / num_global_key_value_heads
            g_dim = int(tc.get("global_head_dim", 512))
            g_kv = tc.get("num_global_key_value_heads")
            for i, t in enumerate(layer_types):
                if t == FULL:
                    head_dims[i] = g_dim
                    if g_kv is not None:
                        kv_heads[i] = int(g_kv)

        rope = tc.get("rope_parameters") or {}
        s_rope = rope.get(SLIDING) or {"rope_type": "default", "rope_theta": 10_000.0}
        f_rope = rope.get(FULL) or {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}
        if s_rope.get("rope_type", "default") != "default":
            raise DgportError(f"{where}: sliding-layer rope_type {s_rope.get('rope_type')!r} is not supported")
        if f_rope.get("rope_type", "default") not in ("default", "proportional"):
            raise DgportError(f"{where}: full-layer rope_type {f_rope.get('rope_type')!r} is not supported")
        if tc.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise DgportError(f"{where}: hidden_activation {tc.get('hidden_activation')!r} is not supported")
        if tc.get("use_bidirectional_attention") == "all":
            raise DgportError(f"{where}: use_bidirectional_attention='all' (a non-causal encoder) is not supported")

        num_heads = int(need("num_attention_heads"))
        for i in range(n_layers):
            if num_heads % kv_heads[i]:
                raise DgportError(f"{where}: layer {i} has {kv_heads[i]} KV heads, which do not divide {num_heads} heads")
        eos = tc.get("eos_token_id", 1)
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")),
            num_layers=n_layers,
            num_heads=num_heads,
            layer_types=tuple(layer_types),
            head_dims=tuple(head_dims),
            kv_heads=tuple(kv_heads),
            sliding_window=int(tc.get("sliding_window", 512)),
            num_experts=int(need("num_experts")),
            top_k_experts=int(need("top_k_experts")),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            canvas_length=int(config.get("canvas_length") or 256),
            rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
            sliding_rope_theta=float(s_rope.get("rope_theta", 10_000.0)),
            full_rope_theta=float(f_rope.get("rope_theta", 1e6)),
            full_partial_rotary_factor=float(f_rope.get("partial_rotary_factor", 1.0)),
            final_logit_softcapping=float(tc.get("final_logit_softcapping") or 30.0),
            pad_token_id=int(tc.get("pad_token_id", 0) if tc.get("pad_token_id") is not None else 0),
            eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
            bos_token_id=int(tc.get("bos_token_id", 2)),
        )


@dataclass(frozen=True)
class GenerationDefaults:
    """The sampler's settings. Defaults are the reference's fallbacks (spec §1.3)."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int = 0

    SAMPLER_KEYS = (
        "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold", "confidence_threshold",
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationDefaults":
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", (1,)))
        return cls(**d)

    @classmethod
    def from_hf(cls, gen: dict | None, text: TextConfig, model_eos=None) -> "GenerationDefaults":
        gen = gen or {}
        eos = gen.get("eos_token_id", model_eos if model_eos is not None else text.eos_token_id)
        eos = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
        sampler = gen.get("sampler_config") or {}
        base = cls()
        pad = gen.get("pad_token_id")
        return cls(
            max_new_tokens=int(gen.get("max_new_tokens") or base.max_new_tokens),
            max_denoising_steps=int(gen.get("max_denoising_steps") or base.max_denoising_steps),
            entropy_bound=float(sampler.get("entropy_bound", base.entropy_bound)),
            t_min=float(gen["t_min"] if gen.get("t_min") is not None else base.t_min),
            t_max=float(gen["t_max"] if gen.get("t_max") is not None else base.t_max),
            stability_threshold=int(
                gen["stability_threshold"] if gen.get("stability_threshold") is not None else base.stability_threshold
            ),
            confidence_threshold=float(gen.get("confidence_threshold") or base.confidence_threshold),
            eos_token_ids=eos,
            pad_token_id=int(pad if pad is not None else text.pad_token_id),
        )

    def with_overrides(self, **overrides) -> "GenerationDefaults":
        """Apply user overrides (None means keep) and validate the result."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise DgportError(f"unknown sampler setting(s) {unknown}; known: {sorted(known)}")
        merged = dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})
        merged.validate()
        return merged

    def validate(self) -> None:
        if self.max_new_tokens is None or self.max_new_tokens <= 0:
            raise DgportError(f"max_new_tokens must be a positive integer (got {self.max_new_tokens})")
        if self.max_denoising_steps < 1:
            raise DgportError(f"max_denoising_steps must be >= 1 (got {self.max_denoising_steps})")
        if not self.entropy_bound > 0:
            raise DgportError(f"entropy_bound must be > 0 (got {self.entropy_bound})")
        if self.t_min < 0 or self.t_max < 0:
            raise DgportError(f"t_min and t_max must be >= 0 (got t_min={self.t_min}, t_max={self.t_max})")
        if not self.t_max > 0:
            raise DgportError(f"t_max must be > 0 (got {self.t_max})")
        if self.t_min > self.t_max:
            raise DgportError(f"t_min ({self.t_min}) must not be above t_max ({self.t_max})")
        if self.stability_threshold < 0:
            raise DgportError(f"stability_threshold must be >= 0 (got {self.stability_threshold})")
        if not self.confidence_threshold > 0:
            raise DgportError(f"confidence_threshold must be > 0 (got {self.confidence_threshold})")
