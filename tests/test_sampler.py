"""The numpy sampler pieces against transformers' own components, on random logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from dgport.runtimes.torch_ref import inverse_cdf_torch
from dgport.sampler import StableAndConfident, accept_mask, inverse_cdf, pad_after_eos, temperature


def entropy_of(logits: torch.Tensor) -> np.ndarray:
    return torch.distributions.Categorical(logits=logits).entropy().numpy()


@pytest.mark.parametrize("t_min,t_max,steps", [(0.4, 0.8, 48), (0.1, 1.3, 7), (0.5, 0.5000001, 3)])
def test_temperature_matches_reference_bit_for_bit(t_min, t_max, steps):
    proc = LinearTemperatureScheduleLogitsProcessor(t_min=t_min, t_max=t_max, max_denoising_steps=steps)
    logits = torch.randn(2, 5, 33, generator=torch.Generator().manual_seed(0)) * 7
    for cur in range(steps, 0, -1):
        ref = proc(None, logits, cur_step=torch.tensor(cur, dtype=torch.int32))
        ours = logits / torch.tensor(temperature(cur, steps, t_min, t_max))
        assert torch.equal(ref, ours), cur
    assert temperature(48, 48, 0.4, 0.8) == np.float32(0.8)


@pytest.mark.parametrize("scale,bound", [(0.5, 0.1), (4.0, 0.1), (12.0, 0.1), (8.0, 1.5)])
def test_acceptance_matches_entropy_bound_sampler(scale, bound):
    g = torch.Generator().manual_seed(int(scale * 10))
    B, C, V = 3, 64, 97
    logits = torch.randn(B, C, V, generator=g) * scale * torch.rand(B, C, 1, generator=g)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), C, V, 10)
    current = torch.randint(0, V, (B, C), generator=g)
    denoised = torch.randint(0, V, (B, C), generator=g)
    accepted = sampler.accept_canvas(current, denoised, logits, cur_step=3)
    ours = accept_mask(entropy_of(logits), bound)
    np.testing.assert_array_equal(ours, sampler.accepted_token_mask.numpy())
    np.testing.assert_array_equal(np.where(ours, denoised.numpy(), current.numpy()), accepted.numpy())
    assert ours.any(axis=-1).all()  # at least one position per row


def test_stopping_matches_stable_and_confident():
    g = torch.Generator().manual_seed(5)
    B, C, V = 2, 16, 50
    for stability in (0, 1, 2):
        ref = StableAndConfidentStoppingCriteria(stability_threshold=stability, confidence_threshold=0.05)
        ours = StableAndConfident(stability, 0.05)
        argmax = torch.randint(0, V, (B, C), generator=g)
        fired = False
        for step in range(8):
            if step % 3 == 2:
                argmax = argmax.clone()
                argmax[0, step % C] = (argmax[0, step % C] + 1) % V  # row 0 changes now and then
            sharp = 40.0 if step > 2 else 1.0
            logits = torch.randn(B, C, V, generator=g) + sharp * torch.nn.functional.one_hot(argmax, V)
            want = ref(argmax, logits).numpy()
            got = ours(argmax.numpy(), entropy_of(logits))
            np.testing.assert_array_equal(got, want)
            fired |= bool(want.any())
        assert fired


def test_inverse_cdf_numpy_and_torch_agree_and_follow_the_distribution():
    rng = np.random.Generator(np.random.PCG64(1))
    logits = rng.normal(size=(4096, 20)).astype(np.float32) * 2
    probs = torch.softmax(torch.from_numpy(logits), -1)
    u = rng.random(4096, dtype=np.float32)
    ours = inverse_cdf(probs.numpy(), u)
    theirs = inverse_cdf_torch(probs, torch.from_numpy(u)).numpy()
    np.testing.assert_array_equal(ours, theirs)
    # the smallest index whose cumulative probability exceeds u
    cdf = np.cumsum(probs.numpy(), axis=-1, dtype=np.float32)
    assert (cdf[np.arange(4096), ours] > u).all()
    prev = np.where(ours > 0, cdf[np.arange(4096), np.maximum(ours - 1, 0)], 0.0)
    assert (prev <= u).all()
    # u == 0 picks the first token with probability mass; u just below 1 the last
    one_hot = np.zeros((1, 5), np.float32)
    one_hot[0, 3] = 1
    assert inverse_cdf(one_hot, np.array([0.0], np.float32))[0] == 3
    assert inverse_cdf(one_hot, np.array([0.9999999], np.float32))[0] == 3


def test_pad_after_eos():
    toks = np.array([5, 7, 106, 9, 1, 4], dtype=np.int64)
    out, found = pad_after_eos(toks, (1, 106, 50), 0)
    assert found and out.tolist() == [5, 7, 106, 0, 0, 0]
    out, found = pad_after_eos(np.array([5, 6]), (1,), 0)
    assert not found and out.tolist() == [5, 6]
