"""The step loop: block diffusion over any Backend, in numpy (spec §6.2, the HF reference sampler).

The randomness contract (public; backends and tests rely on it). With `rng` a numpy Generator:
  per canvas:  rng.integers(0, V, size=(B, C))                 the initial canvas
  per step:    rng.random((B, C), dtype=np.float32)             one uniform per position (sampling)
               rng.integers(0, V, size=(B, C))                  renoise ids
The sampled token is the smallest index whose cumulative probability exceeds its uniform.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .backend import Backend
from .canvas_template import Layout
from .config import GenerationDefaults
from .errors import DgportError
from .schema import is_int
from .sampler import StableAndConfident, accept_mask, pad_after_eos, temperature


# Prompt tokens per encode call. The encoder's attention holds a [heads, T, S] score tensor per
# layer (plus what the backend's kernels add), so one call for a 32k-token prompt would need tens of
# GB; chunks bound that at heads * ENCODE_CHUNK * S. Chunked and one-shot encodes compute the same
# cache: each chunk attends to the cache so far (sliding layers keep sliding_window - 1 positions,
# all that a chunk's queries can see).
ENCODE_CHUNK = 1024


MAX_ENCODE_CHUNK = 1 << 20
MAX_SEED = (1 << 63) - 1


class ContextOverflow(DgportError):
    """The prompt and the answer would not fit in the model's context (max_position_embeddings)."""


def check_encode_chunk(chunk) -> int:
    if not is_int(chunk) or not 1 <= chunk <= MAX_ENCODE_CHUNK:
        raise DgportError(f"encode_chunk must be a positive number of tokens up to {MAX_ENCODE_CHUNK} (got {chunk!r})")
    return int(chunk)


def fresh_seed(seed=None) -> int:
    """The seed a run uses: `seed` as given, or a fresh one to report, so that any run can be repeated."""
    import secrets

    return secrets.randbits(32) if seed is None else seed


