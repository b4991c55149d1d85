"""Run transformers' DiffusionGemma generate with its randomness drawn from a numpy stream in the
order of dgport's randomness contract, so its tokens can be compared one for one."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from dgport.runtimes.torch_ref import inverse_cdf_torch


@contextlib.contextmanager
def numpy_randomness(rng: np.random.Generator):
    """Replace torch.randint (initial canvas, renoise ids) and torch.multinomial (sampling) by
    draws from `rng`, as the contract orders them."""
    real_randint, real_multinomial = torch.randint, torch.multinomial

    def randint(low, high=None, size=None, device=None, **kw):
        if high is None:
            low, high = 0, low
        return torch.from_numpy(rng.integers(low, high, size=tuple(size)))

    def multinomial(probs, num_samples, **kw):
        assert num_samples == 1
        u = torch.from_numpy(rng.random(probs.shape[0], dtype=np.float32))
        return inverse_cdf_torch(probs, u)[:, None]

    torch.randint, torch.multinomial = randint, multinomial
    try:
        yield
    finally:
        torch.randint, torch.multinomial = real_randint, real_multinomial


def hf_generate(model, prompt_ids, seed: int, **gen_kwargs):
    """HF generate's new tokens (after the prompt) and tokens_per_forward."""
    rng = np.random.Generator(np.random.PCG64(seed))
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    with numpy_randomness(rng), torch.no_grad():
        out = model.generate(ids, **gen_kwargs)
    return out.sequences[0, ids.shape[1]:].tolist(), float(out.tokens_per_forward[0])
