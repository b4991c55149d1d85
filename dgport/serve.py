"""`dgport serve`: an OpenAI-compatible HTTP API over one model (FastAPI on uvicorn).

One worker thread owns the Generator and runs requests one after another, in arrival order, from a
bounded queue (full: 503 with Retry-After). Handlers hand a Job to the worker and read its events
from an asyncio queue the worker fills through `loop.call_soon_threadsafe`. A client that goes away
sets its job's cancel event; the worker checks it between two denoising steps.

Cache reuse. The worker remembers the token ids whose K/V the backend's cache holds (the last
prompt and every canvas but the last). A request whose prompt ids start with exactly those ids
encodes only the rest. A chat request that repeats the last conversation, its answer exactly as
returned, and adds turns is continued as `dgport chat` continues one (templates rewrite history, e.g.
drop the thought channel, so the re-rendered conversation rarely starts with the cached ids): the
model's own answer tokens, the template's turn close, then the new turns. Either way the request
runs on the token stream it reports (`prompt_token_ids`), as a fresh run of that stream would.

Sampling fields. DiffusionGemma samples each step at a temperature the schedule t_max -> t_min sets
(over max_denoising_steps) and keeps the tokens an entropy budget accepts; there is no per-token
temperature or nucleus to map OpenAI's `temperature` and `top_p` onto. They are accepted only at
their neutral values (null or 1), anything else is refused with a 400 that names t_min / t_max;
the sampler's own settings are body fields (`max_denoising_steps`, `t_min`, `t_max`,
`entropy_bound`, `stability_threshold`, `confidence_threshold`). Fields that would change the answer
and that dgport cannot honour (tools, logprobs, penalties, response_format, n > 1...) get a 400.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import click

from . import __version__
from .chat import continuation_ids
from .display import split_channel
from .errors import DgportError

log = logging.getLogger("dgport.serve")

SAMPLER_FIELDS = ("max_denoising_steps", "t_min", "t_max", "entropy_bound", "stability_threshold",
                  "confidence_threshold")
MAX_BODY_BYTES = 4 << 20
MAX_STOP = 16
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
CHANNEL_NAME = "thought\n"


# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 503: "server_overloaded"}


# ---------------------------------------------------------------------------------------------
# Request bodies (pydantic; unknown fields are refused, never ignored)


def _models():
    """Pydantic models, built on first use so `import dgport.serve` needs no pydantic."""
    from pydantic import BaseModel, ConfigDict, Field

    class Strict(BaseModel):
        # no coercion ("5" or true for a number, 5.0 for a count) and no NaN or infinities
        model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    class TextPart(Strict):
        type: Literal["text"]
        text: str

    class Message(Strict):
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[TextPart] | None = None
        name: str | None = None  # does not reach the template
        reasoning_content: str | None = None  # earlier turns' reasoning: the template drops it anyway
        reasoning: str | None = None
        refusal: str | None = None
        tool_calls: list[Any] | None = None

    class StreamOptions(Strict):
        include_usage: bool = False

    class Sampler(Strict):
        model: str
        max_tokens: int | None = Field(default=None, ge=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)
        seed: int | None = Field(default=None, ge=0, le=(1 << 63) - 1)
        stream: bool = False
        stream_options: StreamOptions | None = None
        stop: str | list[str] | None = None
        n: int = 1
        temperature: float | None = None
        top_p: float | None = None
        frequency_penalty: float | None = None
        presence_penalty: float | None = None
        logprobs: Any = None
        user: str | None = None
        metadata: dict[str, str] | None = None
        store: bool | None = None
        return_token_ids: bool = False  # vLLM's extension: token ids in the response
        stream_drafts: bool = False  # dgport's extension: a `dgport_draft` chunk per denoising step
        max_denoising_steps: int | None = None
        t_min: float | None = None
        t_max: float | None = None
        entropy_bound: float | None = None
        stability_threshold: int | None = None
        confidence_threshold: float | None = None

    class ChatRequest(Sampler):
        messages: list[Message] = Field(min_length=1)
        top_logprobs: int | None = None
        chat_template_kwargs: dict[str, Any] | None = None
        reasoning_effort: str | None = None

    class CompletionRequest(Sampler):
        prompt: str | list[str] | list[int]
        echo: bool = False
        suffix: str | None = None
        best_of: int | None = None

    return ChatRequest, CompletionRequest


def _validation_error(e) -> ApiError:
    """The first pydantic error as one line, with the field as OpenAI's `param`."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        return ApiError(400, f"`{loc}` is not supported by dgport serve; remove it", param=loc,
                        code="unsupported_parameter")
    if err.get("type") in ("json_invalid", "json_type"):
        return ApiError(400, f"the request body is not valid JSON ({err.get('msg')})")
    where = f"`{loc}`: " if loc else ""
    return ApiError(400, f"{where}{err.get('msg')}", param=loc or None)


