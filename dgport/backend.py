"""The seam between the step loop and a runtime.

Everything vocabulary-sized (logits, the self-conditioning distribution) and everything
cache-sized (per-layer K/V) lives inside the backend, on its device. Per step the loop sends the
canvas, its positions, one temperature and one uniform per position, and gets back O(canvas)
numbers: the argmax canvas, per-position entropies and the inverse-CDF samples.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from .config import TextConfig


class StepOutput(NamedTuple):
    argmax: np.ndarray  # [B, C] int64: argmax of logits / temperature (first index on ties)
    entropy: np.ndarray  # [B, C] float32: entropy (nats) of softmax(logits / temperature)
    sampled: np.ndarray  # [B, C] int64: inverse-CDF draw from softmax(logits / temperature)


@runtime_checkable
class Backend(Protocol):
    config: TextConfig

    @property
    def cache_len(self) -> int:
        """Number of positions encoded so far (prompt plus committed canvases)."""

    def encode(self, ids: np.ndarray, positions: np.ndarray) -> None:
        """Run the causal encoder on ids [B, T] at absolute positions [B, T] and append their K/V to
        the cache (sliding layers keep the last `sliding_window - 1` positions)."""

    def new_canvas(self) -> None:
        """Start a canvas: the next `denoise` gets a zero self-conditioning signal."""

    def denoise(self, canvas: np.ndarray, positions: np.ndarray, temperature: np.float32,
                uniforms: np.ndarray) -> StepOutput:
        """One denoising step over canvas [B, C] at positions [B, C]; keeps the next step's
        self-conditioning signal on the device."""

    def reset(self) -> None:
        """Empty the cache and the self-conditioning state."""
