"""Untrusted checkpoint configs (issue #11, part 4): each bad config.json or generation_config.json
value is refused in one line naming the key; the real 26B-A4B config is accepted unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dgport.config import TextConfig
from dgport.errors import CheckpointError, DgportError
from dgport.exporters.checkpoint import read_checkpoint
from hardening_support import copy_checkpoint, edit_json, one_line, text_config_edit

REAL_CONFIG = Path(__file__).parent / "data" / "diffusiongemma-26B-A4B-it.config.json"


CONFIG_EDITS = [
    (text_config_edit("num_hidden_layers", 0), "text_config.num_hidden_layers: 0 is out of range"),
    (text_config_edit("num_hidden_layers", "4"), "text_config.num_hidden_layers: '4' is a string"),
    (text_config_edit("num_hidden_layers", 4.5), "text_config.num_hidden_layers: 4.5 is a number, expected an integer"),
    (text_config_edit("num_attention_heads", 3), "do not divide 3 heads"),
    (text_config_edit("num_key_value_heads", 0), "text_config.num_key_value_heads: 0 is out of range"),
    (text_config_edit("top_k_experts", 5), "top_k_experts: 5 is more than num_experts (4)"),
    (text_config_edit("num_experts", 0), "text_config.num_experts: 0 is out of range"),
    (text_config_edit("head_dim", 15), "15 is odd"),
    (text_config_edit("per_layer_config", {"1": {"head_dim": 0}}), "text_config.per_layer_config.1.head_dim: 0 is out of range"),
    (text_config_edit("sliding_window", 1), "text_config.sliding_window: 1 is out of range"),
    (text_config_edit("rms_norm_eps", 0.0), "text_config.rms_norm_eps: 0.0 is out of range"),
    (text_config_edit("rms_norm_eps", -1e-6), "text_config.rms_norm_eps"),
    (text_config_edit("vocab_size", 2**40), "text_config.vocab_size: 1099511627776 is out of range"),
    (text_config_edit("hidden_size", -64), "text_config.hidden_size: -64 is out of range"),
    (text_config_edit("layer_types", "sliding_attention"), "text_config.layer_types: 'sliding_attention' is a string"),
    (text_config_edit("layer_types", ["sliding_attention"]), "layer_types has 1 entries for 4 layers"),
    (text_config_edit("per_layer_config", {"9": {"head_dim": 32}}), "text_config.per_layer_config.9"),
    (text_config_edit("per_layer_config", [1]), "text_config.per_layer_config"),
    (text_config_edit("rope_parameters", [1]), "text_config.rope_parameters"),
    (text_config_edit("max_position_embeddings", 8), "max_position_embeddings: 8 leaves no room"),
    (text_config_edit("eos_token_id", []), "text_config.eos_token_id: an empty list"),
    (text_config_edit("bos_token_id", 600), "bos_token_id: 600 is out of range"),
    (lambda c: c.__setitem__("canvas_length", 10**9), "canvas_length: 1000000000 is out of range (1..65536)"),
    (lambda c: c.__setitem__("canvas_length", "16"), "canvas_length: '16' is a string"),
    (lambda c: c.__setitem__("text_config", []), "no 'text_config' section"),
    (lambda c: [c], "not a JSON object"),
]


@pytest.mark.parametrize("change,message", CONFIG_EDITS, ids=[m for _, m in CONFIG_EDITS])
def test_bad_config_value_is_one_line(checkpoints, tmp_path, change, message):
    ckpt = copy_checkpoint(checkpoints["tiny"], tmp_path / "ckpt")
    edit_json(ckpt / "config.json", change)
    with pytest.raises(DgportError) as e:
        read_checkpoint(ckpt)
    assert message in one_line(e) and "config.json" in str(e.value)


GENERATION_EDITS = [
    ({"t_max": -1.0}, "t_max must be a finite number"),
    ({"t_min": 2.0, "t_max": 1.0}, "t_min (2.0) must not be above t_max (1.0)"),
    ({"max_denoising_steps": 10**9}, "max_denoising_steps must be a positive integer up to 10000"),
    ({"stability_threshold": 10**12}, "stability_threshold must be an integer in [0, 1000]"),
    ({"eos_token_id": [1, 9999]}, "eos_token_id: 9999 is out of range"),
    ({"sampler_config": {"entropy_bound": "high"}}, "entropy_bound must be a finite number"),
    ({"max_new_tokens": "many"}, "max_new_tokens must be a positive integer"),
]


@pytest.mark.parametrize("change,message", GENERATION_EDITS, ids=[m for _, m in GENERATION_EDITS])
def test_bad_generation_config_is_one_line(checkpoints, tmp_path, change, message):
    ckpt = copy_checkpoint(checkpoints["tiny"], tmp_path / "ckpt")
    edit_json(ckpt / "generation_config.json", lambda g: g.update(change))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(ckpt)
    assert message in one_line(e) and "generation_config.json" in str(e.value)


def test_real_config_accepted_unchanged():
    raw = json.loads(REAL_CONFIG.read_text())
    cfg = TextConfig.from_hf(raw)
    assert cfg.max_position_embeddings == 262144 and cfg.canvas_length == 256 and cfg.sliding_window == 1024
    assert cfg.top_k_experts == 8 and cfg.num_experts == 128 and set(cfg.head_dims) == {256, 512}
    assert TextConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    from dgport.config import GenerationDefaults

    gen_raw = json.loads(REAL_CONFIG.with_name("diffusiongemma-26B-A4B-it.generation_config.json").read_text())
    defaults = GenerationDefaults.from_hf(gen_raw, cfg, raw.get("eos_token_id"))
    assert defaults.eos_token_ids == (1, 106, 50) and defaults.max_denoising_steps == 48
    assert GenerationDefaults.from_dict(json.loads(json.dumps(defaults.to_dict()))) == defaults


def test_default_max_position_embeddings_is_transformers():
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig

    raw = json.loads(REAL_CONFIG.read_text())
    del raw["text_config"]["max_position_embeddings"]
    assert TextConfig.from_hf(raw).max_position_embeddings == DiffusionGemmaTextConfig().max_position_embeddings
