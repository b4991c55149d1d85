"""The ASGI app: routes, non-streaming answers and SSE streams.

The event loop's thread only moves bytes and events. What a request makes the CPU do runs on two
small thread pools: `planning` parses and validates the body, renders the chat template and
tokenizes (seconds for a 4 MB prompt), `text` decodes the answer and searches its stop strings (so
a big request never delays the deltas of streams already running). /health answers meanwhile.

`app.state.shutdown()` (on the loop's thread; `dgport serve` calls it on SIGTERM) answers what waits
with a 503 in OpenAI's shape and ends open streams with an error event and `data: [DONE]`."""

import asyncio
import functools
import hashlib
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import DgportError
from .access_log import TOKENS, AccessLog
from .engine import Engine, Job
from .guard import ApiKeyMiddleware, HostGuard, check_json_content_type
from .image_plan import IMAGE_BODY_BYTES
from .plan import Plan, plan_chat, plan_completion
from .tool_plan import reply as tool_reply
from .protocol import (_STATUS_TYPES, MAX_BODY_BYTES, MAX_JSON_VALUES, ApiError, _models, _validation_error,
                       error_body, json_values)
from .text import TextStream


@dataclass
class ServeConfig:
    model_id: str
    backend: str
    fingerprint: str
    api_key: str | None = None
    # None: 4 MiB (MAX_BODY_BYTES), or 32 MiB for a model that takes images (image_plan.IMAGE_BODY_BYTES)
    max_body_bytes: int | None = None
    # names the Host header may carry besides localhost and IP addresses; None: any Host (--allow-host '*')
    allowed_hosts: frozenset | None = frozenset()
    # this machine's folders (the model's, the home folder) that no response may show: replaced by their names
    private_paths: tuple = ()


class Redactor:
    """Replaces this machine's folders in a message by their names (the home folder by ~), longest first."""

    def __init__(self, paths):
        home = os.path.normpath(str(Path.home()))
        pairs = {}
        for p in paths:
            p = str(p)
            if os.path.isabs(p) and os.path.normpath(p) != "/":
                for form in (p.rstrip("/"), os.path.normpath(p)):
                    pairs[form] = "~" if os.path.normpath(p) == home else Path(p).name
        self.pairs = sorted(pairs.items(), key=lambda kv: -len(kv[0]))

    def __call__(self, text: str) -> str:
        for path, name in self.pairs:
            text = text.replace(path, name)
        return text


def export_fingerprint(path: Path, backend: str) -> str:
    """system_fingerprint: the manifest's sha256 (it records every artifact's sha256), backend, version."""
    from ..manifest import MANIFEST

    p = Path(path)
    source = p / MANIFEST if (p / MANIFEST).exists() else p / "config.json"
    digest = hashlib.sha256(source.read_bytes()).hexdigest() if source.exists() else "unknown"
    return f"dgport-{__version__}-{backend}-{digest[:12]}"


def parse_body(model, body: bytes, max_values: int = MAX_JSON_VALUES):
    """The request body as `model` (pydantic): JSON parse and validation, one ApiError on failure.
    A body of more than `max_values` list items and objects is refused before it is parsed."""
    from pydantic import ValidationError

    if json_values(body, max_values) > max_values:
        raise ApiError(400, f"the request body holds more than {max_values} JSON values (list items and objects); "
                       "send fewer", code="request_too_complex")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e) from None


@dataclass
class Answer:
    """What a request's events have brought so far."""
    text: TextStream
    generated: list[int] = field(default_factory=list)  # the answer's ids without PAD, cut at max_tokens
    cut: bool = False  # max_tokens cut it
    done: dict | None = None  # the worker's result (None: stopped early at a stop string)
    prompt_ids: list[int] | None = None  # the token stream it ran on (known once it starts)
    cached: int = 0

    def finish_reason(self) -> str:
        if self.text.stopped:
            return "stop"
        return "stop" if not self.cut and self.done and self.done["finished"] else "length"


