"""Images end to end: `generate(..., images=)` on the ONNX CPU and torch backends gives transformers'
tokens for the same seed (fp32; the 'vision' fixture: odd image sizes with padding patches, grouped
heads, standardization, two images in one prompt, an image in a later chat turn); the image changes the
answer; chunked encoding never splits an image block; and what cannot work is refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dgport
from dgport.errors import DgportError
from dgport.image_prompt import encode_calls
from dgport.images import ImageError
from hf_reference import hf_generate
from image_support import IMAGES, PRESET, answer, png
from onnx_support import THREADS, onnx_exports  # noqa: F401  (session fixture)


@pytest.fixture(scope="module")
def gens(checkpoints, hf_models, onnx_exports):  # noqa: F811
    return {"torch": dgport.load(checkpoints[PRESET], backend="torch", model=hf_models[PRESET]),
            "cpu": dgport.load(onnx_exports[PRESET, "fp32"], backend="cpu", threads=THREADS)}


def hf_tokens(model, checkpoint, prompt_ids, images, seed, max_soft_tokens=70):
    """transformers' generate with its own image processor's pixel values."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    proc = Gemma4ImageProcessorPil(patch_size=4, pooling_kernel_size=3, max_soft_tokens=max_soft_tokens)
    feats = proc(images, return_tensors="pt")
    ids = torch.tensor([prompt_ids])
    tok, _ = hf_generate(model, prompt_ids, seed, pixel_values=feats["pixel_values"],
                         image_position_ids=feats["image_position_ids"], mm_token_type_ids=(ids == 61).long())
    return tok


@pytest.mark.parametrize("seed", [0, 1])
def test_two_images_match_transformers(gens, hf_models, checkpoints, seed):
    ref = gens["torch"].generate("what is in these?", images=IMAGES, seed=seed)
    assert 70 < ref.prompt_ids.count(61) < 140  # both images' soft tokens (odd sizes: fewer than 70 each)
    hf = hf_tokens(hf_models[PRESET], checkpoints[PRESET], ref.prompt_ids, IMAGES, seed)
    assert answer(ref)[:len(hf)] == hf and not any(answer(ref)[len(hf):])
    got = gens["cpu"].generate("what is in these?", images=IMAGES, seed=seed)
    assert got.prompt_ids == ref.prompt_ids
    assert answer(got) == answer(ref)


def test_image_in_a_later_turn_and_sources(gens, hf_models, checkpoints):
    img = IMAGES[1]
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": [{"type": "text", "text": "and this?"},
                                             {"type": "image", "image": png(img)}]}]
    ref = gens["torch"].generate(messages, seed=3)
    hf = hf_tokens(hf_models[PRESET], checkpoints[PRESET], ref.prompt_ids, [img], 3)
    assert answer(ref)[:len(hf)] == hf
    url = "data:image/png;base64," + __import__("base64").b64encode(png(img)).decode()
    as_url = [*messages[:2], {"role": "user", "content": [{"type": "text", "text": "and this?"},
                                                          {"type": "image_url", "image_url": {"url": url}}]}]
    arr = [*messages[:2], {"role": "user", "content": [{"type": "text", "text": "and this?"},
                                                       {"type": "image", "image": np.array(img)}]}]
    for m in (messages, as_url, arr):
        assert answer(gens["cpu"].generate(m, seed=3)) == answer(ref)


def test_the_image_matters_and_chunks_keep_blocks(gens):
    g = gens["cpu"]
    base = answer(g.generate("describe", images=IMAGES, seed=5))
    assert answer(g.generate("describe", images=IMAGES[::-1], seed=5)) != base
    assert answer(g.generate("describe", images=[IMAGES[0], IMAGES[0]], seed=5)) != base
    for chunk in (1, 7, 50):  # cuts that would fall inside a block end before it or hold it whole
        assert answer(g.generate("describe", images=IMAGES, seed=5, encode_chunk=chunk)) == base
    finer = g.generate("describe", images=IMAGES, seed=5, max_soft_tokens=140)
    assert finer.prompt_ids.count(61) > 140


def test_encode_calls_never_split_a_run():
    ids = np.array([1, 2, 9, 9, 9, 9, 3, 9, 9, 4])
    for chunk in range(1, 12):
        calls = encode_calls(ids, chunk, 9)
        assert calls[0][0] == 0 and calls[-1][1] == len(ids)
        assert all(a[1] == b[0] for a, b in zip(calls, calls[1:]))
        for s, e in calls:
            assert not (s > 0 and ids[s] == 9 and ids[s - 1] == 9)  # no call starts inside a run
            assert e - s <= chunk or set(ids[s:e]) == {9}  # over the chunk only to hold a run whole


def test_refusals(gens, checkpoints, tmp_path):
    g = gens["cpu"]
    with pytest.raises(ImageError, match="2 image markers for 1 image"):
        g.generate("<|image|> and <|image|>", images=IMAGES[:1], raw=True, max_new_tokens=4)
    for prompt in ("look <|image|>", [{"role": "user", "content": "look <|image|>"}]):  # a marker typed as text
        with pytest.raises(ImageError, match="1 image marker for 0 images"):
            g.generate(prompt, max_new_tokens=4)
    for part, what in (({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "never fetches"),
                       ({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}, "PNG, JPEG"),
                       ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "not valid base64"),
                       ({"type": "video", "video": "x.mp4"}, "video is not supported"),
                       ({"type": "image", "image": b"not an image"}, "not a readable")):
        with pytest.raises(ImageError, match=what):
            g.generate([{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}], max_new_tokens=4)
    with pytest.raises(ImageError, match="max_soft_tokens must be one of"):
        g.generate("hi", images=IMAGES[:1], max_soft_tokens=100)
    with pytest.raises(DgportError, match="not both"):
        g.generate([{"role": "user", "content": [{"type": "image", "image": png(IMAGES[0])}]}], images=IMAGES[:1])
    from dgport.exporters.export import ExportOptions, export

    text_only = tmp_path / "text-only"
    export(checkpoints[PRESET], text_only, ExportOptions(text_only=True, validate=False))
    assert not (text_only / "vision.onnx").exists()
    t = dgport.load(text_only, backend="cpu", threads=THREADS)
    assert not t.backend.has_vision
    with pytest.raises(DgportError, match="takes no images.*without --text-only"):
        t.generate("hi", images=IMAGES[:1], max_new_tokens=4)
    # text prompts are unaffected by the vision graph and the image input
    assert answer(t.generate("hi", seed=2)) == answer(g.generate("hi", seed=2))


def test_batch_rows_with_images_match_single_runs(gens):
    for g in (gens["cpu"],):
        prompts = ["describe", "and this", "no image here"]
        images = [IMAGES, IMAGES[1:], None]
        rows = g.generate_batch(prompts, seeds=[4, 5, 6], images=images)
        for r, p, im, s in zip(rows, prompts, images, (4, 5, 6)):
            assert answer(r) == answer(g.generate(p, images=im, seed=s))
