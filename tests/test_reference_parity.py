"""The step loop with the torch reference backend reproduces transformers' generate token for token
when both draw from the same numpy stream (the randomness contract)."""
from __future__ import annotations

import pytest

import dgport
from dgport.exporters.checkpoint import read_config
from hf_reference import hf_generate

EOS = (1, 106, 50)

# preset -> (prompt ids, seed, what the case must exercise)
CASES = {
    "tiny": (list(range(2, 11)), 7, "canvases"),
    "confident": (list(range(2, 13)), 3, "early-stop"),
    "long-context": ([2] + list(range(120, 159)), 11, "long-prompt"),
    "eos": (list(range(2, 11)), 0, "eos"),
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(CASES))
def test_loop_matches_hf_generate(preset, checkpoints, hf_models):
    prompt, seed, kind = CASES[preset]
    gen = dgport.load(checkpoints[preset], backend="torch", model=hf_models[preset])
    ours = gen.generate(prompt, seed=seed)
    theirs, hf_tpf = hf_generate(hf_models[preset], prompt, seed)
    assert ours.token_ids[0] == theirs
    assert ours.tokens_per_forward == pytest.approx(hf_tpf)

    cfg, defaults, _ = read_config(checkpoints[preset])
    C = cfg.canvas_length
    if kind == "canvases":
        assert len(ours.steps_per_canvas) >= 3
    if kind == "early-stop":
        assert min(ours.steps_per_canvas) < defaults.max_denoising_steps
        assert len(ours.steps_per_canvas) >= 2
    if kind == "long-prompt":
        assert len(prompt) > cfg.sliding_window and len(ours.steps_per_canvas) >= 2
    if kind == "eos":
        first = next(i for i, t in enumerate(theirs) if t in EOS)
        assert first % C != C - 1 and ours.finished  # inside a canvas, not at its end
        assert all(t == defaults.pad_token_id for t in theirs[first + 1:])
        assert len(theirs) % C == 0


def test_sampler_overrides_reach_both(checkpoints, hf_models):
    prompt = list(range(2, 9))
    gen = dgport.load(checkpoints["confident"], backend="torch", model=hf_models["confident"])
    overrides = dict(max_denoising_steps=5, t_min=0.2, t_max=1.1, entropy_bound=0.5, stability_threshold=2,
                     confidence_threshold=0.01)
    ours = gen.generate(prompt, seed=4, max_new_tokens=40, **overrides)
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    hf_kw = {k: v for k, v in overrides.items() if k != "entropy_bound"}
    theirs, _ = hf_generate(hf_models["confident"], prompt, 4, max_new_tokens=40,
                            sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.5), **hf_kw)
    assert ours.token_ids[0] == theirs and len(theirs) == 48  # ceil(40/16) canvases, whole canvases


def test_callbacks_stream_steps_and_canvases(checkpoints, hf_models):
    gen = dgport.load(checkpoints["tiny"], backend="torch", model=hf_models["tiny"])
    steps, canvases = [], []
    res = gen.generate([2, 5, 6], seed=1, max_new_tokens=32, on_step=steps.append, on_canvas=canvases.append)
    assert [c.canvas_index for c in canvases] == [0, 1]
    assert len(steps) == sum(res.steps_per_canvas)
    assert [s.temperature for s in steps[:2]] == pytest.approx([0.8, 0.8 - 0.4 / 6], rel=1e-6)
    joined = [int(t) for c in canvases for t in c.tokens]
    assert joined == res.token_ids[0]
    assert (steps[-1].argmax == canvases[-1].tokens).all()
