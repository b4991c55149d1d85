"""Small DiffusionGemma checkpoints for tests and benchmarks, built with the transformers classes.

`build_fixture(name, out_dir)` writes a complete Hugging Face checkpoint folder (config.json,
model.safetensors from `save_pretrained`, generation_config.json, tokenizer.json,
tokenizer_config.json with a Gemma-4-style chat template) from a named preset, with random weights
and a fixed seed, so every run builds byte-identical weights. Needs torch and transformers.

Random weights give near-uniform next-token distributions, so the sampler would never accept more
than a token per step nor stop early. Presets that must exercise adaptive stopping or EOS shrink the
layers' contributions to the residual stream (`residual_gain`) and widen the embedding
(`embed_std`), which makes the denoiser lean towards predicting its own input confidently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

SPECIAL_TOKENS = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
    48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>',
    60: "<|image>", 61: "<|image|>", 62: "<image|>",
    98: "<|think|>", 100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>",
}
FIRST_BYTE_ID = 108  # byte-level tokens follow Gemma's reserved/special range

# Gemma 4 chat format (spec §7): non-thinking prompts pre-fill an empty thought channel.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set sys = messages[0].content | trim if messages and messages[0].role == 'system' else none -%}"
    "{%- if enable_thinking or sys is not none -%}"
    "<|turn>system{{ '\\n' }}{%- if enable_thinking -%}<|think|>{{ '\\n' }}{%- endif -%}"
    "{%- if sys is not none -%}{{ sys }}{%- endif -%}<turn|>{{ '\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}{%- if m.role != 'system' -%}"
    "<|turn>{{ 'model' if m.role == 'assistant' else m.role }}{{ '\\n' }}{{ m.content | trim }}<turn|>{{ '\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|turn>model{{ '\\n' }}"
    "{%- if not enable_thinking -%}<|channel>thought{{ '\\n' }}<channel|>{%- endif -%}"
    "{%- endif -%}"
)

# The same format with Gemma 4's tools (spec section 7), for tests and docs of tool calling: declarations
# in the system turn, an assistant's calls as <|tool_call>call:NAME{k:v}<tool_call|> (strings between
# <|"|>), a tool message as <|tool_response>response:NAME{value:...}<tool_response|>.
TOOLS_CHAT_TEMPLATE = (
    "{%- macro g(v) -%}"
    "{%- if v is string -%}<|\"|>{{ v }}<|\"|>"
    "{%- elif v is mapping -%}{{ '{' }}{%- for k, x in v.items() -%}{{ k }}:{{ g(x) }}"
    "{%- if not loop.last -%},{%- endif -%}{%- endfor -%}{{ '}' }}"
    "{%- elif v is sequence -%}[{%- for x in v -%}{{ g(x) }}{%- if not loop.last -%},{%- endif -%}{%- endfor -%}]"
    "{%- elif v is none -%}null{%- elif v is sameas true -%}true{%- elif v is sameas false -%}false"
    "{%- else -%}{{ v }}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- set sys = messages[0].content | trim if messages and messages[0].role == 'system' else none -%}"
    "{%- if tools or enable_thinking or sys is not none -%}"
    "<|turn>system{{ '\\n' }}{%- if enable_thinking -%}<|think|>{{ '\\n' }}{%- endif -%}"
    "{%- if sys is not none -%}{{ sys }}{%- endif -%}"
    "{%- for t in tools or [] -%}<|tool>declaration:{{ t.function.name }}"
    "{{ g({'description': t.function.description or '', 'parameters': t.function.parameters or {}}) }}<tool|>"
    "{%- endfor -%}<turn|>{{ '\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}{%- if m.role == 'tool' -%}"
    "<|tool_response>response:{{ m.name }}{{ g({'value': m.content}) }}<tool_response|>{{ '\\n' }}"
    "{%- elif m.role != 'system' -%}"
    "<|turn>{{ 'model' if m.role == 'assistant' else m.role }}{{ '\\n' }}{{ (m.content or '') | trim }}"
    "{%- for c in m.tool_calls or [] -%}<|tool_call>call:{{ c.function.name }}{{ g(c.function.arguments) }}"
    "<tool_call|>{%- endfor -%}<turn|>{{ '\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|turn>model{{ '\\n' }}"
    "{%- if not enable_thinking -%}<|channel>thought{{ '\\n' }}<channel|>{%- endif -%}"
    "{%- endif -%}"
)

# The plain format with images: a content part {"type": "image"} renders as the image placeholder, which
# the processor expands to <|image> + n x <|image|> + <image|> (n: the image's soft tokens).
VISION_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ m.content | trim }}",
    "{%- if m.content is string -%}{{ m.content | trim }}{%- else -%}{%- for p in m.content -%}"
    "{%- if p.type == 'image' -%}<|image|>{%- elif p.type == 'text' -%}{{ p.text | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}")
IMAGE_TOKENS = {"boi_token_id": 60, "image_token_id": 61, "eoi_token_id": 62}

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class Preset:
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 96
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    global_head_dim: int = 32
    num_global_key_value_heads: int = 1
    layer_types: tuple = (SLIDING, FULL, SLIDING, FULL)
    sliding_window: int = 16
    num_experts: int = 4
    top_k_experts: int = 2
    moe_intermediate_size: int = 32
    canvas_length: int = 16
    partial_rotary_factor: float = 0.25
    seed: int = 0
    embed_std: float = 0.02
    residual_gain: float = 1.0  # scales every post-* norm weight: < 1 keeps the residual near the input
    eos_boost: float = 1.0  # scales the embedding rows of the EOS ids (makes EOS a likelier argmax)
    generation: dict = field(default_factory=dict)
    torch_dtype: str = "float32"  # dtype the weights are created and saved in
    router_std: float | None = None  # std of router.proj weights (None: transformers' init, near-uniform routing)
    qk_norm_scale: float = 1.0  # scales q_norm/k_norm weights; attention has no 1/sqrt(d), so 1.0 gives
    # near-one-hot attention on wide heads (a discrete choice that rounding can flip)
    chat_template: str = "plain"  # "tools": TOOLS_CHAT_TEMPLATE (Gemma 4's tool declarations and calls)
    # the vision tower's config (transformers' Gemma4VisionConfig keys) and the image processor's
    # (processor_config.json); None: a tiny tower that no test feeds (and no processor config)
    vision: dict | None = None
    image_processor: dict | None = None


BASE_GENERATION = {
    "max_new_tokens": 48,
    "max_denoising_steps": 6,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "eos_token_id": [1, 106, 50],
    "pad_token_id": 0,
    "bos_token_id": 2,
}

PRESETS: dict[str, Preset] = {
    # near-uniform outputs: every canvas runs all steps; sliding + full (K=V) layers, MoE top-2
    "tiny": Preset(),
    # confident denoiser: adaptive stopping fires well before max_denoising_steps
    "confident": Preset(seed=1, embed_std=1.0, residual_gain=0.3, generation={"max_denoising_steps": 12}),
    # a sliding window (7 cached positions) far shorter than prompts and canvases
    "long-context": Preset(seed=2, sliding_window=8, layer_types=(SLIDING, SLIDING, FULL, SLIDING, FULL)),
    # EOS ids are likely argmaxes: generation stops inside a canvas
    "eos": Preset(seed=3, embed_std=1.0, residual_gain=0.15, eos_boost=2.5,
                  generation={"max_denoising_steps": 12, "max_new_tokens": 64}),
}


# Presets too large for the per-preset test matrix (not in PRESETS, so not in ALL_PRESETS).
LARGE_PRESETS: dict[str, Preset] = {
    # the real 26B-A4B layer geometry (hidden 2816, 16 heads, kv 8 / global kv 2, head dims 256/512,
    # 128 experts top-8 of 704, intermediate 2112, sliding window 1024, partial rotary 0.25), one
    # sliding and one full layer, a reduced vocabulary and canvas; bf16 weights (~3.1 GB) like the
    # released checkpoint
    "real-slice": Preset(
        vocab_size=512, hidden_size=2816, intermediate_size=2112, num_attention_heads=16, num_key_value_heads=8,
        head_dim=256, global_head_dim=512, num_global_key_value_heads=2, layer_types=(SLIDING, FULL),
        sliding_window=1024, num_experts=128, top_k_experts=8, moe_intermediate_size=704, canvas_length=16,
        seed=4, torch_dtype="bfloat16", router_std=2.0, qk_norm_scale=0.25, generation={"max_new_tokens": 16, "max_denoising_steps": 2}),
}


# Presets for image input (not in PRESETS: the text matrix does not run on them).
VISION_PRESETS: dict[str, Preset] = {
    # images: a small tower with grouped heads, an odd patch size and standardization; up to 70 soft
    # tokens an image (630 patches of 4x4 pixels)
    "vision": Preset(seed=5, embed_std=1.0, residual_gain=0.3, chat_template="vision",
                     generation={"max_denoising_steps": 8},
                     vision=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=8, patch_size=4, pooling_kernel_size=3,
                                 position_embedding_size=96, standardize=True),
                     image_processor=dict(patch_size=4, pooling_kernel_size=3, max_soft_tokens=70)),
}


# prompts every backend must turn into the same tokens as the torch reference, per preset, for each seed
PROMPTS = {
    "tiny": [[2, 105, 300, 301, 302, 106, 107]],
    "confident": [[2, 120, 121, 122, 123]],
    "long-context": [[2] + list(range(130, 157))],  # 28 tokens: > sliding window (8), several canvases
    "eos": [[2, 140, 141, 142], [2, 200, 201]],
}
SEEDS = (0, 1)


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    if vocab_size < FIRST_BYTE_ID + len(alphabet):
        raise ValueError(f"vocab_size must be >= {FIRST_BYTE_ID + len(alphabet)} for the byte-level fixture tokenizer")
    vocab = {}
    for i in range(vocab_size):
        if i in SPECIAL_TOKENS:
            vocab[SPECIAL_TOKENS[i]] = i
        elif FIRST_BYTE_ID <= i < FIRST_BYTE_ID + len(alphabet):
            vocab[sorted(alphabet)[i - FIRST_BYTE_ID]] = i
        else:
            vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t in vocab if t.startswith("<") and t.endswith(">")])
    return tok


def save_tokenizer(out_dir: Path, tokenizer, chat_template: str, model_max_length: int) -> None:
    """tokenizer.json and a tokenizer_config.json with Gemma's named special tokens and the chat template."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "chat_template": chat_template,
        "model_max_length": model_max_length,
    }, indent=2))


