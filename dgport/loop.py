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


class Row:
    """One generation's state: its canvases, steps, stopping rule and randomness stream. The two
    drivers (generate_ids, one row on the single-row methods; dgport.batch.BatchLoop, many rows on a
    RowBackend) encode `to_encode` at `enc_pos`, then call `begin_canvas`, then alternate
    `step_inputs` / the backend's denoise / `after_step` while `denoising`, until `done`."""

    def __init__(self, prompt_ids, settings: GenerationDefaults, rng: np.random.Generator, config, start: int = 0,
                 template: Layout | None = None, on_step=None, on_canvas=None):
        settings.validate()
        prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if prompt.size == 0:
            raise DgportError("the prompt is empty; give at least one token")
        C, V = config.canvas_length, config.vocab_size
        if prompt.min() < 0 or prompt.max() >= V:
            raise DgportError(f"prompt token ids must lie in [0, {V}) (got {prompt.min()}..{prompt.max()})")
        self.settings, self.rng, self.C, self.V = settings, rng, C, V
        self.template, self.on_step, self.on_canvas = template, on_step, on_canvas
        self.stopper = StableAndConfident(settings.stability_threshold, settings.confidence_threshold)
        self.result = LoopResult(token_ids=[])
        self.to_encode = prompt
        self.enc_pos = np.arange(start, start + prompt.size, dtype=np.int64)
        self.canvases = math.ceil(settings.max_new_tokens / C) if template is None else template.canvases(C)
        # a template's vocabulary constraints: the token-mask table [K, V] (once) and each canvas' classes [C]
        self.masks = None if template is None or template.constraint is None else \
            template.constraint.masks(V, settings.pad_token_id, settings.eos_token_ids)
        self.classes = None
        self.k = -1  # the canvas being denoised
        self.cur_step = 0  # the countdown N..1 of the canvas being denoised; 0: not denoising
        self.done = False

    @property
    def denoising(self) -> bool:
        return self.cur_step > 0

    @property
    def fresh(self) -> bool:
        """The next step is the canvas' first (a zero self-conditioning signal)."""
        return self.steps == 0

    def begin_canvas(self) -> None:
        """After `to_encode` is encoded: draw the next canvas (a canvas with no hole is committed at once)."""
        s, C = self.settings, self.C
        self.k += 1
        self.dec_pos = np.arange(self.enc_pos[-1] + 1, self.enc_pos[-1] + 1 + C, dtype=np.int64)[None]
        self.canvas = self.rng.integers(0, self.V, size=(1, C))
        self.fixed = self.free = None
        if self.template is not None:
            self.classes = self.template.canvas_classes(self.k, C)
            self.fixed_ids, self.fixed = self.template.canvas(self.k, C, s.eos_token_ids[0], s.pad_token_id)
            self.free = ~self.fixed
            self.canvas = np.where(self.fixed, self.fixed_ids, self.canvas)
        self.argmax = self.canvas
        self.stopper.reset()
        self.steps = 0
        self.cur_step = s.max_denoising_steps if self.free is None or self.free.any() else 0
        if not self.denoising:
            self._commit()

    def step_inputs(self):
        """(canvas [1, C], positions [1, C], temperature, uniforms [1, C]) of the next step."""
        s = self.settings
        self.t = temperature(self.cur_step, s.max_denoising_steps, s.t_min, s.t_max)
        uniforms = self.rng.random((1, self.C), dtype=np.float32)
        return self.canvas, self.dec_pos, self.t, uniforms

    def after_step(self, argmax: np.ndarray, entropy: np.ndarray, sampled: np.ndarray) -> None:
        """The backend's outputs for this row ([1, C] each): accept, renoise, stop or go on."""
        s, fixed = self.settings, self.fixed
        renoise = self.rng.integers(0, self.V, size=(1, self.C))
        model_entropy = entropy
        if fixed is not None:
            entropy = np.where(fixed, np.float32(0), entropy)
            argmax = np.where(fixed, self.fixed_ids, argmax)
        accepted = accept_mask(entropy, s.entropy_bound)
        canvas = np.where(accepted, sampled, renoise)
        if fixed is not None:
            canvas = np.where(fixed, self.fixed_ids, canvas)
        self.canvas, self.argmax = canvas, argmax
        stop = self.stopper(argmax, model_entropy, self.free)
        self.steps += 1
        self.cur_step -= 1
        if self.on_step is not None:
            self.on_step(StepEvent(self.k, self.steps - 1, float(self.t), argmax[0], model_entropy[0], accepted[0],
                                   canvas[0], fixed))
        if stop.all() or self.cur_step == 0:
            self.cur_step = 0
            self._commit()

    def _commit(self) -> None:
        s, res = self.settings, self.result
        eos, pad = s.eos_token_ids, s.pad_token_id
        if self.template is None:
            committed, finished = pad_after_eos(self.argmax[0], eos, pad)
        else:
            committed = self.template.commit(self.argmax[0], self.fixed_ids, self.fixed, eos, pad, self.k * self.C,
                                             res.token_ids)
            self.canvases = self.template.canvases(self.C)  # (a tool switch settles its length as it commits)
            finished = self.k == self.canvases - 1
            res.fixed_tokens += int(np.count_nonzero(self.fixed & (committed != pad)))
        res.token_ids.extend(int(t) for t in committed)
        res.steps_per_canvas.append(self.steps)
        res.finished = finished
        if self.on_canvas is not None:
            self.on_canvas(CanvasEvent(self.k, committed, self.steps, finished, self.fixed))
        if finished or self.k == self.canvases - 1:
            self.done = True
            if self.template is not None:
                res.holes = self.template.hole_ids(res.token_ids, pad)
            return
        self.to_encode = self.argmax[0] if self.template is None else committed
        self.enc_pos = self.dec_pos[0]


