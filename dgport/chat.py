"""Multi-turn chat over one backend whose KV cache persists between turns.

The cache holds the token stream the model has seen: the first prompt, the committed canvases and,
before each new turn, the rest of the last answer closed like the chat template closes a model
turn, then the new user turn. Only those new tokens are encoded; the prefix is never re-encoded."""
from __future__ import annotations

import time

import numpy as np

from .api import Generator, GenerationResult
from .loop import ENCODE_CHUNK

SENTINEL = "\x00dgport-answer\x00"


class ChatSession:
    def __init__(self, gen: Generator, system: str | None = None, think: bool = False, seed: int | None = None,
                 max_new_tokens: int | None = None, encode_chunk: int = ENCODE_CHUNK, **sampler_overrides):
        self.gen = gen
        self.encode_chunk = encode_chunk
        self.think = think
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.max_new_tokens = max_new_tokens
        self.overrides = sampler_overrides
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self._tail: list[int] = []  # ids of the last answer that are not in the cache yet
        self.encoded_last_turn = 0
        self.last_stats = ""

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.gen.tokenizer.render(messages, add_generation_prompt=generation_prompt,
                                         enable_thinking=self.think)

    def _turn_close(self) -> str:
        """What the template writes after a model turn's content (e.g. '<turn|>\\n')."""
        text = self._render(self.messages + [{"role": "assistant", "content": SENTINEL}], False)
        return text.split(SENTINEL, 1)[1]

    def next_turn_ids(self, user_text: str) -> tuple[list[int], bool]:
        """(ids to encode for this turn, whether the cache is kept)."""
        new = self.messages + [{"role": "user", "content": user_text}]
        if not self.messages or not any(m["role"] == "assistant" for m in self.messages):
            return self.gen.tokenizer.encode(self._render(new, True)), False
        before = self._render(self.messages, False)
        after = self._render(new, True)
        if not after.startswith(before):  # the template rewrites history: start the stream again
            return self.gen.tokenizer.encode(after), False
        close = self.gen.tokenizer.encode(self._turn_close())
        return self._tail + close + self.gen.tokenizer.encode(after[len(before):]), True

    def say(self, user_text: str, on_canvas=None) -> GenerationResult:
        ids, keep = self.next_turn_ids(user_text)
        started = time.perf_counter()
        result = self.gen.generate(ids, max_new_tokens=self.max_new_tokens, rng=self.rng, keep_cache=keep,
                                   on_canvas=on_canvas, encode_chunk=self.encode_chunk, **self.overrides)
        elapsed = time.perf_counter() - started
        settings = self.gen.settings(self.max_new_tokens, **self.overrides)
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
