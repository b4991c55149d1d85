"""The model and sampler settings dgport needs, read from a checkpoint's JSON files.

`TextConfig` is the text-model subset of a DiffusionGemma `config.json` with the per-layer geometry
resolved the way transformers 5.23.0 resolves it; `GenerationDefaults` is `generation_config.json`
with the reference's fallback defaults. Both round-trip through plain dicts (the export manifest).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from dataclasses import dataclass

from . import schema as S
from .errors import CheckpointError, DgportError

SLIDING, FULL = "sliding_attention", "full_attention"


# Bounds on what a config may say. Wide enough for any DiffusionGemma (the 26B-A4B release: vocab
# 262144, hidden 2816, 30 layers, 128 experts top-8, head dims 256/512, window 1024, context 262144),
# narrow enough that a typo or an edit cannot make the runtime allocate without bound.
MAX_VOCAB = 1 << 31
MAX_WIDTH = 1 << 16  # hidden size, heads
MAX_FFN = 1 << 20
MAX_LAYERS = 1024
MAX_EXPERTS = 4096
MAX_HEAD_DIM = 4096
MAX_CANVAS = 65536
MAX_POSITIONS = 1 << 24
DEFAULT_MAX_POSITIONS = 131_072  # transformers' DiffusionGemmaTextConfig default
_MISSING = object()


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
    max_position_embeddings: int = DEFAULT_MAX_POSITIONS

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

    def validate(self) -> None:
        """Every value the graph builders and the step loop use, type- and range-checked; raises
        SchemaError naming the field (callers add the file and what to do)."""
        n = S.integer(self.num_layers, "num_layers", 1, MAX_LAYERS)
        S.integer(self.vocab_size, "vocab_size", 2, MAX_VOCAB)
        S.integer(self.hidden_size, "hidden_size", 1, MAX_WIDTH)
        S.integer(self.intermediate_size, "intermediate_size", 1, MAX_FFN)
        heads = S.integer(self.num_heads, "num_heads", 1, MAX_WIDTH)
        for key in ("layer_types", "head_dims", "kv_heads"):
            S.array(getattr(self, key), key)
            if len(getattr(self, key)) != n:
                raise S.SchemaError(key, f"has {len(getattr(self, key))} entries for {n} layers")
        for i, t in enumerate(self.layer_types):
            S.string(t, f"layer_types[{i}]", choices=(SLIDING, FULL))
        if self.layer_types[-1] != FULL:
            raise S.SchemaError(f"layer_types[{n - 1}]", f"{self.layer_types[-1]!r}: the last layer must be {FULL!r}")
        for i, d in enumerate(self.head_dims):
            S.integer(d, f"head_dims[{i}]", 2, MAX_HEAD_DIM)
            if d % 2:
                raise S.SchemaError(f"head_dims[{i}]", f"{d} is odd; rotary embeddings need an even head size")
        for i, kv in enumerate(self.kv_heads):
            S.integer(kv, f"kv_heads[{i}]", 1, heads)
            if heads % kv:
                raise S.SchemaError(f"kv_heads[{i}]", f"{kv} KV heads do not divide {heads} attention heads")
        S.integer(self.sliding_window, "sliding_window", 2, MAX_POSITIONS)
        experts = S.integer(self.num_experts, "num_experts", 1, MAX_EXPERTS)
        top_k = S.integer(self.top_k_experts, "top_k_experts", 1, MAX_EXPERTS)
        if top_k > experts:
            raise S.SchemaError("top_k_experts", f"{top_k} is more than num_experts ({experts})")
        S.integer(self.moe_intermediate_size, "moe_intermediate_size", 1, MAX_FFN)
        canvas = S.integer(self.canvas_length, "canvas_length", 1, MAX_CANVAS)
        positions = S.integer(self.max_position_embeddings, "max_position_embeddings", 2, MAX_POSITIONS)
        if positions <= canvas:
            raise S.SchemaError("max_position_embeddings",
                                f"{positions} leaves no room for a prompt before a canvas of {canvas}")
        S.number(self.rms_norm_eps, "rms_norm_eps", 0.0, 1.0, lo_open=True)
        S.number(self.sliding_rope_theta, "sliding_rope_theta", 0.0, 1e12, lo_open=True)
        S.number(self.full_rope_theta, "full_rope_theta", 0.0, 1e12, lo_open=True)
        S.number(self.full_partial_rotary_factor, "full_partial_rotary_factor", 0.0, 1.0)
        S.number(self.final_logit_softcapping, "final_logit_softcapping", 0.0, 1e6, lo_open=True)
        S.string(self.hidden_activation, "hidden_activation", choices=("gelu_pytorch_tanh",))
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            S.integer(getattr(self, key), key, 0, self.vocab_size - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TextConfig":
        """From the manifest's dict: every field present with its type (raises SchemaError with
        `where.field`)."""
        fields = [f.name for f in dataclasses.fields(cls)]
        S.obj(d, where, required=fields)
        try:
            d = dict(d)
            for k in ("layer_types", "head_dims", "kv_heads"):
                d[k] = tuple(S.array(d[k], f"{where}.{k}"))
            config = cls(**d)
            config.validate()
        except S.SchemaError as e:
            raise S.SchemaError(S.key_path(where, e.path) if not e.path.startswith(where + ".") else e.path,
                                e.problem) from None
        return config

    @classmethod
    def from_hf(cls, config: dict, where: str = "config.json") -> "TextConfig":
        """Resolve a DiffusionGemma `config.json` (top level, with `text_config`)."""
        def bad(key: str, problem: str):
            return CheckpointError(f"{where}: {key}: {problem}; fix config.json or re-save the checkpoint "
                                   "with transformers")

        if not isinstance(config, dict):
            raise CheckpointError(f"{where}: not a JSON object; the file is not a DiffusionGemma config")
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

        def read(fn, key, *args, default=_MISSING, src=None, label=None):
            """src[key] (default: text_config) checked by `fn` (schema.integer/number), `default` when absent."""
            value = (tc if src is None else src).get(key)
            if value is None:
                value = need(key) if default is _MISSING else default
            try:
                return fn(value, key, *args)
            except S.SchemaError as e:
                raise bad(label or f"text_config.{key}", e.problem) from None

        n_layers = read(S.integer, "num_hidden_layers", 1, MAX_LAYERS)
        layer_types = tc.get("layer_types") or [
            SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)
        ]
        try:
            layer_types = S.array(layer_types, "layer_types", lambda v, p: S.string(v, p))
        except S.SchemaError as e:
            raise bad("text_config." + e.path, e.problem) from None
        if len(layer_types) != n_layers:
            raise DgportError(f"{where}: text_config.layer_types has {len(layer_types)} entries for {n_layers} layers")
        bad_types = sorted(set(layer_types) - {SLIDING, FULL})
        if bad_types:
            raise DgportError(f"{where}: unknown layer type(s) {bad_types} in text_config.layer_types")
        layer_types[-1] = FULL  # the reference forces the last layer to full attention

        head_dim = read(S.integer, "head_dim", 2, MAX_HEAD_DIM, default=256)
        kv = read(S.integer, "num_key_value_heads", 1, MAX_WIDTH, default=4)
        head_dims, kv_heads = [head_dim] * n_layers, [kv] * n_layers
        per_layer = tc.get("per_layer_config")
        if per_layer is not None:  # written by transformers >= 5.2x: explicit per-layer overrides
            if not isinstance(per_layer, dict):
                raise bad("text_config.per_layer_config", f"{type(per_layer).__name__}, expected an object")
            for key, over in per_layer.items():
                if not (str(key).isdigit() and int(key) < n_layers) or not isinstance(over, dict):
                    raise bad(f"text_config.per_layer_config.{key}",
                              f"expected a layer index below {n_layers} with an object of overrides")
                i = int(key)
                head_dims[i] = read(S.integer, "head_dim", 2, MAX_HEAD_DIM, default=head_dims[i], src=over,
                                    label=f"text_config.per_layer_config.{key}.head_dim")
                kv_heads[i] = read(S.integer, "num_key_value_heads", 1, MAX_WIDTH, default=kv_heads[i], src=over,
                                   label=f"text_config.per_layer_config.{key}.num_key_value_heads")
        else:  # the released checkpoint's form: global_head_dim / num_global_key_value_heads
            g_dim = read(S.integer, "global_head_dim", 2, MAX_HEAD_DIM, default=512)
            g_kv = tc.get("num_global_key_value_heads")
            if g_kv is not None:
                g_kv = read(S.integer, "num_global_key_value_heads", 1, MAX_WIDTH, default=None)
            for i, t in enumerate(layer_types):
                if t == FULL:
                    head_dims[i] = g_dim
                    if g_kv is not None:
                        kv_heads[i] = g_kv

        rope = tc.get("rope_parameters") or {}
        if not isinstance(rope, dict) or not all(isinstance(rope.get(t) or {}, dict) for t in (SLIDING, FULL)):
            raise bad("text_config.rope_parameters", "expected an object per layer type")
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

        num_heads = read(S.integer, "num_attention_heads", 1, MAX_WIDTH)
        for i in range(n_layers):
            if num_heads % kv_heads[i]:
                raise DgportError(f"{where}: layer {i} has {kv_heads[i]} KV heads, which do not divide {num_heads} heads")
        eos = tc.get("eos_token_id", 1)
        if isinstance(eos, list):
            if not eos:
                raise bad("text_config.eos_token_id", "an empty list")
            eos = eos[0]

        def rope_value(src, key, default, lo, hi, lo_open, name):
            try:
                return S.number(src.get(key, default), key, lo, hi, lo_open=lo_open)
            except S.SchemaError as e:
                raise bad(f"text_config.rope_parameters.{name}.{key}", e.problem) from None

        cfg = cls(
            vocab_size=read(S.integer, "vocab_size", 2, MAX_VOCAB),
            hidden_size=read(S.integer, "hidden_size", 1, MAX_WIDTH),
            intermediate_size=read(S.integer, "intermediate_size", 1, MAX_FFN),
            num_layers=n_layers,
            num_heads=num_heads,
            layer_types=tuple(layer_types),
            head_dims=tuple(head_dims),
            kv_heads=tuple(kv_heads),
            sliding_window=read(S.integer, "sliding_window", 2, MAX_POSITIONS, default=512),
            num_experts=read(S.integer, "num_experts", 1, MAX_EXPERTS),
            top_k_experts=read(S.integer, "top_k_experts", 1, MAX_EXPERTS),
            moe_intermediate_size=read(S.integer, "moe_intermediate_size", 1, MAX_FFN),
            canvas_length=read(S.integer, "canvas_length", 1, MAX_CANVAS, default=256, src=config,
                               label="canvas_length"),
            rms_norm_eps=read(S.number, "rms_norm_eps", 0.0, 1.0, True, default=1e-6),
            sliding_rope_theta=rope_value(s_rope, "rope_theta", 10_000.0, 0.0, 1e12, True, SLIDING),
            full_rope_theta=rope_value(f_rope, "rope_theta", 1e6, 0.0, 1e12, True, FULL),
            full_partial_rotary_factor=rope_value(f_rope, "partial_rotary_factor", 1.0, 0.0, 1.0, False, FULL),
            final_logit_softcapping=read(S.number, "final_logit_softcapping", 0.0, 1e6, True, default=30.0,
                                         src={"final_logit_softcapping": tc.get("final_logit_softcapping") or None}),
            pad_token_id=read(S.integer, "pad_token_id", 0, MAX_VOCAB, default=0),
            eos_token_id=read(S.integer, "eos_token_id", 0, MAX_VOCAB, default=1, src={"eos_token_id": eos}),
            bos_token_id=read(S.integer, "bos_token_id", 0, MAX_VOCAB, default=2),
            max_position_embeddings=read(S.integer, "max_position_embeddings", 2, MAX_POSITIONS,
                                         default=DEFAULT_MAX_POSITIONS),
        )
        try:
            cfg.validate()
        except S.SchemaError as e:
            raise bad(HF_NAMES.get(e.path.split("[")[0], "text_config." + e.path.split("[")[0]), e.problem) from None
        return cfg


# TextConfig fields -> where config.json says them (for messages about a checkpoint's config)
HF_NAMES = {
    "num_layers": "text_config.num_hidden_layers", "num_heads": "text_config.num_attention_heads",
    "head_dims": "text_config.head_dim / global_head_dim", "kv_heads": "text_config.num_key_value_heads",
    "canvas_length": "canvas_length", "sliding_rope_theta": "text_config.rope_parameters.sliding_attention",
    "full_rope_theta": "text_config.rope_parameters.full_attention",
    "full_partial_rotary_factor": "text_config.rope_parameters.full_attention",
}


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
    def from_dict(cls, d: dict, where: str = "generation") -> "GenerationDefaults":
        """From the manifest's dict: every field present with its type (raises SchemaError with
        `where.field`)."""
        S.obj(d, where, required=[f.name for f in dataclasses.fields(cls)])
        d = dict(d)
        d["eos_token_ids"] = tuple(S.array(d["eos_token_ids"], f"{where}.eos_token_ids"))
        merged = cls(**d)
        try:
            merged.validate()
        except S.SchemaError as e:
            raise S.SchemaError(S.key_path(where, e.path), e.problem) from None
        return merged

    @classmethod
    def from_hf(cls, gen: dict | None, text: TextConfig, model_eos=None, where: str = "generation_config.json"
                ) -> "GenerationDefaults":
        gen = gen or {}
        if not isinstance(gen, dict):
            raise CheckpointError(f"{where}: not a JSON object; fix or delete it")
        sampler = gen.get("sampler_config") or {}
        if not isinstance(sampler, dict):
            raise CheckpointError(f"{where}: sampler_config: expected an object; fix or delete it")
        eos = gen.get("eos_token_id", model_eos if model_eos is not None else text.eos_token_id)
        eos = eos if isinstance(eos, list) else [eos]
        base = cls()
        pad = gen.get("pad_token_id")

        def pick(key, default, src=gen, falsy_default=False):
            value = src.get(key)
            # the reference falls back on `or` for these (0 means "use the default")
            return default if value is None or (falsy_default and not value) else value

        try:
            merged = cls(
                max_new_tokens=pick("max_new_tokens", base.max_new_tokens, falsy_default=True),
                max_denoising_steps=pick("max_denoising_steps", base.max_denoising_steps, falsy_default=True),
                entropy_bound=pick("entropy_bound", base.entropy_bound, sampler),
                t_min=pick("t_min", base.t_min),
                t_max=pick("t_max", base.t_max),
                stability_threshold=pick("stability_threshold", base.stability_threshold),
                confidence_threshold=pick("confidence_threshold", base.confidence_threshold, falsy_default=True),
                eos_token_ids=tuple(eos),
                pad_token_id=text.pad_token_id if pad is None else pad,
            )
            merged.validate()
            for i, e in enumerate(merged.eos_token_ids):
                S.integer(e, f"eos_token_ids[{i}]", 0, text.vocab_size - 1)
            S.integer(merged.pad_token_id, "pad_token_id", 0, text.vocab_size - 1)
        except S.SchemaError as e:
            key = {"eos_token_ids": "eos_token_id", "entropy_bound": "sampler_config.entropy_bound"}.get(
                e.path.split("[")[0], e.path)
            raise CheckpointError(f"{where}: {key + ': ' if key else ''}{e.problem}; fix generation_config.json") \
                from None
        # JSON ints where the reference casts: keep the dataclass's types
        return dataclasses.replace(merged, max_new_tokens=int(merged.max_new_tokens),
                                   max_denoising_steps=int(merged.max_denoising_steps),
                                   stability_threshold=int(merged.stability_threshold),
                                   entropy_bound=float(merged.entropy_bound), t_min=float(merged.t_min),
                                   t_max=float(merged.t_max), confidence_threshold=float(merged.confidence_threshold),
                                   eos_token_ids=tuple(int(e) for e in merged.eos_token_ids),
                                   pad_token_id=int(merged.pad_token_id))

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
        """Every setting typed, finite and in range; raises SchemaError (a DgportError) whose message
        names the setting as the API spells it (the CLI flag is the same name with dashes)."""
        def positive_int(key, hi):
            value = getattr(self, key)
            if not S.is_int(value) or not 1 <= value <= hi:
                raise S.SchemaError("", f"{key} must be a positive integer up to {hi} (got {value!r})")

        def finite(key, lo, hi, rule):
            value = getattr(self, key)
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
                and math.isfinite(value) and lo(value) and value <= hi
            if not ok:
                raise S.SchemaError("", f"{key} must be a finite number {rule} (got {value!r})")

        positive_int("max_new_tokens", MAX_NEW_TOKENS)
        if S.is_int(self.max_denoising_steps) and self.max_denoising_steps < 1:
            raise S.SchemaError("", f"max_denoising_steps must be >= 1 (got {self.max_denoising_steps!r})")
        positive_int("max_denoising_steps", MAX_DENOISING_STEPS)
        if isinstance(self.entropy_bound, (int, float)) and not isinstance(self.entropy_bound, bool) \
                and self.entropy_bound <= 0:
            raise S.SchemaError("", f"entropy_bound must be > 0 (got {self.entropy_bound})")
        finite("entropy_bound", lambda v: v > 0, MAX_ENTROPY, f"> 0 and <= {MAX_ENTROPY:g}")
        finite("t_min", lambda v: v >= 0, MAX_TEMPERATURE, f"in [0, {MAX_TEMPERATURE:g}]")
        finite("t_max", lambda v: v > 0, MAX_TEMPERATURE, f"in (0, {MAX_TEMPERATURE:g}]")
        if self.t_min > self.t_max:
            raise S.SchemaError("", f"t_min ({self.t_min}) must not be above t_max ({self.t_max})")
        value = self.stability_threshold
        if S.is_int(value) and value < 0:
            raise S.SchemaError("", f"stability_threshold must be >= 0 (got {value!r})")
        if not S.is_int(value) or value > MAX_STABILITY:
            raise S.SchemaError("", f"stability_threshold must be an integer in [0, {MAX_STABILITY}] (got {value!r})")
        if isinstance(self.confidence_threshold, (int, float)) and not isinstance(self.confidence_threshold, bool) \
                and self.confidence_threshold <= 0:
            raise S.SchemaError("", f"confidence_threshold must be > 0 (got {self.confidence_threshold})")
        finite("confidence_threshold", lambda v: v > 0, MAX_ENTROPY, f"> 0 and <= {MAX_ENTROPY:g}")
        ids = self.eos_token_ids
        if not isinstance(ids, (tuple, list)) or not 1 <= len(ids) <= 1024 or \
                not all(S.is_int(e) and 0 <= e < MAX_VOCAB for e in ids):
            raise S.SchemaError("", f"eos_token_ids must be a non-empty list of token ids (got {_short(ids)})")
        if not S.is_int(self.pad_token_id) or not 0 <= self.pad_token_id < MAX_VOCAB:
            raise S.SchemaError("", f"pad_token_id must be a token id (got {self.pad_token_id!r})")


# Bounds on sampler settings: what a run could use, with room; beyond them a value is a mistake
# (a stability threshold of 10**12 would allocate that many canvases of history).
MAX_NEW_TOKENS = MAX_POSITIONS
MAX_DENOISING_STEPS = 10_000
MAX_STABILITY = 1000
MAX_TEMPERATURE = 100.0
MAX_ENTROPY = 1e9


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
