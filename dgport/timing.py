"""A Backend wrapper that times encode and denoise calls (for summaries, --json and benchmarks)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Timings:
    encode_s: list[float] = field(default_factory=list)
    encode_tokens: int = 0
    denoise_s: list[float] = field(default_factory=list)
    denoise_rows: int = 0  # rows denoised by batched calls (denoise_rows), summed over calls

    def as_dict(self) -> dict:
        enc, den = sum(self.encode_s), sum(self.denoise_s)
        return {
            "encode_calls": len(self.encode_s), "encode_tokens": self.encode_tokens, "encode_s": enc,
            "ms_per_encode": 1000 * enc / max(len(self.encode_s), 1),
            "denoise_steps": len(self.denoise_s), "denoise_s": den,
            "ms_per_step": 1000 * den / max(len(self.denoise_s), 1),
        }


class TimedBackend:
    """Delegates to `inner`, recording wall time per call."""

    def __init__(self, inner):
        self.inner = inner
        self.config = inner.config
        self.timings = Timings()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def cache_len(self) -> int:
        return self.inner.cache_len

    def encode(self, ids, positions, image_embeds=None):
        t = time.perf_counter()
        if image_embeds is None:  # a backend without images takes no image_embeds argument
            self.inner.encode(ids, positions)
        else:
            self.inner.encode(ids, positions, image_embeds=image_embeds)
        self.timings.encode_s.append(time.perf_counter() - t)
        self.timings.encode_tokens += int(ids.shape[-1])

    def denoise(self, canvas, positions, temperature, uniforms, **constraint):
        t = time.perf_counter()
        out = self.inner.denoise(canvas, positions, temperature, uniforms, **constraint)
        self.timings.denoise_s.append(time.perf_counter() - t)
        return out

    def encode_row(self, row, ids, positions, image_embeds=None):
        t = time.perf_counter()
        if image_embeds is None:
            self.inner.encode_row(row, ids, positions)
        else:
            self.inner.encode_row(row, ids, positions, image_embeds=image_embeds)
        self.timings.encode_s.append(time.perf_counter() - t)
        self.timings.encode_tokens += int(ids.shape[-1])

    def denoise_rows(self, rows, canvas, positions, temperatures, uniforms, fresh, **constraint):
        t = time.perf_counter()
        out = self.inner.denoise_rows(rows, canvas, positions, temperatures, uniforms, fresh, **constraint)
        self.timings.denoise_s.append(time.perf_counter() - t)
        self.timings.denoise_rows += len(rows)
        return out

    def new_canvas(self):
        self.inner.new_canvas()

    def reset(self):
        self.inner.reset()
