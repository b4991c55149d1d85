"""The vision graph (exporters/onnx_vision.py) against transformers' Gemma4VisionModel + the multimodal
embedder, fp32, on images of odd sizes (padding patches), with grouped heads, clipped linears and
standardization, and at the real model's vision geometry (slow)."""
from __future__ import annotations

import numpy as np
import pytest

from dgport.images import ImageSettings, preprocess
from dgport.vision_config import VisionConfig

TOL = 1e-5  # DESIGN.md's fp32 target against the reference (max error relative to the largest value)


def hf_tower(seed: int, text_hidden: int, **vision):
    import torch
    from transformers import DiffusionGemmaTextConfig, Gemma4VisionConfig
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaMultimodalEmbedder
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionModel

    torch.manual_seed(seed)
    cfg = Gemma4VisionConfig(**vision)
    tower = Gemma4VisionModel(cfg).eval()
    emb = DiffusionGemmaMultimodalEmbedder(cfg, DiffusionGemmaTextConfig(hidden_size=text_hidden)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in list(tower.named_parameters()) + list(emb.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() < 2 else p.shape[-1] ** -0.5))
        for n, buf in tower.named_buffers():
            if n.endswith(("input_min", "output_min")):
                buf.fill_(-1.5)
            elif n.endswith(("input_max", "output_max")):
                buf.fill_(1.5)
            elif n == "std_bias":
                buf.copy_(torch.randn(buf.shape, generator=g))
            elif n == "std_scale":
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    tensors = {f"model.encoder.vision_tower.{k}": v.numpy() for k, v in tower.state_dict().items()}
    tensors.update({f"model.encoder.embed_vision.{k}": v.numpy() for k, v in emb.state_dict().items()})
    return cfg, tower, emb, tensors


def onnx_session(cfg, text_hidden, tensors, out, attention=None, quant_group=None, bits=None, form=None):
    import onnx
    import onnxruntime as ort

    from dgport.exporters.onnx_builder import FLOAT, WeightStore
    from dgport.exporters.onnx_vision import ATTENTION, VISION_QUANT, build_vision, vision_quant

    class Checkpoint:
        def tensor(self, name):
            return tensors[name]

    store = WeightStore(Checkpoint(), out, "fp32")
    vc = VisionConfig.from_hf(cfg.to_dict(), text_hidden)
    b = build_vision(vc, store, FLOAT, attention or ATTENTION, vision_quant(vc, quant_group, bits, form or VISION_QUANT) if quant_group else None)
    store.close()
    onnx.save(b.model(), out / "vision.onnx")
    onnx.checker.check_model(str(out / "vision.onnx"))
    assert {n.domain for n in b.model().graph.node} == {""}  # stock operators only
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(out / "vision.onnx"), so, providers=["CPUExecutionProvider"])


def compare(cfg, tower, emb, sess, images, settings):
    import torch

    patches = [preprocess(im, settings) for im in images]
    pv = np.stack([p.pixel_values for p in patches])
    pos = np.stack([p.positions for p in patches])
    got = sess.run(None, {"pixel_values": pv, "pixel_position_ids": pos})[0]
    with torch.no_grad():
        ref = emb(tower(torch.from_numpy(pv), torch.from_numpy(pos)).last_hidden_state).numpy()
    mine = np.concatenate([got[i, :p.soft_tokens] for i, p in enumerate(patches)])
    assert mine.shape == ref.shape
    err = np.abs(mine.astype(np.float64) - ref).max() / np.abs(ref).max()
    assert err <= TOL, err
    return patches


def _images(sizes):
    from PIL import Image

    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.mark.parametrize("attention", ["explicit", "fused"])
@pytest.mark.parametrize("variant", ["grouped+clipped+standardized", "plain, pooling 3"])
def test_vision_graph_matches_transformers(variant, attention, tmp_path):
    if variant.startswith("grouped"):
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, patch_size=8, pooling_kernel_size=2,
                      position_embedding_size=256, standardize=True, use_clipped_linears=True)
        settings = ImageSettings.from_dict({"patch_size": 8, "pooling_kernel_size": 2, "max_soft_tokens": 70}, "t")
    else:
        vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=8, patch_size=4, pooling_kernel_size=3,
                      position_embedding_size=256)
        settings = ImageSettings.from_dict({"patch_size": 4, "pooling_kernel_size": 3, "max_soft_tokens": 70}, "t")
    cfg, tower, emb, tensors = hf_tower(0, 24, **vision)
    sess = onnx_session(cfg, 24, tensors, tmp_path, attention)
    assert ("Attention" in {n.op_type for n in _graph(tmp_path).node}) == (attention == "fused")
    patches = compare(cfg, tower, emb, sess, _images([(50, 70), (123, 31), (64, 64), (7, 300)]), settings)
    assert any((p.positions[:, 0] == -1).any() for p in patches)  # padding patches were exercised


