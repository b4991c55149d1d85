"""Images on the MLX backend: the vision tower (runtimes/mlx_vision.py) against transformers'
Gemma4VisionModel + the multimodal embedder in fp32 (odd image sizes, grouped heads, clipped linears,
standardization; the real geometry, slow), and the encoder with soft tokens (`image_embeds`) against
transformers' encoder given the same input embeddings and image-block mask (fp32, MLX CPU on Linux)."""
from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx  # noqa: E402  (the dev extra installs mlx[cpu]; a missing mlx must fail, not skip)

from dgport.errors import DgportError
from dgport.exporters.export import ExportOptions, export
from dgport.images import ImageSettings, preprocess
from dgport.manifest import open_export
from dgport.runtimes.mlx import MlxBackend
from dgport.runtimes.mlx_vision import build_vision, image_inputs
from dgport.vision_config import VisionConfig
from test_onnx_vision import TOL, _images, hf_tower

GATE = 1e-4  # DESIGN.md: fp32 MLX vs HF, max relative error (test_mlx_parity's)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def tower_vs_transformers(cfg, tower, emb, tensors, text_hidden, images, settings):
    """Soft tokens of the MLX tower and of transformers' on the same patches: (mine, ref, patches)."""
    import torch

    vision = build_vision(VisionConfig.from_hf(cfg.to_dict(), text_hidden),
                          {k: mx.array(v) for k, v in tensors.items()}, mx.float32)
    patches = [preprocess(im, settings) for im in images]
    pv = np.stack([p.pixel_values for p in patches])
    pos = np.stack([p.positions for p in patches])
    got = np.array(mx.compile(vision)(mx.array(pv), mx.array(pos.astype(np.int32))))
    with torch.no_grad():
        ref = emb(tower(torch.from_numpy(pv), torch.from_numpy(pos)).last_hidden_state).numpy()
    mine = np.concatenate([got[i, :p.soft_tokens] for i, p in enumerate(patches)])
    return mine, ref, patches


@pytest.mark.parametrize("variant", ["grouped+clipped+standardized", "plain, pooling 3"])
def test_mlx_tower_matches_transformers(variant):
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
    mine, ref, patches = tower_vs_transformers(*hf_tower(0, 24, **vision), 24,
                                               _images([(50, 70), (123, 31), (64, 64), (7, 300)]), settings)
    assert rel_err(mine, ref) <= TOL
    assert any((p.positions[:, 0] == -1).any() for p in patches)  # padding patches were exercised


@pytest.mark.slow
def test_mlx_tower_at_the_real_geometry():
    """Width 1152, 16 heads of 72, patch 16, pooling 3, 2,520 patches (a 480x640 image: 266 soft
    tokens), the 10,240-row position table; one of the 27 layers (each is the same code). MLX's Linux
    CPU matmul is slow (~50 s a layer on 2 cores): on Apple silicon this is a fraction of a second."""
    import time

    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=72, patch_size=16, pooling_kernel_size=3,
                  position_embedding_size=10240, standardize=True)
    t = time.perf_counter()
    mine, ref, patches = tower_vs_transformers(*hf_tower(3, 2816, **vision), 2816, _images([(480, 640)]),
                                               ImageSettings())
    print(f"\nreal geometry, 1 layer: max rel err {rel_err(mine, ref):.2e} ({time.perf_counter() - t:.1f} s in all)")
    assert patches[0].soft_tokens == 266 and mine.shape == (266, 2816)
    assert rel_err(mine, ref) <= TOL


def test_image_inputs_number_rows_and_blocks():
    ids = np.array([[2, 7, 7, 5, 7, 3], [7, 7, 7, 1, 1, 7]])
    index, blocks = image_inputs(ids, 7, 7)
    assert index.tolist() == [[-1, 0, 1, -1, 2, -1], [3, 4, 5, -1, -1, 6]]
    assert blocks.tolist() == [[-1, 0, 0, -1, 1, -1], [0, 0, 0, -1, -1, 1]]
    assert (image_inputs(ids, 7, 7, bidirectional=False)[1] == -1).all()
    with pytest.raises(DgportError, match="8 image soft tokens for 7 image placeholder tokens"):
        image_inputs(ids, 7, 8)


# -- the encoder with soft tokens, on the "vision" fixture -------------------------------------
@pytest.fixture(scope="module")
def vision_exports(checkpoints, tmp_path_factory):
    """dtype -> MLX export of the "vision" fixture (no validation run)."""
    root = tmp_path_factory.mktemp("mlx-vision")

    class Lazy(dict):
        def __missing__(self, dtype):
            out = root / dtype
            export(checkpoints["vision"], out, ExportOptions(formats=("mlx",), dtype=dtype, validate=False))
            self[dtype] = out
            return out

    return Lazy()


def open_vision(path, **kw):
    """(MlxBackend, its VisionInfo) of an export with images."""
    backend = MlxBackend(open_export(path, "mlx"), **kw)
    assert backend.has_vision and backend.vision is not None
    return backend, backend.vision