@dataclass
class Plan:
    """What a request asks of the worker, checked before it is queued."""
    ids: list[int]
    max_new_tokens: int
    seed: int | None
    overrides: dict
    stop: list[str]
    chat: bool
    stream: bool
    include_usage: bool
    drafts: bool
    return_token_ids: bool
    messages: list[dict] | None = None  # chat requests: the conversation, as rendered
    think: bool = False


def _check_common(req, gen) -> tuple[int, dict, list[str]]:
    if req.n != 1:
        raise ApiError(400, f"n={req.n}: dgport serve returns one choice per request; send n=1 (or omit it)",
                       param="n")
    if req.temperature is not None and req.temperature != 1:
        raise ApiError(400, f"temperature={req.temperature}: DiffusionGemma samples on its own temperature schedule; "
                       "set t_max (first step) and t_min (last step) instead, or omit temperature", param="temperature")
    if req.top_p is not None and req.top_p != 1:
        raise ApiError(400, f"top_p={req.top_p}: this sampler draws from the full distribution (no nucleus); "
                       "omit top_p or send 1", param="top_p")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0):
            raise ApiError(400, f"{name} is not supported by this sampler; omit it or send 0", param=name)
    if req.logprobs not in (None, False, 0):
        raise ApiError(400, "logprobs are not available (the graphs return no logits); omit logprobs",
                       param="logprobs")
    if (req.max_tokens is not None and req.max_completion_tokens is not None
            and req.max_tokens != req.max_completion_tokens):
        raise ApiError(400, f"max_tokens={req.max_tokens} and max_completion_tokens={req.max_completion_tokens} "
                       "disagree; send one of them", param="max_tokens")
    C = gen.config.canvas_length
    max_new = req.max_completion_tokens or req.max_tokens or 4 * C  # what `dgport run` uses
    overrides = {k: getattr(req, k) for k in SAMPLER_FIELDS}
    try:
        gen.settings(max_new, **overrides).validate()
    except DgportError as e:
        raise ApiError(400, str(e)) from e
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise ApiError(400, f"stop: give at most {MAX_STOP} non-empty strings", param="stop")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options needs stream=true", param="stream_options")
    if req.stream_drafts and not req.stream:
        raise ApiError(400, "stream_drafts needs stream=true", param="stream_drafts")
    return max_new, overrides, stop


def _message_text(m) -> str:
    if m.tool_calls:
        raise ApiError(400, "tool calls are not supported by dgport serve", param="messages")
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    return "\n".join(part.text for part in m.content)


def _think(req) -> bool:
    kwargs = dict(req.chat_template_kwargs or {})
    unknown = sorted(set(kwargs) - {"enable_thinking"})
    if unknown:
        raise ApiError(400, f"chat_template_kwargs: {', '.join(unknown)} not supported (only enable_thinking)",
                       param="chat_template_kwargs")
    effort = req.reasoning_effort
    if effort is not None and effort not in REASONING_EFFORTS:
        raise ApiError(400, f"reasoning_effort={effort!r}: choose one of {', '.join(REASONING_EFFORTS)}",
                       param="reasoning_effort")
    by_effort = None if effort is None else effort != "none"
    flag = kwargs.get("enable_thinking")
    if flag is not None and not isinstance(flag, bool):
        raise ApiError(400, "chat_template_kwargs.enable_thinking must be true or false",
                       param="chat_template_kwargs")
    if flag is not None and by_effort is not None and flag != by_effort:
        raise ApiError(400, f"chat_template_kwargs.enable_thinking={str(flag).lower()} contradicts "
                       f"reasoning_effort={effort!r}; send one of them", param="reasoning_effort")
    return bool(flag if flag is not None else by_effort)


