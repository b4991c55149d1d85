"""Multi-turn chat over one backend whose KV cache persists between turns.

The cache holds the token stream the model has seen: the first prompt, the committed canvases and,
before each new turn, the rest of the last answer closed like the chat template closes a model
turn, then the new user turn. Only those new tokens are encoded; the prefix is never re-encoded.

A turn may carry images (`say(text, images=[...])`): its image markers become image blocks (boi, one
image token per soft token, eoi) and only that turn's images go through the vision tower; the earlier
turns' blocks stay in the cache. `run_ids` (generation over token ids whose image blocks are already
expanded) and `timed_backend` serve `dgport run` and `dgport serve` too."""
from __future__ import annotations

import secrets
import time

import numpy as np

from .api import Generator, GenerationResult
from .errors import DgportError
from .loop import (ENCODE_CHUNK, ContextOverflow, check_context, check_encode_chunk, fresh_seed, generate_ids,
                   make_rng)
from .schema import utf8_text
from .timing import TimedBackend


def timed_backend(backend):
    """`backend` timed (dgport.timing.TimedBackend); a timed one as it is."""
    return backend if isinstance(backend, TimedBackend) else TimedBackend(backend)


def run_ids(gen: Generator, ids: list[int], images=None, keep_cache: bool = False, max_new_tokens=None,
            seed=None, rng=None, on_step=None, on_canvas=None, encode_chunk: int = ENCODE_CHUNK, template=None,
            **overrides) -> GenerationResult:
    """Generator.generate over token ids whose image blocks are already expanded: `images`
    (dgport.image_prompt.PromptImages) are the images of the blocks in `ids`, in order (None: no block).
    Any other image token in `ids` (one the model wrote in an earlier answer) is an ordinary token, as it
    was when the model wrote it. `template`: a tokenized Layout, as the server plans it."""
    if template is not None:
        max_new_tokens = template.check_budget(gen.config.canvas_length, max_new_tokens)
    settings = gen.settings(max_new_tokens, **overrides)
    settings.validate()
    if rng is None:
        seed = fresh_seed(seed)
        rng = make_rng(seed)
    else:
        seed = None
    check_encode_chunk(encode_chunk)
    check_context(gen.config, gen.backend.cache_len if keep_cache else 0, len(ids), settings.max_new_tokens)
    if not keep_cache:
        gen.backend.reset()
    out = generate_ids(gen.backend, ids, settings, rng, on_step=on_step, on_canvas=on_canvas,
                       encode_chunk=encode_chunk, template=template, images=images)
    return gen._result(out, list(ids), settings, seed)


def image_count(ids, vision) -> int:
    """Image tokens in `ids` (0 without a vision tower)."""
    return 0 if vision is None else int(np.count_nonzero(np.asarray(ids, dtype=np.int64) == vision.image_token_id))


def joined_images(parts: list):
    """One PromptImages holding the images of `parts` (PromptImages) in order, with their soft tokens when
    every part has them; None for no image."""
    from .image_prompt import PromptImages

    parts = [p for p in parts if p is not None and p.patches]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    soft = [s for p in parts for s in p.soft] if all(p.soft is not None for p in parts) else None
    return PromptImages([x for p in parts for x in p.patches], "", soft)


class ContextFull(ContextOverflow):
    """The next turn would pass the model's context: the conversation must start over."""


def turn_close(render, history: list[dict], messages: list[dict]) -> str | None:
    """What the chat template writes after a model turn's content (e.g. '<turn|>\\n') once `history`:
    rendered with a random marker as that turn's content, one no message in `messages` contains (so no
    user text can move the split); None when the template does not write the content back exactly once.
    `render(messages, add_generation_prompt)` renders with the conversation's settings."""
    for _ in range(4):
        marker = f"dgport{secrets.token_hex(16)}"
        if any(marker in str(m.get("content", "")) for m in messages):
            continue  # 2**-128 per message; drawn again rather than trusted
        text = render(history + [{"role": "assistant", "content": marker}], False)
        return text.split(marker, 1)[1] if text.count(marker) == 1 else None
    return None


