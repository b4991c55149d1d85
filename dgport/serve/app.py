"""The ASGI app: routes, the API-key middleware, non-streaming answers and SSE streams."""

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from .engine import Engine, Job
from .plan import Plan, plan_chat, plan_completion
from .protocol import _STATUS_TYPES, MAX_BODY_BYTES, ApiError, _models, _validation_error, error_body
from .text import TextStream


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
    from ..manifest import MANIFEST

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