@pytest.mark.slow
def test_vision_graph_at_the_real_geometry(tmp_path):
    """Width 1152, 16 heads of 72, patch 16, pooling 3, up to 280 soft tokens (2,520 patches: a 480x640
    image resizes to 672x912, 2,394 patches, 266 soft tokens), the 10,240-row position table; two of the
    27 layers (each layer is the same graph)."""
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=72, patch_size=16, pooling_kernel_size=3,
                  position_embedding_size=10240, standardize=True)
    cfg, tower, emb, tensors = hf_tower(3, 2816, **vision)
    sess = onnx_session(cfg, 2816, tensors, tmp_path)
    patches = compare(cfg, tower, emb, sess, _images([(480, 640)]), ImageSettings())
    assert patches[0].soft_tokens == 266 and (patches[0].positions[:, 0] >= 0).sum() == 2394
    assert patches[0].positions.shape == (2520, 2)


def _graph(folder):
    import onnx

    return onnx.load(str(folder / "vision.onnx"), load_external_data=False).graph


@pytest.mark.parametrize("form", ["rows", "blocks"])
def test_quantized_tower_close_to_fp32(form, tmp_path):
    """A quantized export's tower, q/k/v and gate/up fused: "rows" (dgport's choice), each linear an
    int8 MatMulInteger on per-patch int8 activations and per-column int8 weights; "blocks", 8-bit blocks
    dequantized into a MatMul (onnxruntime's MatMulNBits) of the export's group where it divides the
    input width, else 32 or 16 (the MLP's 80 here, the real model's 4,304). Soft tokens within cosine
    0.999 of fp32's."""
    import onnx

    from dgport.exporters.onnx_vision import vision_quant

    vision = dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=16, patch_size=8, pooling_kernel_size=3,
                  position_embedding_size=256, standardize=True)
    settings = ImageSettings.from_dict({"patch_size": 8, "pooling_kernel_size": 3, "max_soft_tokens": 70}, "t")
    cfg, tower, emb, tensors = hf_tower(2, 48, **vision)
    vq = vision_quant(VisionConfig.from_hf(cfg.to_dict(), 48), 64, form=form)
    assert len(vq) == 7 * 2
    if form == "blocks":
        groups = {n.split(".")[-3]: (q.bits, q.group) for n, q in vq.items()}
        assert groups == {"q_proj": (8, 64), "k_proj": (8, 64), "v_proj": (8, 64), "o_proj": (8, 64),
                          "gate_proj": (8, 64), "up_proj": (8, 64), "down_proj": (8, 16)}
    p = preprocess(_images([(90, 130)])[0], settings)
    feeds = {"pixel_values": p.pixel_values[None], "pixel_position_ids": p.positions[None]}
    (tmp_path / "q").mkdir()
    (tmp_path / "f").mkdir()
    got = onnx_session(cfg, 48, tensors, tmp_path / "q", quant_group=64, form=form).run(None, feeds)[0][0, :p.soft_tokens]
    ref = onnx_session(cfg, 48, tensors, tmp_path / "f").run(None, feeds)[0][0, :p.soft_tokens]
    g = _graph(tmp_path / "q")
    ints = {i.name: i.data_type for i in g.initializer}
    if form == "rows":  # qkv, o, gate_up, down a layer; weights int8
        mm = [n for n in g.node if n.op_type == "MatMulInteger"]
        assert len(mm) == 4 * 2 and all(ints[n.input[1]] == onnx.TensorProto.INT8 for n in mm)
        assert len([n for n in g.node if n.op_type == "Round"]) == 4 * 2  # one quantization per input, shared
    else:
        deq = [n for n in g.node if n.op_type == "DequantizeLinear"]
        assert len(deq) == 4 * 2 and all(ints[n.input[0]] == onnx.TensorProto.UINT8 for n in deq)
    cos = np.sum(got * ref, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert 0 < np.abs(got - ref).max() and cos.min() >= 0.999, cos.min()
    if form == "blocks":  # the real tower: 64-blocks, the MLP's down projection (4,304 wide) in 16-blocks
        real = VisionConfig.from_hf(dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                                         head_dim=72), 2816)
        assert {q.group for n, q in vision_quant(real, 64, form=form).items() if "down_proj" in n} == {16}
        assert {q.group for n, q in vision_quant(real, 64, form=form).items() if "down_proj" not in n} == {64}