def plan_chat(req, gen) -> Plan:
    max_new, overrides, stop = _check_common(req, gen)
    if req.top_logprobs not in (None, 0):
        raise ApiError(400, "top_logprobs is not available; omit it", param="top_logprobs")
    think = _think(req)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)}
                for m in req.messages]
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's (dgport does not continue an assistant turn)",
                       param="messages")
    try:
        ids = gen.tokenizer.encode(gen.tokenizer.render(messages, enable_thinking=think))
    except DgportError as e:
        raise ApiError(400, str(e), param="messages") from e
    plan = _plan(gen, ids, max_new, req, overrides, stop, chat=True)
    plan.messages, plan.think = messages, think
    return plan


def plan_completion(req, gen) -> Plan:
    max_new, overrides, stop = _check_common(req, gen)
    if req.echo or req.suffix is not None or req.best_of not in (None, 1):
        name = "echo" if req.echo else "suffix" if req.suffix is not None else "best_of"
        raise ApiError(400, f"{name} is not supported by dgport serve; omit it", param=name)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, "prompt: send one prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ApiError(400, "the prompt is empty; give some text", param="prompt")
        ids = gen.tokenizer.encode_raw(prompt)
    else:
        ids = [int(t) for t in prompt]
        V = gen.config.vocab_size
        if not ids or min(ids) < 0 or max(ids) >= V:
            raise ApiError(400, f"prompt token ids must be a non-empty list in [0, {V})", param="prompt")
    return _plan(gen, ids, max_new, req, overrides, stop, chat=False)


def _plan(gen, ids, max_new, req, overrides, stop, chat) -> Plan:
    from .loop import check_context

    try:
        check_context(gen.config, 0, len(ids), max_new)
    except DgportError as e:
        raise ApiError(400, str(e), param="messages" if chat else "prompt", code="context_length_exceeded") from e
    opts = req.stream_options
    return Plan(ids=ids, max_new_tokens=max_new, seed=req.seed, overrides=overrides, stop=stop, chat=chat,
                stream=req.stream, include_usage=bool(opts and opts.include_usage), drafts=req.stream_drafts,
                return_token_ids=req.return_token_ids)


# ---------------------------------------------------------------------------------------------
# The worker


class Cancelled(Exception):
    """Raised from on_step when the job's client has gone: ends the generation between two steps."""


