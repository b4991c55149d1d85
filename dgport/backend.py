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
from .errors import DgportError


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


@runtime_checkable
class RowBackend(Protocol):
    """Batched generation (dgport.loop.BatchLoop): many independent rows, each with its own KV cache
    (its own length), its own self-conditioning signal and its own temperature, denoised together as
    one batch. Separate from the single-row methods above, whose state it never touches.

    Rows of different cache lengths share one batched denoise call: the backend left-pads each row's
    cache to the longest and the graph masks the padding (a past key whose implied position,
    first canvas position - cache length + index, is negative). Row i's outputs equal a single-row
    `denoise` of that row alone, up to kernels whose rounding depends on the batch (docs)."""

    def open_row(self, copy_of: int | None = None) -> int:
        """A new row with an empty cache (or a copy of row `copy_of`'s cache and length); its id."""

    def close_row(self, row: int) -> None:
        """Forget a row and free its cache (an unknown id is an error)."""

    def row_cache_len(self, row: int) -> int:
        """Positions encoded into the row's cache so far."""

    def encode_row(self, row: int, ids: np.ndarray, positions: np.ndarray) -> None:
        """`encode` on one row's cache: ids and positions [1, T], positions continuing its cache."""

    def denoise_rows(self, rows: list[int], canvas: np.ndarray, positions: np.ndarray, temperatures: np.ndarray,
                     uniforms: np.ndarray, fresh: np.ndarray) -> StepOutput:
        """One denoising step of rows (in this order, b of them) as one batch: canvas, positions and
        uniforms [b, C], temperatures [b] float32, fresh [b] bool (the row starts a canvas: a zero
        self-conditioning signal). Each row reads its own cache and keeps its own next signal."""


def row_encode_inputs(ids, positions) -> tuple[np.ndarray, np.ndarray]:
    """encode_row's ids and positions as int64 [1, T], or a DgportError."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    positions = np.ascontiguousarray(positions, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[0] != 1 or positions.shape != ids.shape:
        raise DgportError(f"encode_row takes ids and positions [1, T] (got {ids.shape} and {positions.shape})")
    return ids, positions


def row_step_inputs(rows, lengths, canvas, positions, temperatures, uniforms, fresh) -> tuple:
    """denoise_rows' arguments checked and typed: (rows as a tuple, canvas and positions int64 [b, C],
    temperatures float32 [b], uniforms float32 [b, C], fresh bool [b]). `lengths`: each row's cache
    length (the caller looked the rows up, refusing unknown ones)."""
    rows = tuple(rows)
    b = len(rows)
    if b == 0 or len(set(rows)) != b:
        raise DgportError(f"denoise_rows takes one or more distinct rows (got {list(rows)})")
    canvas = np.ascontiguousarray(canvas, dtype=np.int64)
    positions = np.ascontiguousarray(positions, dtype=np.int64)
    uniforms = np.ascontiguousarray(uniforms, dtype=np.float32)
    temperatures = np.ascontiguousarray(temperatures, dtype=np.float32)
    fresh = np.asarray(fresh, dtype=bool)
    if canvas.ndim != 2 or canvas.shape[0] != b or positions.shape != canvas.shape or uniforms.shape != canvas.shape:
        raise DgportError(f"denoise_rows over {b} rows takes canvas, positions and uniforms [{b}, C] "
                          f"(got {canvas.shape}, {positions.shape}, {uniforms.shape})")
    if temperatures.shape != (b,) or fresh.shape != (b,):
        raise DgportError(f"denoise_rows over {b} rows takes temperatures and fresh [{b}] "
                          f"(got {temperatures.shape}, {fresh.shape})")
    if 0 in lengths:
        raise DgportError("denoise_rows on a row with an empty cache: encode_row its prompt first")
    return rows, canvas, positions, temperatures, uniforms, fresh


def image_embeds_input(ids: np.ndarray, image_embeds, vision, hidden: int) -> np.ndarray | None:
    """encode's `image_embeds` checked: None (text only; also for an empty array) or float32 [S, hidden],
    S being the count of `vision.image_token_id` in ids [B, T] (rows taken in row-major order). `vision`:
    the backend's VisionInfo (None: the backend takes no images)."""
    if image_embeds is None:
        return None
    x = np.ascontiguousarray(image_embeds, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != hidden:
        raise DgportError(f"encode: image_embeds must be [S, {hidden}] (got {list(x.shape)})")
    if x.shape[0] == 0:
        return None
    if vision is None:
        raise DgportError("this export takes no images (it has no vision tower); export the checkpoint again "
                          "without --text-only")
    n = int(np.count_nonzero(np.asarray(ids) == vision.image_token_id))
    if n != x.shape[0]:
        raise DgportError(f"encode: {x.shape[0]} image soft tokens for {n} image-token positions")
    if not np.isfinite(x).all():
        raise DgportError("encode: image_embeds holds NaN or infinite values")
    return x


def no_vision_error(path) -> DgportError:
    return DgportError(f"{path}: this export takes no images (exported with --text-only, from a checkpoint without a "
                       "vision tower, or by a dgport before images); export the checkpoint again without --text-only")