def continuation_ids(tokenizer, render, history: list[dict], answer: str, messages: list[dict],
                     tail: list[int]) -> list[int] | None:
    """The ids that continue a cached conversation into `messages` (+ the generation prompt): `history`
    then the model's `answer` are in the cache except the answer's own last tokens `tail`; what follows
    is `tail`, the template's turn close, then the new turns. The model's own tokens, not the answer
    re-rendered. None when the template rewrites the history or hides where the answer ends (then
    encode the rendered conversation afresh)."""
    parts = continuation_parts(tokenizer, render, history, answer, messages, tail)
    return None if parts is None else parts[0] + parts[1]


def continuation_parts(tokenizer, render, history: list[dict], answer: str, messages: list[dict],
                       tail: list[int]) -> tuple[list[int], list[int]] | None:
    """continuation_ids in two parts: (`tail` and the turn's close, the new turns' ids): image markers in
    the new turns are the second part's alone."""
    before = render(history + [{"role": "assistant", "content": answer}], False)
    after = render(messages, True)
    if not after.startswith(before):
        return None
    close = turn_close(render, history, messages)
    if close is None:
        return None
    return list(tail) + tokenizer.encode(close), tokenizer.encode(after[len(before):])


class ChatSession:
    def __init__(self, gen: Generator, system: str | None = None, think: bool = False, seed: int | None = None,
                 max_new_tokens: int | None = None, encode_chunk: int = ENCODE_CHUNK, max_soft_tokens: int | None = None,
                 **sampler_overrides):
        """`max_soft_tokens` (70, 140, 280, 560, 1120; None: the model's): each image's detail."""
        from .images import ImageSettings

        self.gen = gen
        ImageSettings().with_soft_tokens(max_soft_tokens)  # refused up front, as every setting
        self.max_soft_tokens = max_soft_tokens
        self.encode_chunk = check_encode_chunk(encode_chunk)
        self.think = think
        self.rng = make_rng(seed)
        self.max_new_tokens = max_new_tokens
        self.overrides = sampler_overrides
        self.settings = gen.settings(max_new_tokens, **sampler_overrides)  # refuses bad settings up front
        if system is not None and not isinstance(system, str):
            raise DgportError(f"the system prompt must be text (got {type(system).__name__})")
        if system is not None:
            utf8_text(system, "the system prompt")
        self.system = system
        self.reset()

    def reset(self) -> None:
        """Start a new conversation (same system prompt and random stream): what to do once the
        conversation is full (ContextFull)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self._tail: list[int] = []  # ids of the last answer that are not in the cache yet
        self._stale = False  # a turn stopped mid-answer: the cache holds text the conversation does not
        self._images: list = []  # the PromptImages of the turns in `messages` that have images, in order
        self.encoded_last_turn = 0
        self.last_stats = ""
        self.gen.backend.reset()

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.gen.tokenizer.render(messages, add_generation_prompt=generation_prompt,
                                         enable_thinking=self.think)

    @property
    def vision(self):
        """The backend's VisionInfo (None: the model takes no images)."""
        return getattr(self.gen.backend, "vision", None)

    def next_turn_ids(self, user_text: str) -> tuple[list[int], bool]:
        """(ids to encode for this turn, whether the cache is kept)."""
        ids, keep, _ = self._turn({"role": "user", "content": user_text}, None)
        return ids, keep

    def _turn(self, message: dict, images) -> tuple[list[int], bool, object]:
        """(ids to encode for this turn, whether the cache is kept, the PromptImages of the image blocks in
        those ids or None). The turn's image markers are expanded with `images` (its PromptImages); a
        conversation encoded afresh expands every turn's."""
        from .image_prompt import PromptImages, expand_ids

        vision, tok = self.vision, self.gen.tokenizer
        new = self.messages + [message]
        if not self._stale and self.messages and self.messages[-1]["role"] == "assistant":
            parts = continuation_parts(tok, self._render, self.messages[:-1], self.messages[-1]["content"], new,
                                       self._tail)
            # (an image token the model wrote in the tail would take a soft-token row: encode afresh then)
            if parts is not None and not (images is not None and image_count(parts[0], vision)):
                head, turn = parts
                if vision is not None and (images is not None or image_count(turn, vision)):
                    turn = expand_ids(turn, images or PromptImages([], ""), vision)  # (a typed marker: refused)
                return head + turn, True, images
        ids = tok.encode(self._render(new, True))
        everything = joined_images(self._images + [images])
        if vision is not None and (everything is not None or image_count(ids, vision)):
            ids = expand_ids(ids, everything or PromptImages([], ""), vision)
        return ids, False, everything

    def _images_for(self, images):
        """The turn's images (paths, bytes, PIL images, uint8 arrays, or (image, label) pairs) decoded and
        patched; None for none."""
        from .image_prompt import prepare_images

        if images is None:
            return None
        if isinstance(images, (str, bytes)) or not isinstance(images, (list, tuple)):
            raise DgportError("images must be a list of images (paths, bytes, PIL images or uint8 arrays)")
        if not images:
            return None
        if self.vision is None:
            from .backend import no_vision_error

            raise no_vision_error(getattr(getattr(self.gen.backend, "export", None), "path", "this model"))
        return prepare_images(list(images), self.vision.image.with_soft_tokens(self.max_soft_tokens))

    def say(self, user_text: str, on_canvas=None, images=None) -> GenerationResult:
        """The model's answer to the next user turn: `user_text`, after `images` (a list of paths, bytes,
        PIL images or uint8 arrays; they go before the text, as generate's do)."""
        if not isinstance(user_text, str):
            raise DgportError(f"a chat message must be text (got {type(user_text).__name__})")
        if not user_text.strip():
            raise DgportError("the message is empty; give some text")
        utf8_text(user_text, "the message")
        pimg = self._images_for(images)
        message = {"role": "user", "content": user_text} if pimg is None else {
            "role": "user", "content": [{"type": "image"}] * len(pimg.patches) + [{"type": "text", "text": user_text}]}
        ids, keep, turn_images = self._turn(message, pimg)
        cached = self.gen.backend.cache_len if keep else 0
        try:
            check_context(self.gen.config, cached, len(ids), self.settings.max_new_tokens)
        except ContextOverflow as e:
            if not any(m["role"] == "assistant" for m in self.messages):
                raise  # the first message alone is too long: the prompt's own message says what to do
            limit = self.gen.config.max_position_embeddings
            raise ContextFull(
                f"the conversation is full: {cached} positions so far, this turn would need "
                f"{len(ids)} more plus {self.settings.max_new_tokens} for the answer, and the model's context is "
                f"{limit} (max_position_embeddings); start a new conversation") from e
        started = time.perf_counter()
        try:
            if self.vision is None:
                result = self.gen.generate(ids, max_new_tokens=self.max_new_tokens, rng=self.rng, keep_cache=keep,
                                           on_canvas=on_canvas, encode_chunk=self.encode_chunk, **self.overrides)
            else:  # the ids hold expanded image blocks (and perhaps image tokens the model wrote)
                if turn_images is not None and turn_images is not pimg:
                    for part in self._images + [pimg]:
                        if part is not None:
                            part.encode(self.gen.backend)  # computed once per turn, kept for later turns
                    turn_images = joined_images(self._images + [pimg])
                result = run_ids(self.gen, ids, images=turn_images, keep_cache=keep, rng=self.rng,
                                 max_new_tokens=self.max_new_tokens, on_canvas=on_canvas,
                                 encode_chunk=self.encode_chunk, **self.overrides)
        except BaseException:  # e.g. Ctrl-C mid-answer: the next turn encodes the conversation afresh
            self._stale, self._tail = True, []
            raise
        self._stale = False
        elapsed = time.perf_counter() - started
        settings = self.settings
        C = self.gen.config.canvas_length
        tokens = result.token_ids[0]
        last = tokens[C * (len(result.steps_per_canvas) - 1):]  # the canvas the loop did not encode
        stop = next((i for i, t in enumerate(last) if t in settings.eos_token_ids), len(last))
        self._tail = [t for t in last[:stop] if t != settings.pad_token_id]
        answer = self.gen.tokenizer.decode([t for t in tokens if t != settings.pad_token_id])
        self.messages += [message, {"role": "assistant", "content": answer}]
        if pimg is not None:
            self._images.append(pimg)
        self.encoded_last_turn = len(ids)
        n = sum(1 for t in tokens if t != settings.pad_token_id)
        self.last_stats = (f"{n} tokens in {elapsed:.2f} s, encoded {len(ids)} new prompt tokens"
                           f"{' (cache kept)' if keep else ''}, cache {self.gen.backend.cache_len} positions")
        return result