@dataclass
class Job:
    plan: Plan
    post: Callable[[tuple], None]  # thread-safe: hands an event to the request's asyncio queue
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)


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
        from .timing import TimedBackend

        if not isinstance(gen.backend, TimedBackend):
            gen.backend = TimedBackend(gen.backend)
        return gen

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            per = sum(self.durations) / len(self.durations) if self.durations else 1.0
            wait = max(1, math.ceil(per * (self.queue.qsize() + 1)))
            raise ApiError(503, f"the server is busy ({self.queue.maxsize} requests waiting); retry in {wait} s",
                           type_="server_overloaded", headers={"Retry-After": str(wait)}) from None

    def close(self) -> None:
        while True:  # drop what waits, then wake the worker to end
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.post(("error", 503, "the server is shutting down"))
        current = self.current
        if current is not None:
            current.cancel.set()
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
            started = time.perf_counter()
            self.busy, self.current = True, job
            try:
                job.post(("done", self._generate(job, started)))
            except Cancelled:
                self.cancelled += 1
                job.post(("cancelled",))
            except DgportError as e:
                job.post(("error", 400, str(e)))
            except Exception as e:  # a bug or a runtime failure: the request gets a 500, the server goes on
                log.exception("generation failed")
                job.post(("error", 500, f"generation failed: {e.__class__.__name__}: {e}"))
            finally:
                self.busy, self.current = False, None
                self.served += 1
                self.durations.append(time.perf_counter() - started)

    def _prompt(self, plan: Plan) -> tuple[list[int], int]:
        """(the token stream this request generates after, how many of its first ids are cached)."""
        st, backend = self.state, self.gen.backend
        n = len(st.cached)
        if n == 0 or backend.cache_len != n:
            return plan.ids, 0
        if n < len(plan.ids) and plan.ids[:n] == st.cached:
            return plan.ids, n  # the same tokens as a fresh run, the prefix already encoded
        stream = self._continuation(plan)
        return (stream, n) if stream is not None else (plan.ids, 0)

    def _continuation(self, plan: Plan) -> list[int] | None:
        """The next turn of the conversation in the cache, as `dgport chat` continues it: the model's own
        answer tokens (not the answer re-rendered by the template), the turn's close, then the new turns.
        Only when the request repeats that conversation and the answer exactly as they were sent."""
        st, tok = self.state, self.gen.tokenizer
        if not plan.chat or st.messages is None or plan.think != st.think:
            return None
        prev = st.messages + [{"role": "assistant", "content": st.answer}]
        if len(plan.messages) <= len(prev) or plan.messages[:len(prev)] != prev:
            return None

        def render(messages, generation_prompt):
            return tok.render(messages, add_generation_prompt=generation_prompt, enable_thinking=plan.think)

        rest = continuation_ids(tok, render, st.messages, st.answer, plan.messages, st.tail)
        if rest is None:
            return None  # the template rewrites the history: start again
        stream = st.cached + rest
        from .loop import ContextOverflow, check_context

        try:
            check_context(self.gen.config, 0, len(stream), plan.max_new_tokens)
        except ContextOverflow:
            return None  # the fresh rendering fits (it was checked); this longer stream does not
        return stream

    def _generate(self, job: Job, started: float) -> dict:
        from .timing import Timings

        plan, gen = job.plan, self.gen
        backend = gen.backend
        ids, n = self._prompt(plan)
        self.state = CacheState()  # unknown until this generation ends
        backend.timings = Timings()
        C = gen.config.canvas_length

        def on_step(event):
            if job.cancel.is_set():
                raise Cancelled()
            if plan.drafts:
                job.post(("step", event.canvas_index, event.step, float(event.temperature),
                          event.argmax.tolist(), int(event.accepted.sum())))

        def on_canvas(event):
            job.post(("canvas", event.canvas_index, event.tokens.tolist(), event.steps, event.finished))

        result = gen.generate(ids[n:], max_new_tokens=plan.max_new_tokens, seed=plan.seed, keep_cache=n > 0,
                              on_step=on_step, on_canvas=on_canvas, **plan.overrides)
        tokens = result.token_ids[0]
        k = len(result.steps_per_canvas)
        last = tokens[C * (k - 1):]  # the loop encoded every canvas but this one
        stops = set(gen.settings(plan.max_new_tokens, **plan.overrides).eos_token_ids)
        eos = next((i for i, t in enumerate(last) if t in stops), len(last))
        answer = TextStream(gen.tokenizer, gen.defaults.pad_token_id, True, []) if plan.chat else None
        if answer is not None:
            answer.add(tokens)
        self.state = CacheState(cached=ids + tokens[:C * (k - 1)],
                                tail=[t for t in last[:eos] if t != gen.defaults.pad_token_id],
                                messages=plan.messages, think=plan.think,
                                answer=answer.text()[0] if answer is not None else None)
        timings = backend.timings.as_dict()
        return {"token_ids": tokens, "prompt_ids": ids, "steps_per_canvas": result.steps_per_canvas,
                "tokens_per_forward": result.tokens_per_forward, "finished": result.finished,
                "cached_tokens": n, "encoded_tokens": len(ids) - n,
                "ms_per_step": timings["ms_per_step"], "ms_per_encode": timings["ms_per_encode"],
                "queue_ms": 1000 * (started - job.queued_at), "generate_ms": 1000 * (time.perf_counter() - started)}


@dataclass
class CacheState:
    """What the backend's cache holds after the last request, and what continues it."""
    cached: list[int] = field(default_factory=list)  # token ids whose K/V are in the cache
    tail: list[int] = field(default_factory=list)  # the last canvas up to EOS: generated, not encoded
    messages: list[dict] | None = None  # the chat request's conversation (None: not a chat)
    think: bool = False
    answer: str | None = None  # the content returned for it


# ---------------------------------------------------------------------------------------------
# Text: content vs thought channel, stop strings, deltas that never split a character