def write_tokenizer(out_dir: Path, vocab_size: int, chat_template: str = CHAT_TEMPLATE) -> None:
    """The byte-level fixture tokenizer (Gemma's special ids) with the chat template."""
    save_tokenizer(out_dir, _tokenizer(vocab_size), chat_template, 1_000_000)


def hf_config(p: Preset):
    from transformers import DiffusionGemmaConfig

    text = dict(
        vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=len(p.layer_types), num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads, head_dim=p.head_dim, global_head_dim=p.global_head_dim,
        num_global_key_value_heads=p.num_global_key_value_heads, layer_types=list(p.layer_types),
        sliding_window=p.sliding_window, num_experts=p.num_experts, top_k_experts=p.top_k_experts,
        moe_intermediate_size=p.moe_intermediate_size, max_position_embeddings=8192,
        use_bidirectional_attention="vision",
        rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": p.partial_rotary_factor,
                   "rope_theta": 1_000_000.0},
        },
    )
    # Text presets keep the tower tiny so fixtures stay small (no test feeds it images).
    vision = dict(model_type="gemma4_vision", **(p.vision or dict(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
        head_dim=16)))
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=p.canvas_length,
                                eos_token_id=[1, 106], **IMAGE_TOKENS)


def build_model(p: Preset):
    """A DiffusionGemmaForBlockDiffusion with seeded random weights, in float32."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(p.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, p.torch_dtype))
    try:
        model = DiffusionGemmaForBlockDiffusion(hf_config(p)).eval()
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator().manual_seed(p.seed + 1000)
    with torch.no_grad():
        emb = model.model.decoder.embed_tokens.weight
        emb.normal_(0.0, p.embed_std, generator=g)
        emb[[1, 106, 50]] *= p.eos_boost
        if p.vision is not None:  # weights at a scale where every part of the tower matters
            tower = model.model.encoder.vision_tower
            for name, prm in list(tower.named_parameters()) + list(model.model.encoder.embed_vision.named_parameters()):
                prm.copy_(torch.randn(prm.shape, generator=g) * (0.3 if prm.dim() < 2 else prm.shape[-1] ** -0.5))
            for name, buf in tower.named_buffers():
                if name == "std_bias":
                    buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
                elif name == "std_scale":
                    buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
        for name, prm in model.model.decoder.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight") or "_layernorm_" in name:
                prm.copy_(1.0 + 0.1 * torch.randn(prm.shape, generator=g))
                if ".post_" in name:
                    prm.mul_(p.residual_gain)
            elif name.endswith("router.scale") or name.endswith("per_expert_scale"):
                prm.copy_(1.0 + 0.2 * torch.rand(prm.shape, generator=g))
        if p.qk_norm_scale != 1.0:
            for name, prm in model.model.decoder.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    prm.mul_(p.qk_norm_scale)
        if p.router_std is not None:  # a decisive router, as trained ones are: top-k not decided by rounding
            for layer in model.model.decoder.layers:
                layer.router.proj.weight.normal_(0.0, p.router_std, generator=g)
        dec_layers = model.model.decoder.layers
        enc_layers = model.model.encoder.language_model.layers
        for dec, enc in zip(dec_layers, enc_layers):
            s = 0.6 + 0.4 * torch.rand(1, generator=g)
            dec.layer_scalar.copy_(s)
            # the encoder's scalars are separate buffers; make them differ so a mix-up fails parity
            enc.layer_scalar.copy_(s * 0.97)
    return model


def build_fixture(name: str, out_dir, **overrides) -> Path:
    """Write preset `name` (with dataclass field overrides) as an HF checkpoint folder."""
    p = replace({**PRESETS, **LARGE_PRESETS, **VISION_PRESETS}[name], **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(p)
    model.save_pretrained(out)
    gen = {**BASE_GENERATION, **p.generation}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    templates = {"tools": TOOLS_CHAT_TEMPLATE, "vision": VISION_CHAT_TEMPLATE}
    write_tokenizer(out, p.vocab_size, templates.get(p.chat_template, CHAT_TEMPLATE))
    if p.image_processor is not None:
        (out / "processor_config.json").write_text(json.dumps({"image_processor": {
            "image_processor_type": "Gemma4ImageProcessor", **p.image_processor}}, indent=2))
    return out


def main(argv=None) -> int:
    """`python -m dgport.models.fixtures PRESET OUT`: write a small DiffusionGemma text checkpoint
    (random weights, fixed seed) to try `dgport export`, `run`, `check` and `serve` on. Written into a
    temporary folder beside OUT and renamed into place, so OUT is whole or absent."""
    import shutil
    import sys
    import tempfile

    import click

    names = [*PRESETS, *LARGE_PRESETS, *VISION_PRESETS]

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("preset", metavar="PRESET", type=click.Choice(names))
    @click.argument("out", type=click.Path(path_type=Path))
    @click.option("--tools-template", is_flag=True,
                  help="A chat template with Gemma 4's tool declarations, calls and responses.")
    def command(preset, out, tools_template):
        """Write fixture checkpoint PRESET (tiny, confident, long-context, eos; real-slice is ~3 GB) to OUT."""
        if out.exists() or out.is_symlink():
            raise click.UsageError(f"{out}: exists; choose a new folder")
        try:
            import torch  # noqa: F401
            from transformers.utils import logging as hf_logging
        except ImportError as e:
            raise click.ClickException(f"building a checkpoint needs torch and transformers (no {e.name}): "
                                       "pip install 'dgport[export]'") from None
        hf_logging.disable_progress_bar()  # save_pretrained's shard bar: noise for a 1 MB checkpoint
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            build_fixture(preset, tmp, **({"chat_template": "tools"} if tools_template else {}))
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        click.echo(f"{out}: the {preset!r} fixture checkpoint (random weights; try `dgport export {out} OUT`)",
                   err=True)

    try:
        command.main(args=argv, prog_name="python -m dgport.models.fixtures", standalone_mode=False)
    except click.exceptions.UsageError as e:
        click.echo(f"dgport: error: {e.format_message()}", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"dgport: error: {e.format_message()}", err=True)
        return 1
    except OSError as e:
        click.echo(f"dgport: error: {e.filename or out}: {e.strerror or e}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
