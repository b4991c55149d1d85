"""Images end to end on MLX: `generate(..., images=)` with backend='mlx' gives the torch reference's
tokens for the same seed (fp32 export of the 'vision' fixture: odd image sizes with padding patches,
grouped heads, standardization; two images in one prompt, an image in a later chat turn, chunked
encoding, batched rows), and a text-only MLX export refuses images in one line
(tests/test_images_e2e.py's checks, on MLX)."""
from __future__ import annotations

import pytest

import mlx.core as mx  # noqa: F401  (the dev extra installs mlx[cpu]; a missing mlx must fail, not skip)

import dgport
from dgport.errors import DgportError
from dgport.exporters.export import ExportOptions, export
from image_support import IMAGES, PRESET, answer, png


@pytest.fixture(scope="module")
def gens(checkpoints, hf_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlx-images") / "fp32"
    export(checkpoints[PRESET], out, ExportOptions(formats=("mlx",), validate=False))
    return {"torch": dgport.load(checkpoints[PRESET], backend="torch", model=hf_models[PRESET]),
            "mlx": dgport.load(out, backend="mlx")}


@pytest.mark.parametrize("seed", [0, 1])
def test_two_images_match_torch(gens, seed):
    ref = gens["torch"].generate("what is in these?", images=IMAGES, seed=seed)
    got = gens["mlx"].generate("what is in these?", images=IMAGES, seed=seed)
    assert 70 < got.prompt_ids.count(61) < 140 and got.prompt_ids == ref.prompt_ids
    assert answer(got) == answer(ref)


def test_image_in_a_later_turn_chunks_and_rows(gens):
    g, t = gens["mlx"], gens["torch"]
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": [{"type": "text", "text": "and this?"},
                                             {"type": "image", "image": png(IMAGES[1])}]}]
    assert answer(g.generate(messages, seed=3)) == answer(t.generate(messages, seed=3))
    base = answer(g.generate("describe", images=IMAGES, seed=5))
    assert base == answer(t.generate("describe", images=IMAGES, seed=5))
    assert answer(g.generate("describe", images=IMAGES[::-1], seed=5)) != base  # the image matters
    for chunk in (7, 50):  # cuts that would fall inside a block end before it or hold it whole
        assert answer(g.generate("describe", images=IMAGES, seed=5, encode_chunk=chunk)) == base
    prompts, images, seeds = ["describe", "and this", "no image here"], [IMAGES, IMAGES[1:], None], [5, 6, 7]
    rows = g.generate_batch(prompts, seeds=seeds, images=images)
    assert answer(rows[0]) == base
    for r, p, im, s in zip(rows[1:], prompts[1:], images[1:], seeds[1:]):
        assert answer(r) == answer(g.generate(p, images=im, seed=s))


def test_text_only_export_refuses_images(gens, checkpoints, tmp_path):
    out = tmp_path / "text-only"
    export(checkpoints[PRESET], out, ExportOptions(formats=("mlx",), text_only=True, validate=False))
    assert not (out / "mlx" / "vision.safetensors").exists()
    t = dgport.load(out, backend="mlx")
    assert not t.backend.has_vision
    with pytest.raises(DgportError, match="takes no images.*without --text-only"):
        t.generate("hi", images=IMAGES[:1], max_new_tokens=4)
    assert answer(t.generate("hi", seed=2)) == answer(gens["mlx"].generate("hi", seed=2))