def generate_ids(
    backend: Backend,
    prompt_ids,
    settings: GenerationDefaults,
    rng: np.random.Generator,
    on_step: Callable[[StepEvent], None] | None = None,
    on_canvas: Callable[[CanvasEvent], None] | None = None,
    encode_chunk: int = ENCODE_CHUNK,
    template: Layout | None = None,
    images=None,
) -> LoopResult:
    """Generate after `prompt_ids` (the uncached tokens; the backend's cache may already hold a
    prefix, e.g. earlier chat turns). Positions continue from `backend.cache_len`; the prompt is
    encoded `encode_chunk` tokens at a time.

    `template` (a canvas template's Layout): with constrained holes, the backend gets its token-mask
    table (set_token_masks) and each step its positions' classes (denoise(..., classes=)). Its fixed
    tokens are written into every step's input and argmax canvas, accepted at no cost to the entropy budget (their entropy counts as 0) and left out
    of the stopping rule's mean entropy; a canvas with no hole takes no step. The answer is the
    template's canvases, committed as Layout.commit says (and encoded so for the next canvas).

    `images` (dgport.image_prompt.PromptImages, for the image blocks in prompt_ids): encoded once by
    the backend's vision tower before the first encode call; the prompt's encode calls never split a block."""
    row = Row(prompt_ids, settings, rng, backend.config, backend.cache_len, template, on_step, on_canvas)
    soft = None
    if images is not None:
        from .image_prompt import encode_prompt

        images.encode(backend)
        soft = np.concatenate(images.soft, axis=0)
    if row.masks is not None:
        backend.set_token_masks(row.masks)
    try:
        while not row.done:
            if soft is not None:  # the prompt, once
                encode_prompt(lambda i, p, e: backend.encode(i, p, image_embeds=e) if e is not None else
                              backend.encode(i, p), row.to_encode, row.enc_pos, encode_chunk, soft,
                              backend.vision.image_token_id)
                soft = None
            else:
                encode_chunked(backend, row.to_encode[None], row.enc_pos[None], encode_chunk)
            backend.new_canvas()
            row.begin_canvas()
            while row.denoising:
                if row.masks is None:
                    out = backend.denoise(*row.step_inputs())
                else:  # the constrained step: each position's token class
                    out = backend.denoise(*row.step_inputs(), classes=row.classes[None])
                row.after_step(out.argmax, out.entropy, out.sampled)
    finally:
        if row.masks is not None:
            backend.set_token_masks(None)
    return row.result