class TextStream:
    def __init__(self, tokenizer, pad_id: int, chat: bool, stop: list[str]):
        self.tok = tokenizer
        self.pad_id = pad_id
        self.chat = chat
        self.stop = stop
        self.open_id = tokenizer.tok.token_to_id("<|channel>")
        self.close_id = tokenizer.tok.token_to_id("<channel|>")
        self.ids: list[int] = []
        self.sent_content = 0
        self.sent_reasoning = 0
        self.stopped = False

    def add(self, ids) -> None:
        self.ids.extend(int(t) for t in ids if int(t) != self.pad_id)

    def _split(self, final: bool = True) -> tuple[str, str]:
        if not self.chat:
            return self.tok.decode(self.ids), ""
        content, thought = split_channel(self.ids, self.open_id, self.close_id)
        reasoning = self.tok.decode(thought)
        if reasoning.startswith(CHANNEL_NAME):  # the channel's name, as Gemma 4 writes it: not reasoning
            reasoning = reasoning[len(CHANNEL_NAME):]
        elif not final and CHANNEL_NAME.startswith(reasoning):
            reasoning = ""  # may still become the name: hold it back
        return self.tok.decode(content), reasoning

    def deltas(self, final: bool = False) -> tuple[str, str]:
        """(content, reasoning) added since the last call. Text that may be the start of a stop string
        is held back until it is known; at a stop string the content ends and `stopped` is set."""
        content, reasoning = self._split(final)
        if not final:
            content, reasoning = content.rstrip("\ufffd"), reasoning.rstrip("\ufffd")
        end = len(content)
        for s in self.stop:
            at = content.find(s)
            if at != -1 and at < end:
                end = at
                self.stopped = True
        if not self.stopped and not final:
            for s in self.stop:
                for k in range(min(len(s) - 1, len(content)), 0, -1):
                    if content.endswith(s[:k]):
                        end = min(end, len(content) - k)
                        break
        c = content[self.sent_content:end] if end > self.sent_content else ""
        r = reasoning[self.sent_reasoning:]
        self.sent_content = max(self.sent_content, end)
        self.sent_reasoning = len(reasoning)
        return c, r

    def text(self) -> tuple[str, str]:
        return self._split()


# ---------------------------------------------------------------------------------------------
# The app


