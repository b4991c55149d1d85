"""The real vision geometry inside a generate (issue 29's real-slice check): the vision preset's small
text model with the released tower's shape (27 layers, width 1152, 16 heads of 72, MLP 4,304, patch 16,
pooling 3, the 10,240-row position table, standardization) on random weights, one 480x640 image at 280
soft tokens (2,394 patches, 266 soft tokens): dgport's ONNX fp32 export gives transformers fp32's
tokens, and its soft tokens are transformers' within DESIGN.md's fp32 target."""
from __future__ import annotations

import gc

import numpy as np
import pytest
from conftest import BIG_MEMORY, mem_available_gb

REAL = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
            num_key_value_heads=16, head_dim=72, patch_size=16, pooling_kernel_size=3,
            position_embedding_size=10240, standardize=True)


@pytest.mark.slow
@BIG_MEMORY
@pytest.mark.skipif(mem_available_gb() < 8, reason="the real tower is 0.4 B parameters: ~6 GB with both sides")
def test_real_vision_tower_generates_transformers_tokens(tmp_path):
    import torch
    from PIL import Image
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    import dgport
    from dgport.exporters.export import ExportOptions, export
    from hf_reference import hf_generate
    from models.fixtures import build_fixture

    ckpt = build_fixture("vision", tmp_path / "ckpt", vision=REAL,
                         image_processor=dict(patch_size=16, pooling_kernel_size=3, max_soft_tokens=280))
    export(ckpt, tmp_path / "onnx", ExportOptions(validate=False))
    img = Image.fromarray(np.random.default_rng(11).integers(0, 256, (480, 640, 3), dtype=np.uint8))

    gen = dgport.load(tmp_path / "onnx", backend="cpu", threads=2)
    got = gen.generate("what is in it?", images=[img], seed=0)
    image_id = gen.backend.vision.image_token_id
    assert got.prompt_ids.count(image_id) == 266
    proc = Gemma4ImageProcessorPil(patch_size=16, pooling_kernel_size=3, max_soft_tokens=280)
    feats = proc([img], return_tensors="pt")
    soft = gen.backend.encode_images(feats["pixel_values"].numpy(), feats["image_position_ids"].numpy())[0, :266]
    del gen
    gc.collect()

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt, use_safetensors=True).eval()
    with torch.no_grad():
        tower = model.model.encoder.vision_tower(feats["pixel_values"], feats["image_position_ids"])
        ref = model.model.encoder.embed_vision(tower.last_hidden_state).numpy()[:266]
    assert np.abs(soft.astype(np.float64) - ref).max() / np.abs(ref).max() <= 1e-5
    ids = torch.tensor([got.prompt_ids])
    hf, _ = hf_generate(model, got.prompt_ids, 0, pixel_values=feats["pixel_values"],
                        image_position_ids=feats["image_position_ids"], mm_token_type_ids=(ids == image_id).long())
    answer = got.token_ids[0]
    assert answer[:len(hf)] == hf and not any(answer[len(hf):])