def soft_tokens(backend, info, sizes):
    """The images' own soft tokens, concatenated [S, H], and their counts."""
    patches = [preprocess(im, info.image) for im in _images(sizes)]
    soft = backend.encode_images(np.stack([p.pixel_values for p in patches]), np.stack([p.positions for p in patches]))
    assert soft.dtype == np.float32 and soft.shape == (len(sizes), info.image.max_soft_tokens, backend.config.hidden_size)
    return np.concatenate([soft[i, :p.soft_tokens] for i, p in enumerate(patches)]), [p.soft_tokens for p in patches]


def hf_encode(model, image_token_id, segments, soft, mm=True):
    """transformers' encoder over segments of ids [B, T] (one call each, positions continuing) with the
    image placeholders of the last one given `soft` [S, H] as input embeddings and (mm) the image
    blocks marked in mm_token_type_ids over the whole sequence; returns the cache."""
    import torch
    from transformers import DynamicCache

    enc = model.model.encoder
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    P = 0
    for j, ids in enumerate(segments):
        B, T = ids.shape
        with torch.no_grad():
            e = enc.get_input_embeddings()(torch.from_numpy(ids))
            image = ids == image_token_id
            mmt = None
            if j == len(segments) - 1 and soft is not None:
                e[torch.from_numpy(image)] = torch.from_numpy(soft)
                if mm:  # indexed by absolute position (transformers' blockwise overlay): zeros for the past
                    mmt = torch.from_numpy(np.concatenate([np.zeros((B, P), np.int64), image.astype(np.int64)], 1))
            pos = torch.arange(P, P + T)[None].expand(B, T)
            masks = enc.create_masks_for_generate(
                config=model.config, inputs_embeds=e, attention_mask=torch.ones((B, P + T), dtype=torch.bool),
                past_key_values=cache, position_ids=pos, mm_token_type_ids=mmt)
            enc(inputs_embeds=e, attention_mask=masks, past_key_values=cache, position_ids=pos)
        P += T
    return cache


def cache_err(backend, ref_cache, layers) -> float:
    return max(max(rel_err(k, ref_cache.layers[i].keys.numpy()), rel_err(v, ref_cache.layers[i].values.numpy()))
               for i in range(layers) for k, v in [backend.cache_numpy(i)])


def test_encode_with_soft_tokens_matches_transformers(vision_exports, hf_models):
    """Two images in one prompt (runs of 60 placeholders, far past the sliding window of 16), encoded
    alone and after a text prefix, and a batch of two rows: the K/V cache equals transformers' encoder
    given the same embeddings and image blocks; without the blocks it would differ."""
    model = hf_models["vision"]
    mine, info = open_vision(vision_exports["fp32"])
    assert info.bidirectional and info.image.max_soft_tokens == 70
    soft, (n1, n2) = soft_tokens(mine, info, [(20, 30), (17, 40)])
    IM, BOI, EOI = info.image_token_id, info.boi_token_id, info.eoi_token_id
    prompt = np.array([[2, BOI] + [IM] * n1 + [EOI, 300, 301, BOI] + [IM] * n2 + [EOI, 302]])
    prefix = np.array([[2, 120, 121, 122, 123, 124, 125]])
    layers = mine.config.num_layers
    for segments in ([prompt], [prefix, prompt[:, 1:]]):
        mine.reset()
        P = 0
        for j, ids in enumerate(segments):
            last = j == len(segments) - 1
            mine.encode(ids, np.arange(P, P + ids.shape[1])[None], image_embeds=soft if last else None)
            P += ids.shape[1]
        err = cache_err(mine, hf_encode(model, IM, segments, soft), layers)
        causal = cache_err(mine, hf_encode(model, IM, segments, soft, mm=False), layers)
        print(f"\n{len(segments)} call(s): max rel err {err:.2e} (causal reference: {causal:.2f})")
        assert err <= GATE and causal > 100 * GATE
    # a batch: images in both rows at different places, soft tokens in row-major order
    rows = np.array([[2] + [IM] * n1 + [300] * n2 + [301], [2, 310] + [IM] * n2 + [302] * n1])
    mine.reset()
    mine.encode(rows, np.tile(np.arange(rows.shape[1]), (2, 1)), image_embeds=soft)
    assert cache_err(mine, hf_encode(model, IM, [rows], soft), layers) <= GATE