class ApiKeyMiddleware:
    """Plain ASGI (no BaseHTTPMiddleware, which would buffer streams and hide disconnects): /v1 needs
    `Authorization: Bearer KEY`, compared in constant time; /health stays open for probes."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                from starlette.responses import JSONResponse

                e = ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                             type_="authentication_error", code="invalid_api_key")
                await JSONResponse(e.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class ServeConfig:
    model_id: str
    backend: str
    fingerprint: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES


def export_fingerprint(path: Path, backend: str) -> str:
    """system_fingerprint: the manifest's sha256 (it records every artifact's sha256), backend, version."""
    from .manifest import MANIFEST

    p = Path(path)
    source = p / MANIFEST if (p / MANIFEST).exists() else p / "config.json"
    digest = hashlib.sha256(source.read_bytes()).hexdigest() if source.exists() else "unknown"
    return f"dgport-{__version__}-{backend}-{digest[:12]}"


def create_app(model, cfg: ServeConfig, max_queue: int = 16):
    """The ASGI app. `model`: a Generator, or a function returning one (run on the worker thread)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    class JobStream(StreamingResponse):
        """Cancels its job however the response ends, even when the client leaves before the body
        generator first runs (its own `finally` would then never run)."""

        def __init__(self, job: Job, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.job = job

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancel.set()

    ChatRequest, CompletionRequest = _models()
    engine = Engine(model, max_queue)
    gen = engine.gen  # the handlers read only its tokenizer, config and defaults; the worker runs it
    created = int(time.time())
    pad_id = gen.defaults.pad_token_id

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="dgport", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.engine = engine

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(message, _STATUS_TYPES.get(e.status_code, "invalid_request_error"),
                                       code=str(e.status_code)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    if cfg.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, key=cfg.api_key)

    async def read_body(request: Request, model):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {cfg.max_body_bytes}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise ApiError(413, f"the request body exceeds the limit of {cfg.max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            req = model.model_validate_json(b"".join(chunks))
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model != cfg.model_id:
            raise ApiError(404, f"the model `{req.model}` does not exist; this server serves `{cfg.model_id}`",
                           type_="not_found_error", param="model", code="model_not_found")
        return req

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_id, "busy": engine.busy, "waiting": engine.queue.qsize(),
                "served": engine.served, "cancelled": engine.cancelled}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != cfg.model_id:
            raise ApiError(404, f"the model `{model_id}` does not exist", type_="not_found_error",
                           code="model_not_found")
        return model_card()

    def model_card():
        return {"id": cfg.model_id, "object": "model", "created": created, "owned_by": "dgport",
                "max_model_len": gen.config.max_position_embeddings}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_body(request, ChatRequest)
        plan = plan_chat(req, gen)
        return await respond(request, plan, f"chatcmpl-{uuid.uuid4().hex}")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest)
        plan = plan_completion(req, gen)
        return await respond(request, plan, f"cmpl-{uuid.uuid4().hex}")

    def start(plan: Plan) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(item):
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop has closed (shutdown)
                pass

        job = Job(plan, post)
        engine.submit(job)
        return job, events

    def usage(plan: Plan, stream: TextStream, done: dict | None, generated: int) -> dict:
        prompt = len(done["prompt_ids"]) if done else len(plan.ids)
        out = {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
               "prompt_tokens_details": {"cached_tokens": done["cached_tokens"] if done else 0}}
        return out

    def figures(done: dict | None) -> dict | None:
        if done is None:
            return None
        return {k: done[k] for k in ("steps_per_canvas", "tokens_per_forward", "ms_per_step", "ms_per_encode",
                                     "queue_ms", "generate_ms", "cached_tokens", "encoded_tokens")}

    async def respond(request: Request, plan: Plan, rid: str):
        job, events = start(plan)
        if plan.stream:
            return JobStream(job, sse(plan, job, events, rid), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            return await collect(plan, job, events, rid)
        finally:
            watcher.cancel()
            job.cancel.set()  # no-op when done; stops the worker if this handler was cancelled

    async def watch_disconnect(request: Request, job: Job):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel.set()
                return

    def finish_reason(stream: TextStream, done: dict | None) -> str:
        return "stop" if stream.stopped or (done and done["finished"]) else "length"

    async def run(plan: Plan, job: Job, events: asyncio.Queue, stream: TextStream):
        """Yields ("delta", content, reasoning), ("step", ...), then ("done", result-or-None, generated ids)."""
        generated: list[int] = []
        while True:
            event = await events.get()
            kind = event[0]
            if kind == "canvas":
                generated.extend(t for t in event[2] if t != pad_id)
                stream.add(event[2])
                c, r = stream.deltas()
                if c or r:
                    yield ("delta", c, r)
                if stream.stopped:
                    job.cancel.set()  # the rest would be cut off: stop computing it
                    yield ("done", None, generated)
                    return
            elif kind == "step":
                yield event
            elif kind == "done":
                c, r = stream.deltas(final=True)
                if c or r:
                    yield ("delta", c, r)
                yield ("done", event[1], generated)
                return
            elif kind == "error":
                raise ApiError(event[1], event[2], type_="invalid_request_error" if event[1] == 400 else "server_error")
            elif kind == "cancelled":
                raise ApiError(499, "cancelled")

    async def collect(plan: Plan, job: Job, events, rid: str):
        stream = TextStream(gen.tokenizer, pad_id, plan.chat, plan.stop)
        done, generated = None, []
        async for item in run(plan, job, events, stream):
            if item[0] == "done":
                done, generated = item[1], item[2]
        content, reasoning = stream.text()
        if stream.stopped:
            content = content[:stream.sent_content]
        choice: dict = {"index": 0, "finish_reason": finish_reason(stream, done), "logprobs": None}
        if plan.chat:
            choice["message"] = {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
        else:
            choice["text"] = content
        body = {"id": rid, "object": "chat.completion" if plan.chat else "text_completion", "created": int(time.time()),
                "model": cfg.model_id, "system_fingerprint": cfg.fingerprint, "choices": [choice],
                "usage": usage(plan, stream, done, len(generated)), "dgport": figures(done)}
        if plan.return_token_ids:
            choice["token_ids"] = generated
            body["prompt_token_ids"] = done["prompt_ids"] if done else plan.ids
        return JSONResponse(body)

    async def sse(plan: Plan, job: Job, events, rid: str):
        stream = TextStream(gen.tokenizer, pad_id, plan.chat, plan.stop)
        obj = "chat.completion.chunk" if plan.chat else "text_completion"
        now = int(time.time())

        def chunk(choices: list, **extra) -> str:
            body = {"id": rid, "object": obj, "created": now, "model": cfg.model_id,
                    "system_fingerprint": cfg.fingerprint, "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        def delta_choice(content: str, reasoning: str = "", finish=None, **extra) -> dict:
            if plan.chat:
                delta = {}
                if content:
                    delta["content"] = content
                if reasoning:
                    delta["reasoning_content"] = reasoning
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}
            return {"index": 0, "text": content, "logprobs": None, "finish_reason": finish, **extra}

        try:
            if plan.chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            done, generated = None, []
            async for item in run(plan, job, events, stream):
                if item[0] == "delta":
                    extra = {"token_ids": []} if plan.return_token_ids else {}
                    yield chunk([delta_choice(item[1], item[2], **extra)])
                elif item[0] == "step":
                    _, k, step, temp, draft, accepted = item
                    yield chunk([], dgport_draft={"canvas": k, "step": step, "temperature": temp, "accepted": accepted,
                                                  "text": gen.tokenizer.decode(draft, skip_special_tokens=False),
                                                  "token_ids": draft})
                else:
                    done, generated = item[1], item[2]
            extra = {"token_ids": generated} if plan.return_token_ids else {}
            yield chunk([delta_choice("", finish=finish_reason(stream, done), **extra)], dgport=figures(done))
            if plan.include_usage:
                yield chunk([], usage=usage(plan, stream, done, len(generated)), dgport=figures(done))
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            job.cancel.set()  # the client went away (or the stream ended): stop between two steps
        yield "data: [DONE]\n\n"

    return app


# ---------------------------------------------------------------------------------------------
# The command


@click.command("serve")
@click.argument("model", required=False)
@click.option("--backend", type=click.Choice(("cpu", "cuda", "mlx", "torch")), default="cpu", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 exposes the server to the network.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="DGPORT_API_KEY",
              help="Require `Authorization: Bearer KEY` on /v1 (also from DGPORT_API_KEY).")
@click.option("--max-queue", type=click.IntRange(1, 100_000), default=16, show_default=True,
              help="Requests that may wait behind the running one; more get 503 with Retry-After.")
@click.option("--served-model-name", default=None, help="The model id clients send (default: MODEL).")
def serve(model, backend, host, port, api_key, max_queue, served_model_name):
    """An OpenAI-compatible API (chat, completions, models) for MODEL: an export folder, a Hugging Face
    checkpoint folder or a Hub id (default: the shipped Sudoku model)."""
    try:
        import uvicorn
    except ImportError as e:
        raise DgportError("dgport serve needs fastapi and uvicorn: pip install 'dgport[serve]'") from e
    from . import load

    if api_key is not None and not api_key.strip():
        raise DgportError("--api-key is empty; give a key or leave the option out")
    _check_listen(host, port)  # before loading a model that could take minutes
    if model is None:
        from .default_model import ensure_default_export

        path, model_id = ensure_default_export(backend), "sudoku"
    else:
        from .resolve import resolve_model

        path, model_id = resolve_model(model, backend), model
    cfg = ServeConfig(model_id=served_model_name or model_id, backend=backend,
                      fingerprint=export_fingerprint(path, backend), api_key=api_key)
    app = create_app(lambda: load(path, backend=backend), cfg, max_queue=max_queue)
    local = host in ("127.0.0.1", "localhost", "::1")
    where = f"[{host}]" if ":" in host else host
    key = "API key required" if api_key else "no API key" + ("" if local else ": anyone who can reach it can use it")
    click.echo(f"dgport serve: {cfg.model_id} on {backend}, http://{where}:{port}/v1 "
               f"({'this machine only' if local else 'reachable from other machines'}); {key}; "
               f"up to {max_queue} waiting requests", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)



def _check_listen(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DgportError(f"--host {host}: not an address of this machine ({e.strerror})") from e
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            raise DgportError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port "
                              "or stop what uses it") from e


def main(argv=None) -> int:
    """`python -m dgport.serve MODEL ...`: the command with the CLI's one-line errors."""
    try:
        serve.main(args=argv, prog_name="dgport serve", standalone_mode=False)
    except click.exceptions.UsageError as e:
        click.echo(f"dgport: error: {e.format_message()}", err=True)
        return 2
    except DgportError as e:
        click.echo(f"dgport: error: {e}", err=True)
        return 1
    except (KeyboardInterrupt, click.exceptions.Abort):
        return 130
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
