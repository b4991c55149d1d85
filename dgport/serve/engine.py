"""The worker: one thread owns the Generator and runs the jobs in arrival order from a bounded queue."""

import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..chat import continuation_parts, run_ids, timed_backend
from ..errors import DgportError
from .plan import Plan
from .protocol import ApiError
from .text import TextStream

log = logging.getLogger("dgport.serve")
SHUTTING_DOWN = "the server is shutting down; retry on another server or once it is back"


class Cancelled(Exception):
    """Raised from on_step when the job's client has gone or the server stops: ends the generation
    between two steps."""


def shutting_down(job: "Job") -> None:
    job.post(("error", 503, SHUTTING_DOWN, "server_shutting_down"))


def failed(job: "Job", e: Exception) -> None:
    """A DgportError is the request's fault (400); anything else is a bug or a runtime failure: the
    request gets a 500 and the server goes on (the details in its log; the traceback with --debug)."""
    if isinstance(e, DgportError):
        job.post(("error", 400, str(e), None))
        return
    log.error("generation failed (%s: %s)", e.__class__.__name__, e, exc_info=(
        (type(e), e, e.__traceback__) if log.isEnabledFor(logging.DEBUG) else None))
    job.post(("error", 500, f"generation failed ({e.__class__.__name__}); the server's log has the details", None))


@dataclass
class Job:
    plan: Plan
    post: Callable[[tuple], None]  # thread-safe: hands an event to the request's asyncio queue
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    # set by the batch engine when it admits the job: what its row runs on, and its steps' times
    started: float | None = None
    ids: list[int] | None = None
    n: int = 0  # of `ids`, how many were already in the reused cache
    settings: object = None
    seed: int | None = None
    step_s: list[float] = field(default_factory=list)