def make_rng(seed) -> np.random.Generator:
    """numpy's PCG64 stream for `seed` (None: fresh entropy); the seed must be an integer in [0, 2**63 - 1]."""
    if seed is not None and (not is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise DgportError(f"seed must be an integer in [0, 2**63 - 1] (got {seed!r})")
    return np.random.Generator(np.random.PCG64(None if seed is None else int(seed)))


def check_context(config, cached: int, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse, before computing anything, a run whose positions would pass max_position_embeddings:
    the cache so far, the prompt and every canvas max_new_tokens asks for (whole canvases)."""
    C, limit = config.canvas_length, config.max_position_embeddings
    canvases = math.ceil(max_new_tokens / C)
    need = cached + prompt_len + canvases * C
    if need > limit:
        before = f" after {cached} cached positions" if cached else ""
        room = limit - cached - canvases * C
        hint = (f"shorten the prompt to at most {room} tokens or lower max_new_tokens" if room > 0
                else "lower max_new_tokens")
        raise ContextOverflow(
            f"the prompt ({prompt_len} tokens{before}) and max_new_tokens {max_new_tokens} ({canvases} canvases of "
            f"{C}) need {need} positions, more than this model's context of {limit} (max_position_embeddings); "
            f"{hint}")


def encode_chunked(backend: Backend, ids: np.ndarray, positions: np.ndarray, chunk: int = ENCODE_CHUNK) -> None:
    """backend.encode over [B, T] ids and positions, `chunk` tokens at a time."""
    chunk = check_encode_chunk(chunk)
    for s in range(0, ids.shape[-1], chunk):
        backend.encode(ids[:, s:s + chunk], positions[:, s:s + chunk])


@dataclass
class StepEvent:
    canvas_index: int
    step: int  # 0-based step within the canvas
    temperature: float
    argmax: np.ndarray  # [C] the draft (argmax) canvas
    entropy: np.ndarray  # [C]
    accepted: np.ndarray  # [C] bool
    canvas: np.ndarray  # [C] next step's input canvas (accepted samples + renoise)
    fixed: np.ndarray | None = None  # [C] bool: positions a canvas template fixes (None: no template)


@dataclass
class CanvasEvent:
    canvas_index: int
    tokens: np.ndarray  # [C] committed ids (PAD after the first EOS)
    steps: int
    finished: bool  # an EOS id was committed (with a template: its last canvas)
    fixed: np.ndarray | None = None  # [C] bool: positions a canvas template fixed (None: no template)


@dataclass
class LoopResult:
    token_ids: list[int]  # whole canvases after the prompt, PAD after the first EOS (as HF generate returns)
    steps_per_canvas: list[int] = field(default_factory=list)
    finished: bool = False  # stopped on an EOS id (else: ran out of max_new_tokens); a template: completed
    fixed_tokens: int = 0  # non-PAD tokens a canvas template fixed (not generated)
    holes: list[list[int]] | None = None  # a template's holes: their committed tokens, PAD dropped

    @property
    def decoder_passes(self) -> int:
        return sum(self.steps_per_canvas)

    def tokens_per_forward(self, pad_id: int) -> float:
        """Non-PAD generated tokens per decoder pass (the reference's metric)."""
        n = sum(1 for t in self.token_ids if t != pad_id) - self.fixed_tokens
        return n / self.decoder_passes if self.decoder_passes else 0.0


def generate_ids(
    backend: Backend,
    prompt_ids,
    settings: GenerationDefaults,
    rng: np.random.Generator,
    on_step: Callable[[StepEvent], None] | None = None,
    on_canvas: Callable[[CanvasEvent], None] | None = None,
    encode_chunk: int = ENCODE_CHUNK,
    template: Layout | None = None,
) -> LoopResult:
    """Generate after `prompt_ids` (the uncached tokens; the backend's cache may already hold a
    prefix, e.g. earlier chat turns). Positions continue from `backend.cache_len`; the prompt is
    encoded `encode_chunk` tokens at a time.

    `template` (a canvas template's Layout): its fixed tokens are written into every step's input and
    argmax canvas, accepted at no cost to the entropy budget (their entropy counts as 0) and left out
    of the stopping rule's mean entropy; a canvas with no hole takes no step. The answer is the
    template's canvases, committed as Layout.commit says (and encoded so for the next canvas)."""
    settings.validate()
    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    if prompt.size == 0:
        raise DgportError("the prompt is empty; give at least one token")
    cfg = backend.config
    C, V = cfg.canvas_length, cfg.vocab_size
    if prompt.min() < 0 or prompt.max() >= V:
        raise DgportError(f"prompt token ids must lie in [0, {V}) (got {prompt.min()}..{prompt.max()})")
    stopper = StableAndConfident(settings.stability_threshold, settings.confidence_threshold)
    result = LoopResult(token_ids=[])
    to_encode = prompt
    start = backend.cache_len
    enc_pos = np.arange(start, start + prompt.size, dtype=np.int64)
    canvases = math.ceil(settings.max_new_tokens / C) if template is None else template.canvases(C)
    eos, pad = settings.eos_token_ids, settings.pad_token_id
    for k in range(canvases):
        encode_chunked(backend, to_encode[None], enc_pos[None], encode_chunk)
        dec_pos = np.arange(enc_pos[-1] + 1, enc_pos[-1] + 1 + C, dtype=np.int64)[None]
        canvas = rng.integers(0, V, size=(1, C))
        fixed = free = None
        if template is not None:
            fixed_ids, fixed = template.canvas(k, C, eos[0], pad)
            free = ~fixed
            canvas = np.where(fixed, fixed_ids, canvas)
        argmax = canvas
        backend.new_canvas()
        stopper.reset()
        steps = 0
        for cur_step in range(settings.max_denoising_steps if free is None or free.any() else 0, 0, -1):
            t = temperature(cur_step, settings.max_denoising_steps, settings.t_min, settings.t_max)
            uniforms = rng.random((1, C), dtype=np.float32)
            out = backend.denoise(canvas, dec_pos, t, uniforms)
            renoise = rng.integers(0, V, size=(1, C))
            entropy, argmax = out.entropy, out.argmax
            if fixed is not None:
                entropy = np.where(fixed, np.float32(0), entropy)
                argmax = np.where(fixed, fixed_ids, argmax)
            accepted = accept_mask(entropy, settings.entropy_bound)
            canvas = np.where(accepted, out.sampled, renoise)
            if fixed is not None:
                canvas = np.where(fixed, fixed_ids, canvas)
            stop = stopper(argmax, out.entropy, free)
            steps += 1
            if on_step is not None:
                on_step(StepEvent(k, steps - 1, float(t), argmax[0], out.entropy[0], accepted[0], canvas[0], fixed))
            if stop.all():
                break
        if template is None:
            committed, finished = pad_after_eos(argmax[0], eos, pad)
        else:
            committed, finished = template.commit(argmax[0], fixed_ids, fixed, eos, pad), k == canvases - 1
            result.fixed_tokens += int(np.count_nonzero(fixed & (committed != pad)))
        result.token_ids.extend(int(t) for t in committed)
        result.steps_per_canvas.append(steps)
        result.finished = finished
        if on_canvas is not None:
            on_canvas(CanvasEvent(k, committed, steps, finished, fixed))
        if finished:
            break
        to_encode, enc_pos = (argmax[0] if template is None else committed), dec_pos[0]
    if template is not None:
        result.holes = template.hole_ids(result.token_ids, pad)
    return result
