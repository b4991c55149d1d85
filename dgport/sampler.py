"""The reference sampler's pieces (spec §6.2), in numpy, on O(canvas) numbers.

Each function reproduces one transformers 5.23.0 component bit for bit where it can:
`temperature` = LinearTemperatureScheduleLogitsProcessor, `accept_mask` = EntropyBoundSampler,
`StableAndConfident` = StableAndConfidentStoppingCriteria, `pad_after_eos` = the EOS handling of
`_finalize_canvas`, and `inverse_cdf` is the randomness contract's sampling rule.
"""
from __future__ import annotations

import numpy as np


def temperature(cur_step: int, max_steps: int, t_min: float, t_max: float) -> np.float32:
    """T = t_min + (t_max - t_min) * cur_step / N, with cur_step counting down N..1.

    Computed in float32 in the reference's order of operations, so `logits / T` matches it bit for bit."""
    frac = np.float32(cur_step) / np.float32(max_steps)
    return np.float32(np.float32(t_min) + np.float32(t_max - t_min) * frac)


def accept_mask(entropy: np.ndarray, bound: float) -> np.ndarray:
    """Entropy-bound acceptance: the k-th lowest-entropy position is accepted iff the sum of the
    k-1 lower entropies is <= bound (so at least one position per row). entropy: [B, C]."""
    entropy = entropy.astype(np.float32, copy=False)
    order = np.argsort(entropy, axis=-1, kind="stable")
    sorted_e = np.take_along_axis(entropy, order, axis=-1)
    before = np.cumsum(sorted_e, axis=-1, dtype=np.float32) - sorted_e
    mask = np.zeros(entropy.shape, dtype=bool)
    np.put_along_axis(mask, order, before <= np.float32(bound), axis=-1)
    return mask


class StableAndConfident:
    """Stop a canvas when the argmax canvas equals each of the previous `stability_threshold`
    argmax canvases and the mean entropy is below `confidence_threshold` (strict)."""

    def __init__(self, stability_threshold: int, confidence_threshold: float):
        self.stability_threshold = stability_threshold
        self.confidence_threshold = np.float32(confidence_threshold)
        self.history = None

    def reset(self) -> None:
        self.history = None

    def __call__(self, argmax: np.ndarray, entropy: np.ndarray, free: np.ndarray | None = None) -> np.ndarray:
        """`free` [C] (a canvas template's holes): the mean entropy is taken over those positions only;
        fixed positions are always stable (the loop writes their token into the argmax canvas)."""
        if self.stability_threshold == 0:
            stable = np.ones(argmax.shape[0], dtype=bool)
        else:
            if self.history is None:
                self.history = np.full((self.stability_threshold, *argmax.shape), -1, dtype=np.int64)
            stable = (self.history == argmax[None]).all(axis=-1).all(axis=0)
            self.history = np.roll(self.history, -1, axis=0)
            self.history[-1] = argmax
        if free is None:
            mean = entropy.astype(np.float32).mean(axis=-1, dtype=np.float32)
        else:
            mean = entropy.astype(np.float32)[..., free].mean(axis=-1, dtype=np.float32)
        confident = mean < self.confidence_threshold
        return stable & confident


def pad_after_eos(tokens: np.ndarray, eos_ids, pad_id: int) -> tuple[np.ndarray, bool]:
    """Replace every token after the first EOS by PAD (the EOS itself stays). tokens: [C]."""
    is_eos = np.isin(tokens, np.asarray(list(eos_ids), dtype=np.int64))
    if not is_eos.any():
        return tokens, False
    out = tokens.copy()
    out[int(np.argmax(is_eos)) + 1:] = pad_id
    return out, True


def inverse_cdf(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """The randomness contract's draw: the smallest index whose cumulative probability exceeds the
    uniform. probs: [..., V] float32, uniforms: [...] float32. Reference for the backends' in-graph
    versions (they compute the same thing on the device)."""
    cdf = np.cumsum(probs.astype(np.float32), axis=-1, dtype=np.float32)
    idx = (cdf <= uniforms[..., None].astype(np.float32)).sum(axis=-1)
    return np.minimum(idx, probs.shape[-1] - 1).astype(np.int64)