class Engine:
    """Owns the Generator; one thread runs the jobs in arrival order. `model` is a Generator or a
    function that makes one: it is then called on the worker thread, because some runtimes tie
    device state to the thread that made it (MLX streams are per thread)."""

    def __init__(self, model, max_queue: int):
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.state = CacheState()
        self.durations: deque[float] = deque(maxlen=32)
        self.busy = False
        self.served = 0
        self.cancelled = 0
        self.closing = False  # shutdown() was called: nothing more runs
        self.current: Job | None = None
        self.gen = None
        loaded = threading.Event()
        failure: list[BaseException] = []

        def work():
            try:
                self.gen = self._own(model() if callable(model) else model)
            except BaseException as e:  # handed to the thread that waits for the load
                failure.append(e)
                return
            finally:
                loaded.set()
            self._run()

        self.thread = threading.Thread(target=work, name="dgport-serve-worker", daemon=True)
        self.thread.start()
        loaded.wait()
        if failure:
            raise failure[0]

    @staticmethod
    def _own(gen):
        gen.backend = timed_backend(gen.backend)
        return gen

    def submit(self, job: Job) -> None:
        if self.closing:
            raise ApiError(503, SHUTTING_DOWN, type_="server_error", code="server_shutting_down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            per = sum(self.durations) / len(self.durations) if self.durations else 1.0
            wait = max(1, math.ceil(per * (self.queue.qsize() + 1)))
            raise ApiError(503, f"the server is busy ({self.queue.maxsize} requests waiting); retry in {wait} s",
                           type_="server_overloaded", headers={"Retry-After": str(wait)}) from None

    def shutdown(self) -> None:
        """Stop serving (thread-safe, returns at once): the jobs that wait get a 503, the running one ends
        at its next step with a 503 (a stream: an error event), later submits get a 503."""
        self.closing = True
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                shutting_down(job)
        current = self.current
        if current is not None:
            current.cancel.set()

    def close(self) -> None:
        """shutdown(), then end the worker thread."""
        self.shutdown()
        self.queue.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job.cancel.is_set():  # its client left while it waited
                self.cancelled += 1
                continue
            if self.closing:  # taken before shutdown() emptied the queue
                shutting_down(job)
                continue
            started = time.perf_counter()
            self.busy, self.current = True, job
            try:
                job.post(("done", self._generate(job, started)))
            except Cancelled:
                if self.closing:
                    shutting_down(job)
                else:
                    self.cancelled += 1
                    job.post(("cancelled",))
            except Exception as e:  # noqa: BLE001
                failed(job, e)
            finally:
                self.served += 1
                self.durations.append(time.perf_counter() - started)
                self.busy, self.current = False, None  # last: /health showing busy=false means all is counted

    def _cached_len(self) -> int:
        """Positions in the cache that `state` describes."""
        return self.gen.backend.cache_len

    def _prompt(self, plan: Plan) -> tuple[list[int], int, int]:
        """(the token stream this request generates after, how many of its first ids are cached, how many
        of its images those hold). A cached prefix is reused only with the same images in it: image blocks
        hold the same token ids whatever the image (serve/image_plan.py)."""
        from .image_plan import image_count, images_after, reusable_images

        st = self.state
        n = len(st.cached)
        out = plan.ids, 0, 0
        if n == 0 or self._cached_len() != n:
            return out
        if n < len(plan.ids) and plan.ids[:n] == st.cached:
            m = reusable_images(plan, n, st.image_keys)
            if m is not None:
                out = plan.ids, n, m  # the same tokens as a fresh run, the prefix already encoded
        else:
            stream = self._continuation(plan)
            if stream is not None:
                out = stream, n, len(st.image_keys)
        ids, n, m = out
        rest = images_after(plan, m)
        vision = getattr(self.gen.backend, "vision", None)
        if n and image_count(ids[n:], vision) != sum(rest.counts if rest is not None else []):
            return plan.ids, 0, 0  # (an image token the model wrote, past the prefix: encode afresh)
        return out

    def _continuation(self, plan: Plan) -> list[int] | None:
        """The next turn of the conversation in the cache, as `dgport chat` continues it: the model's own
        answer tokens (not the answer re-rendered by the template), the turn's close, then the new turns.
        Only when the request repeats that conversation, its images and the answer exactly as they were sent."""
        from ..image_prompt import PromptImages, expand_ids
        from .image_plan import image_count, images_after

        st, tok = self.state, self.gen.tokenizer
        if not plan.chat or st.messages is None or plan.think != st.think or plan.tools is not None:
            return None  # (with tools the template renders them too: a fresh rendering, its prefix reused)
        prev = st.messages + [{"role": "assistant", "content": st.answer}]
        if len(plan.messages) <= len(prev) or plan.messages[:len(prev)] != prev:
            return None
        k = len(st.image_keys)
        if plan.image_keys[:k] != st.image_keys:
            return None  # the same text with other images

        def render(messages, generation_prompt):
            return tok.render(messages, add_generation_prompt=generation_prompt, enable_thinking=plan.think)

        parts = continuation_parts(tok, render, st.messages, st.answer, plan.messages, st.tail)
        if parts is None:
            return None  # the template rewrites the history: start again
        head, turn = parts
        vision = getattr(self.gen.backend, "vision", None)
        if vision is not None:
            new = images_after(plan, k)
            if image_count(head, vision):
                return None  # the answer's tail holds an image token the model wrote: encode afresh
            try:
                turn = expand_ids(turn, new or PromptImages([], ""), vision) if new or image_count(turn, vision) \
                    else turn
            except DgportError:
                return None
        stream = st.cached + head + turn
        from ..loop import ContextOverflow, check_context

        try:
            check_context(self.gen.config, 0, len(stream), plan.max_new_tokens)
        except ContextOverflow:
            return None  # the fresh rendering fits (it was checked); this longer stream does not
        return stream

    def _generate(self, job: Job, started: float) -> dict:
        from ..timing import Timings

        plan, gen = job.plan, self.gen
        backend = gen.backend
        ids, n, m = self._prompt(plan)
        job.post(("start", ids, n))  # the token stream it runs on: a stream's first chunk reports it
        self.state = CacheState()  # unknown until this generation ends
        backend.timings = Timings()

        def on_step(event):
            if job.cancel.is_set() or self.closing:
                raise Cancelled()
            if plan.drafts:
                job.post(("step", event.canvas_index, event.step, float(event.temperature),
                          event.argmax.tolist(), int(event.accepted.sum())))

        def on_canvas(event):
            job.post(("canvas", event.canvas_index, event.tokens.tolist(), event.steps, event.finished))

        if getattr(backend, "vision", None) is None:
            result = gen.generate(ids[n:], max_new_tokens=plan.max_new_tokens, seed=plan.seed, keep_cache=n > 0,
                                  on_step=on_step, on_canvas=on_canvas, template=plan.template, **plan.overrides)
        else:  # image blocks already expanded: the images after the cached prefix go with them
            from .image_plan import images_after

            result = run_ids(gen, ids[n:], images=images_after(plan, m), keep_cache=n > 0,
                             max_new_tokens=plan.max_new_tokens, seed=plan.seed, on_step=on_step, on_canvas=on_canvas,
                             template=plan.template, **plan.overrides)
        timings = backend.timings.as_dict()
        done, self.state = self._outcome(plan, ids, n, result)
        return {**done, "ms_per_step": timings["ms_per_step"], "ms_per_encode": timings["ms_per_encode"],
                "queue_ms": 1000 * (started - job.queued_at), "generate_ms": 1000 * (time.perf_counter() - started)}

    def _outcome(self, plan: Plan, ids: list[int], n: int, result) -> tuple[dict, "CacheState"]:
        """The `done` event's figures for a GenerationResult, and what the cache holds after it."""
        gen = self.gen
        C = gen.config.canvas_length
        tokens = result.token_ids[0]
        k = len(result.steps_per_canvas)
        done = {"token_ids": tokens, "prompt_ids": ids, "steps_per_canvas": result.steps_per_canvas,
                "tokens_per_forward": result.tokens_per_forward, "finished": result.finished,
                "cached_tokens": n, "encoded_tokens": len(ids) - n, "holes": result.holes}
        if plan.template is not None:
            # the cache holds the prompt and the committed canvases the loop encoded (exactly these ids), so
            # a prompt that starts with them may reuse it; the answer is never continued as a conversation
            # (its text is the template's, not what the model would have written there)
            return done, CacheState(cached=ids + tokens[:C * (k - 1)], image_keys=list(plan.image_keys))
        last = tokens[C * (k - 1):]  # the loop encoded every canvas but this one
        stops = set(gen.settings(plan.max_new_tokens, **plan.overrides).eos_token_ids)
        eos = next((i for i, t in enumerate(last) if t in stops), len(last))
        answer = TextStream(gen.tokenizer, gen.defaults.pad_token_id, True, []) if plan.chat else None
        if answer is not None:
            answer.add(tokens)
        return done, CacheState(cached=ids + tokens[:C * (k - 1)],
                                tail=[t for t in last[:eos] if t != gen.defaults.pad_token_id],
                                messages=plan.messages if plan.tools is None else None, think=plan.think,
                                answer=answer.text()[0] if answer is not None else None,
                                image_keys=list(plan.image_keys))


@dataclass
class CacheState:
    """What the backend's cache holds after the last request, and what continues it."""
    cached: list[int] = field(default_factory=list)  # token ids whose K/V are in the cache
    tail: list[int] = field(default_factory=list)  # the last canvas up to EOS: generated, not encoded
    messages: list[dict] | None = None  # the chat request's conversation (None: not a chat)
    think: bool = False
    answer: str | None = None  # the content returned for it
    image_keys: list[str] = field(default_factory=list)  # the images of the image blocks in `cached`, in order