def create_app(model, cfg: ServeConfig, max_queue: int = 16, max_batch: int = 1):
    """The ASGI app. `model`: a Generator, or a function returning one (run on the worker thread).
    `max_batch`: requests denoised together (1: one at a time, in arrival order)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

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
    if max_batch == 1:
        engine = Engine(model, max_queue)
    else:
        from .batch_engine import BatchEngine

        engine = BatchEngine(model, max_queue, max_batch)
    gen = engine.gen  # the handlers read only its tokenizer, config and defaults; the worker runs it
    created = int(time.time())
    pad_id = gen.defaults.pad_token_id
    C = gen.config.canvas_length
    max_values = max(MAX_JSON_VALUES, gen.config.max_position_embeddings + 1024)  # a prompt of token ids fits
    redact = Redactor(cfg.private_paths)
    max_body = cfg.max_body_bytes or (IMAGE_BODY_BYTES if getattr(gen.backend, "vision", None) is not None
                                      else MAX_BODY_BYTES)
    planning = ThreadPoolExecutor(2, thread_name_prefix="dgport-serve-plan")
    texting = ThreadPoolExecutor(2, thread_name_prefix="dgport-serve-text")

    async def off(pool, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    def close():
        engine.close()
        for pool in (planning, texting):
            pool.shutdown(wait=False, cancel_futures=True)

    @asynccontextmanager
    async def lifespan(app):
        app.state.loop = asyncio.get_running_loop()
        yield
        close()

    app = FastAPI(title="dgport", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.engine = engine
    app.state.shutdown = engine.shutdown
    app.state.close = close

    def error_json(e: ApiError) -> dict:
        body = e.body()
        body["error"]["message"] = redact(body["error"]["message"])
        return body

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(error_json(e), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(error_body(redact(message), _STATUS_TYPES.get(e.status_code, "invalid_request_error"),
                                       code=str(e.status_code)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    if cfg.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, key=cfg.api_key)
    app.add_middleware(HostGuard, allowed=cfg.allowed_hosts)
    app.add_middleware(AccessLog)  # added last: runs first, so refused requests are logged too

    async def read_body(request: Request, model):
        check_json_content_type(request.headers.get("content-type"))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {max_body}",
                           code="request_too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise ApiError(413, f"the request body exceeds the limit of {max_body} bytes",
                                   code="request_too_large")
                chunks.append(chunk)
        except ClientDisconnect:  # nobody reads the answer; no traceback in the server's log
            raise ApiError(400, "the client closed the connection before the whole body arrived") from None
        req = await off(planning, parse_body, model, b"".join(chunks), max_values)
        if req.model != cfg.model_id:
            raise ApiError(404, f"the model `{req.model}` does not exist; this server serves `{cfg.model_id}`",
                           type_="not_found_error", param="model", code="model_not_found")
        return req

    async def plan_off(planner, req) -> Plan:
        try:
            return await off(planning, planner, req, gen)
        except DgportError as e:  # e.g. the chat template's work budget: the request's fault
            raise ApiError(400, str(e), param="messages" if planner is plan_chat else "prompt") from e

    @app.get("/health")
    async def health():
        return {"status": "shutting down" if engine.closing else "ok", "model": cfg.model_id, "busy": engine.busy,
                "waiting": engine.queue.qsize(), "served": engine.served, "cancelled": engine.cancelled}

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
        plan = await plan_off(plan_chat, req)
        return await respond(request, plan, f"chatcmpl-{uuid.uuid4().hex}")

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest)
        plan = await plan_off(plan_completion, req)
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

    def usage(plan: Plan, ans: Answer) -> dict:
        prompt = len(ans.prompt_ids if ans.prompt_ids is not None else plan.ids)
        generated = len(ans.generated)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
                "prompt_tokens_details": {"cached_tokens": ans.cached}}

    def figures(done: dict | None) -> dict | None:
        if done is None:
            return None
        return {k: done[k] for k in ("steps_per_canvas", "tokens_per_forward", "ms_per_step", "ms_per_encode",
                                     "queue_ms", "generate_ms", "cached_tokens", "encoded_tokens")}

    async def respond(request: Request, plan: Plan, rid: str):
        job, events = start(plan)
        tokens = request.scope.get(TOKENS, [None])
        if plan.stream:
            return JobStream(job, sse(plan, job, events, rid, tokens), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(watch_disconnect(request, job))
        try:
            return await collect(plan, job, events, rid, tokens)
        finally:
            watcher.cancel()
            job.cancel.set()  # no-op when done; stops the worker if this handler was cancelled

    async def watch_disconnect(request: Request, job: Job):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel.set()
                return

    async def run(plan: Plan, job: Job, events: asyncio.Queue, ans: Answer):
        """Yields ("start",), ("delta", content, reasoning) and ("step", ...) as the job's events come;
        returns when it is done or stopped at a stop string (then its job is cancelled)."""
        while True:
            event = await events.get()
            kind = event[0]
            if kind == "start":
                ans.prompt_ids, ans.cached = event[1], event[2]
                yield ("start",)
            elif kind == "canvas":
                ids = event[2]
                if plan.template is not None:  # its positions: not the EOS and PAD the loop writes after it
                    end = plan.template.holes[0][1] if plan.infill else plan.template.length  # suffix: the hole
                    ids = ids[:max(0, end - event[1] * C)]
                ids = [t for t in ids if t != pad_id]
                if plan.max_tokens is not None and len(ans.generated) + len(ids) > plan.max_tokens:
                    # only the last canvas can pass the cap: the model ran whole canvases, the client gets max_tokens
                    ids, ans.cut = ids[:plan.max_tokens - len(ans.generated)], True
                ans.generated.extend(ids)
                c, r = await off(texting, ans.text.feed, ids)
                if c or r:
                    yield ("delta", c, r)
                if ans.text.stopped:
                    job.cancel.set()  # the rest would be cut off: stop computing it
                    return
            elif kind == "step":
                yield event
            elif kind == "done":
                ans.done = event[1]
                c, r = await off(texting, ans.text.deltas, True)
                if c or r:
                    yield ("delta", c, r)
                return
            elif kind == "error":
                _, status, message, code = event
                raise ApiError(status, message, type_=_STATUS_TYPES.get(status, "server_error"), code=code)
            elif kind == "cancelled":
                raise ApiError(499, "cancelled")

    def new_answer(plan: Plan) -> Answer:
        # a template's answer is all content (fixed text and holes), as Generator.generate's text is
        return Answer(TextStream(gen.tokenizer, pad_id, plan.chat and plan.template is None, plan.stop))

    def holes(plan: Plan, ans: Answer) -> dict:
        """The choice's `dgport_holes` (each hole's text), with a template."""
        return {"dgport_holes": ans.done["holes"]} if plan.template is not None and ans.done else {}

    async def collect(plan: Plan, job: Job, events, rid: str, tokens: list):
        ans = new_answer(plan)
        async for _ in run(plan, job, events, ans):
            pass
        tokens[0] = len(ans.generated)
        content, reasoning = await off(texting, ans.text.text)
        if ans.text.stopped:
            content = content[:ans.text.sent_content]
        calls = []
        if plan.tools is not None:  # the calls leave the content (serve/tool_plan.py)
            content, reasoning, calls = await off(texting, tool_reply, plan, ans.generated, gen.tokenizer, pad_id)
        finish = "tool_calls" if calls else ans.finish_reason()
        choice: dict = {"index": 0, "finish_reason": finish, "logprobs": None,
                        **(holes(plan, ans) if plan.tools is None else {})}
        if plan.chat:
            choice["message"] = {"role": "assistant", "content": content or (None if calls else content),
                                 "reasoning_content": reasoning or None, **({"tool_calls": calls} if calls else {})}
        else:
            choice["text"] = content
        body = {"id": rid, "object": "chat.completion" if plan.chat else "text_completion", "created": int(time.time()),
                "model": cfg.model_id, "system_fingerprint": cfg.fingerprint, "choices": [choice],
                "usage": usage(plan, ans), "dgport": figures(ans.done)}
        if plan.return_token_ids:
            choice["token_ids"] = ans.generated
            body["prompt_token_ids"] = ans.prompt_ids if ans.prompt_ids is not None else plan.ids
        return JSONResponse(body)

    async def sse(plan: Plan, job: Job, events, rid: str, tokens: list):
        ans = new_answer(plan)
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

        ids_extra = {"token_ids": []} if plan.return_token_ids else {}
        try:
            async for item in run(plan, job, events, ans):
                if item[0] == "start":  # the first chunk: the role, and the prompt's ids as vLLM sends them
                    first = {"prompt_token_ids": ans.prompt_ids} if plan.return_token_ids else {}
                    if plan.chat:
                        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}], **first)
                    elif first:
                        yield chunk([delta_choice("", **ids_extra)], **first)
                elif item[0] == "delta" and plan.tools is None:  # with tools: sent once the calls are known
                    yield chunk([delta_choice(item[1], item[2], **ids_extra)])
                elif item[0] == "step":
                    _, k, step, temp, draft, accepted = item
                    text = await off(texting, functools.partial(gen.tokenizer.decode, skip_special_tokens=False), draft)
                    # canvases and steps count from 1, as `dgport run --show-canvas` shows them
                    yield chunk([], dgport_draft={"canvas": k + 1, "step": step + 1, "temperature": temp, "accepted": accepted,
                                                  "text": text, "token_ids": draft})
            extra = {"token_ids": ans.generated} if plan.return_token_ids else {}
            finish = ans.finish_reason()
            if plan.tools is not None:  # the content, then one delta per call (OpenAI's tool-call deltas)
                content, reasoning, calls = await off(texting, tool_reply, plan, ans.generated, gen.tokenizer, pad_id)
                if content or reasoning:
                    yield chunk([delta_choice(content, reasoning)])
                for k, call in enumerate(calls):
                    yield chunk([{"index": 0, "delta": {"tool_calls": [{"index": k, **call}]}, "logprobs": None,
                                  "finish_reason": None}])
                finish = "tool_calls" if calls else finish
            else:
                extra.update(holes(plan, ans))
            yield chunk([delta_choice("", finish=finish, **extra)], dgport=figures(ans.done))
            if plan.include_usage:
                yield chunk([], usage=usage(plan, ans), dgport=figures(ans.done))
        except ApiError as e:
            yield f"data: {json.dumps(error_json(e))}\n\n"
        finally:
            job.cancel.set()  # the client went away (or the stream ended): stop between two steps
            tokens[0] = len(ans.generated)
        yield "data: [DONE]\n\n"

    return app