def test_vision_config_refusals():
    from dgport.errors import CheckpointError

    good = dict(hidden_size=32, num_attention_heads=4, head_dim=8)
    assert VisionConfig.from_hf(good, 64).head_dim == 8
    for bad, message in [({"head_dim": 6}, "multiple of 4"), ({"num_key_value_heads": 3}, "multiple of"),
                         ({"rope_parameters": {"rope_type": "default"}}, "axial"),
                         ({"hidden_activation": "relu"}, "not supported"), ({"patch_size": 0}, "patch_size"),
                         ({"pooling_kernel_size": 1}, "pooling_kernel_size")]:
        with pytest.raises(CheckpointError, match=message):
            VisionConfig.from_hf({**good, **bad}, 64)


def test_image_tokens_outside_the_vocabulary_read_as_text_only(tmp_path):
    from dgport.errors import CheckpointError
    from dgport.vision_config import read_vision

    # the shipped Sudoku model keeps the tiny tower transformers builds with every model, but its 192-token
    # vocabulary holds no image tokens: it is a text-only checkpoint, not a broken one
    raw = {"vision_config": dict(hidden_size=16, num_attention_heads=1, head_dim=16),
           "image_token_id": 258880, "boi_token_id": 255999, "eoi_token_id": 258882}
    names = {"model.encoder.vision_tower.encoder.layers.0.mlp.down_proj.weight": None}
    assert read_vision(raw, tmp_path, 16, 192, names, "config.json") is None
    with pytest.raises(CheckpointError, match="image_token_id must be a non-negative token id"):
        read_vision({**raw, "image_token_id": -1}, tmp_path, 16, 192, names, "config.json")


def test_int8_export_with_a_tower_passes_validation(checkpoints, tmp_path):
    """`--quantize int8` on a checkpoint with a vision tower: the tower's linears are int8 (MatMulInteger)
    and validation measures its soft tokens against transformers fp32 (vision_soft_tokens, gated with the
    rest at QUANT_LIMIT), beside the graph's own check on the dequantized checkpoint."""
    import json

    import onnx

    from dgport.exporters.export import ExportOptions, export
    from dgport.exporters.validation import QUANT_LIMIT

    summary = export(checkpoints["vision"], tmp_path / "q8", ExportOptions(quantize=8, group_size=32))
    errs = summary.validation["onnx"]
    assert 0 < errs["vision_soft_tokens"] <= QUANT_LIMIT, errs
    assert any("dequantized" in k for k in summary.validation)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q8" / "vision.onnx"), load_external_data=False).graph.node}
    assert {"MatMulInteger", "Attention"} <= ops
    entry = json.loads((tmp_path / "q8" / "dgport.json").read_text())["formats"]["onnx"]
    roles = entry["quantization"]["roles"]
    assert roles["vision tower"]["bits"] == 8 and 0 < roles["vision tower"]["max_rel_error"] < 0.02  # 7-bit values (RowInt8)


def _pairs_saturated(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """u8 [M, K] x s8 [K, N] as x86 CPUs without VNNI add it (vpmaddubsw, then vpmaddwd): each pair of
    products summed into a saturating int16 lane, the lanes then summed exactly in int32."""
    prod = a.astype(np.int32)[:, :, None] * w.astype(np.int32)[None]  # [M, K, N]
    pairs = np.clip(prod[:, 0::2] + prod[:, 1::2], -32768, 32767)
    return pairs.sum(axis=1)


def test_int8_tower_is_exact_on_cpus_without_vnni(monkeypatch):
    """The "rows" form's u8 x s8 products give the exact int32 sums on the non-VNNI path too (its 7-bit
    weights), where full 8-bit weights would saturate: the emulated path must differ for those."""
    from dgport.exporters import onnx_vision
    from dgport.exporters.onnx_vision import RowInt8

    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((32, 64)).astype(np.float32)}  # transformers' [out, in]

    class Store:
        def raw(self, name):
            return weights[name]

    x = rng.standard_normal((16, 64)).astype(np.float32)
    x[:, ::2] = np.abs(x[:, ::2]) * 40  # large positive activations next to each other: the worst pairs
    s = np.abs(x).max(axis=-1, keepdims=True) / 127
    a = (np.rint(x / s) + 128).astype(np.uint8)  # what the graph feeds MatMulInteger

    q, _ = RowInt8().quantized(Store(), "w", ["w"])
    assert np.abs(q).max() == onnx_vision.W8_MAX == 63
    exact = a.astype(np.int64) @ q.astype(np.int64)
    np.testing.assert_array_equal(_pairs_saturated(a, q), exact)
    monkeypatch.setattr(onnx_vision, "W8_MAX", 127)  # full 8 bits: the non-VNNI lanes overflow
    q8, _ = RowInt8().quantized(Store(), "w", ["w"])
    assert (_pairs_saturated(a, q8) != a.astype(np.int64) @ q8.astype(np.int64)).any()
