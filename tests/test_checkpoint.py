"""The checkpoint reader: the real 26B-A4B config, fixture checkpoints, and every way a folder can be wrong."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dgport.config import FULL, SLIDING, GenerationDefaults, TextConfig
from dgport.errors import CheckpointError, DgportError
from dgport.exporters.checkpoint import expected_tensors, read_checkpoint, read_config

DATA = Path(__file__).parent / "data"
REAL_CONFIG = json.loads((DATA / "diffusiongemma-26B-A4B-it.config.json").read_text())
REAL_GENERATION = json.loads((DATA / "diffusiongemma-26B-A4B-it.generation_config.json").read_text())


def test_real_config_is_accepted_unchanged():
    cfg = TextConfig.from_hf(REAL_CONFIG)
    assert cfg.full_layers == [5, 11, 17, 23, 29]
    assert all(cfg.head_dims[i] == (512 if i in cfg.full_layers else 256) for i in range(30))
    assert all(cfg.kv_heads[i] == (2 if i in cfg.full_layers else 8) for i in range(30))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_experts, cfg.top_k_experts) == (262144, 2816, 128, 8)
    assert cfg.sliding_cache_len == 1023 and cfg.canvas_length == 256
    # proportional RoPE: 64 of the 256 frequency slots rotate, exponent over the full 512
    inv = cfg.rope_inv_freq(5)
    assert len(inv) == 256 and inv[63] > 0 and inv[64] == 0.0
    assert inv[1] == pytest.approx(1e6 ** (-2 / 512))
    gen = GenerationDefaults.from_hf(REAL_GENERATION, cfg)
    assert gen.eos_token_ids == (1, 106, 50) and gen.max_denoising_steps == 48 and gen.entropy_bound == 0.1


def test_real_config_tensor_list_matches_transformers():
    """Shape-only check: the HF model built on the meta device from the real config has exactly
    the text tensors (names and shapes) the reader requires."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    hf_cfg = DiffusionGemmaConfig(**{k: v for k, v in REAL_CONFIG.items() if k not in ("architectures", "dtype",
                                                                                       "transformers_version")})
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(hf_cfg)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = expected_tensors(TextConfig.from_hf(REAL_CONFIG))
    for name, shape in ours.items():
        assert state[name] == shape, name
    text_names = {k for k in state if k.startswith("model.decoder.")
                  or (k.startswith("model.encoder.language_model.") and k.endswith("layer_scalar"))}
    assert text_names == set(ours)


def test_fixture_checkpoint_reads(checkpoints):
    ckpt = read_checkpoint(checkpoints["tiny"])
    assert ckpt.config.layer_types[-1] == FULL and SLIDING in ckpt.config.layer_types
    assert ckpt.config.head_dims != (ckpt.config.head_dims[0],) * ckpt.config.num_layers
    emb = ckpt.tensor("model.decoder.embed_tokens.weight")
    assert emb.shape == (ckpt.config.vocab_size, ckpt.config.hidden_size) and emb.dtype == np.float32
    assert ckpt.generation.eos_token_ids == (1, 106, 50)
    assert len(ckpt.fingerprint()) == 64


def test_bf16_weights_read_without_torch(tmp_path, checkpoints):
    import torch
    from safetensors.torch import save_file

    ckpt = read_checkpoint(checkpoints["tiny"])
    folder = tmp_path / "bf16"
    shutil.copytree(checkpoints["tiny"], folder)
    names = expected_tensors(ckpt.config)
    tensors = {n: torch.from_numpy(np.array(ckpt.tensor(n))).to(torch.bfloat16) for n in names}
    save_file(tensors, folder / "model.safetensors")
    bf = read_checkpoint(folder)
    w = bf.tensor("model.decoder.norm.weight")
    assert str(w.dtype) == "bfloat16"
    np.testing.assert_allclose(w.astype(np.float32), tensors["model.decoder.norm.weight"].float().numpy())


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        read_checkpoint(tmp_path / "nope")


def test_missing_config(tmp_path, checkpoints):
    folder = _copy(checkpoints["tiny"], tmp_path / "c")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        read_checkpoint(folder)


def test_wrong_model_type(tmp_path, checkpoints):
    folder = _copy(checkpoints["tiny"], tmp_path / "c")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gemma4"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DgportError, match="model_type is 'gemma4', expected 'diffusion_gemma'"):
        read_checkpoint(folder)


def _rewrite_weights(folder, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_tensor(tmp_path, checkpoints):
    folder = _copy(checkpoints["tiny"], tmp_path / "c")
    _rewrite_weights(folder, lambda t: t.pop("model.decoder.layers.1.router.proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.decoder\.layers\.1\.router\.proj\.weight"):
        read_checkpoint(folder)


def test_misshapen_tensor(tmp_path, checkpoints):
    folder = _copy(checkpoints["tiny"], tmp_path / "c")

    def shrink(t):
        t["model.decoder.layers.0.self_attn.q_proj.weight"] = t["model.decoder.layers.0.self_attn.q_proj.weight"][:-1]
    _rewrite_weights(folder, shrink)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight has shape \[63, 64\], expected \[64, 64\]"):
        read_checkpoint(folder)


def test_pickle_only_checkpoint_is_refused(tmp_path, checkpoints):
    folder = _copy(checkpoints["tiny"], tmp_path / "c")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles.*safe_serialization"):
        read_checkpoint(folder)


def test_truncated_weights(tmp_path, checkpoints):
    folder = _copy(checkpoints["tiny"], tmp_path / "c")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(folder)


def test_config_without_text_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "diffusion_gemma"}))
    with pytest.raises(DgportError, match="no 'text_config'"):
        read_config(tmp_path)
