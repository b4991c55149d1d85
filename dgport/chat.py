"""Multi-turn chat over one backend whose KV cache persists between turns.

The cache holds the token stream the model has seen: the first prompt, the committed canvases and,
before each new turn, the rest of the last answer closed like the chat template closes a model
turn, then the new user turn. Only those new tokens are encoded; the prefix is never re-encoded."""
from __future__ import annotations

import secrets
import time

from .api import Generator, GenerationResult
from .errors import DgportError
from .loop import ENCODE_CHUNK, ContextOverflow, check_context, check_encode_chunk, make_rng
from .schema import utf8_text


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
    before = render(history + [{"role": "assistant", "content": answer}], False)
    after = render(messages, True)
    if not after.startswith(before):
        return None
    close = turn_close(render, history, messages)
    if close is None:
        return None
    return list(tail) + tokenizer.encode(close) + tokenizer.encode(after[len(before):])


class ChatSession:
    def __init__(self, gen: Generator, system: str | None = None, think: bool = False, seed: int | None = None,
                 max_new_tokens: int | None = None, encode_chunk: int = ENCODE_CHUNK, **sampler_overrides):
        self.gen = gen
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
        self.encoded_last_turn = 0
        self.last_stats = ""
        self.gen.backend.reset()

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.gen.tokenizer.render(messages, add_generation_prompt=generation_prompt,
                                         enable_thinking=self.think)

    def next_turn_ids(self, user_text: str) -> tuple[list[int], bool]:
        """(ids to encode for this turn, whether the cache is kept)."""
        new = self.messages + [{"role": "user", "content": user_text}]
        if self._stale or not self.messages or self.messages[-1]["role"] != "assistant":
            return self.gen.tokenizer.encode(self._render(new, True)), False
        ids = continuation_ids(self.gen.tokenizer, self._render, self.messages[:-1], self.messages[-1]["content"],
                               new, self._tail)
        return (ids, True) if ids is not None else (self.gen.tokenizer.encode(self._render(new, True)), False)

    def say(self, user_text: str, on_canvas=None) -> GenerationResult:
        if not isinstance(user_text, str):
            raise DgportError(f"a chat message must be text (got {type(user_text).__name__})")
        if not user_text.strip():
            raise DgportError("the message is empty; give some text")
        utf8_text(user_text, "the message")
        ids, keep = self.next_turn_ids(user_text)
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
            result = self.gen.generate(ids, max_new_tokens=self.max_new_tokens, rng=self.rng, keep_cache=keep,
                                       on_canvas=on_canvas, encode_chunk=self.encode_chunk, **self.overrides)
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
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        self.encoded_last_turn = len(ids)
        n = sum(1 for t in tokens if t != settings.pad_token_id)
        self.last_stats = (f"{n} tokens in {elapsed:.2f} s, encoded {len(ids)} new prompt tokens"
                           f"{' (cache kept)' if keep else ''}, cache {self.gen.backend.cache_len} positions")
        return result