def test_text_only_encode_is_unchanged(vision_exports, checkpoints, hf_models):
    """Without soft tokens (None, or none) placeholders embed as ordinary tokens, causally, as in
    transformers, through the same compiled encoder: the same bits."""
    from dgport.runtimes.torch_ref import TorchRefBackend

    mine, info = open_vision(vision_exports["fp32"])
    ref = TorchRefBackend(checkpoints["vision"], model=hf_models["vision"])
    ids = np.array([[2, info.boi_token_id] + [info.image_token_id] * 20 + [info.eoi_token_id, 300]])
    pos = np.arange(ids.shape[1])[None]
    caches = []
    for embeds in (None, np.zeros((0, mine.config.hidden_size), np.float32), "absent"):
        mine.reset()
        mine.encode(ids, pos) if isinstance(embeds, str) else mine.encode(ids, pos, image_embeds=embeds)
        caches.append([mine.cache_numpy(i) for i in range(mine.config.num_layers)])
    for other in caches[1:]:
        for (k, v), (k2, v2) in zip(caches[0], other):
            np.testing.assert_array_equal(k, k2)
            np.testing.assert_array_equal(v, v2)
    ref.encode(ids, pos)
    assert max(max(rel_err(k, ref.cache_numpy(i)[0]), rel_err(v, ref.cache_numpy(i)[1]))
               for i, (k, v) in enumerate(caches[0])) <= GATE


def test_rows_take_soft_tokens_and_refusals(vision_exports):
    mine, info = open_vision(vision_exports["fp32"])
    soft, (n,) = soft_tokens(mine, info, [(20, 30)])
    ids = np.array([[2, info.boi_token_id] + [info.image_token_id] * n + [info.eoi_token_id]])
    pos = np.arange(ids.shape[1])[None]
    mine.encode(ids, pos, image_embeds=soft)
    row = mine.open_row()
    mine.encode_row(row, ids, pos, image_embeds=soft)
    for i in range(mine.config.num_layers):
        np.testing.assert_array_equal(mine.cache_numpy(i)[0], np.array(mine._rows[row].cache[i][0]))
    with pytest.raises(DgportError, match=f"{n - 1} image soft tokens for {n} image-token positions"):
        mine.encode(ids, pos, image_embeds=soft[1:])
    with pytest.raises(DgportError, match="image_embeds must be"):
        mine.encode_row(row, ids, pos, image_embeds=soft[:, :5])
    with pytest.raises(DgportError, match="encode_images takes"):
        mine.encode_images(np.zeros((1, 10, 48), np.float32), np.zeros((1, 10, 2), np.int64))
    ex = open_export(vision_exports["fp32"], "mlx")  # the folder form without vision=: no tower
    text_only = MlxBackend(folder=ex.path, entry=ex.format("mlx"), config=ex.config)
    assert not text_only.has_vision and text_only.vision is None
    with pytest.raises(DgportError, match="takes no images.*without --text-only"):
        text_only.encode(ids, pos, image_embeds=soft)
    with pytest.raises(DgportError, match="takes no images.*without --text-only"):
        text_only.encode_images(np.zeros((1, 9, 48), np.float32), np.zeros((1, 9, 2), np.int64))


def test_bf16_soft_tokens_are_bf16_values_close_to_fp32(vision_exports):
    """bf16 exports: the tower computes in fp32 and rounds once to bf16 (vision weights in bf16)."""
    import ml_dtypes

    entry = open_export(vision_exports["bf16"], "mlx").format("mlx")
    assert entry["vision"] is True and "mlx/vision.safetensors" in entry["files"]
    w = mx.load(str(vision_exports["bf16"] / "mlx" / "vision.safetensors"))
    assert w["model.encoder.vision_tower.patch_embedder.input_proj.weight"].dtype == mx.bfloat16
    assert w["model.encoder.vision_tower.std_scale"].dtype == mx.float32  # as the ONNX graph keeps it
    half, info = open_vision(vision_exports["bf16"])
    full, _ = open_vision(vision_exports["fp32"])
    sizes = [(20, 30), (33, 12)]
    h, _ = soft_tokens(half, info, sizes)
    f, _ = soft_tokens(full, info, sizes)
    np.testing.assert_array_equal(h, h.astype(ml_dtypes.bfloat16).astype(np.float32))
    err = rel_err(h, f)
    print(f"\nbf16 vs fp32 soft tokens: max rel err {err:.2e}")
    assert 0 < err <= 2e-2


def test_quantized_exports_keep_the_tower_unquantized(vision_exports, checkpoints, tmp_path):
    """--quantize 4 quantizes the text model only: the vision file holds the fp32 export's tensors and
    the soft tokens are the fp32 export's bits."""
    out = tmp_path / "q4"
    export(checkpoints["vision"], out, ExportOptions(formats=("mlx",), quantize=4, validate=False))
    q = mx.load(str(out / "mlx" / "vision.safetensors"))
    f = mx.load(str(vision_exports["fp32"] / "mlx" / "vision.safetensors"))
    assert set(q) == set(f) and all(mx.array_equal(q[n], f[n]).item() for n in f)
    quant, info = open_vision(out)
    full, _ = open_vision(vision_exports["fp32"])
    np.testing.assert_array_equal(soft_tokens(quant, info, [(20, 30)])[0], soft_tokens(full, info, [(20, 30)])[0])
