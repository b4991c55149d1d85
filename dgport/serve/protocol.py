"""Errors in OpenAI's shape, and the request bodies (pydantic, built on first use)."""

from typing import Any, Literal

SAMPLER_FIELDS = ("max_denoising_steps", "t_min", "t_max", "entropy_bound", "stability_threshold",
                  "confidence_threshold")
MAX_BODY_BYTES = 4 << 20  # a model that takes images: serve/image_plan.py's IMAGE_BODY_BYTES
MAX_STOP = 16
MAX_STOP_CHARS = 256  # per stop string: the held-back tail of each delta is checked against its prefixes
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
# list items and objects a body may hold (or the model's context, when longer: a prompt of token ids).
# Parsing JSON into Python objects holds the GIL, so the event loop waits while a 4 MB body of tiny
# values is parsed (2 s for 380,000 {"hole": 1}); past this budget the body is refused unparsed.
MAX_JSON_VALUES = 1 << 18


def json_values(body: bytes, limit: int) -> int:
    """An upper bound of the values in a JSON body (its commas, `{` and `[`), exact outside strings
    once the quick count passes `limit`. The exact count is a Python loop over the body's strings, so
    it yields the GIL to the event loop as it goes (a regex or a parser would hold it throughout)."""
    n = body.count(b",") + body.count(b"{") + body.count(b"[")
    if n <= limit:
        return n
    n, inside = 0, False
    for seg in body.split(b'"'):
        if not inside:
            n += seg.count(b",") + seg.count(b"{") + seg.count(b"[")
        elif (len(seg) - len(seg.rstrip(b"\\"))) % 2:
            continue  # an escaped quote: the string goes on
        inside = not inside
    return n


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
                 405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                 421: "invalid_request_error", 500: "server_error", 503: "server_error"}


# ---------------------------------------------------------------------------------------------
# Request bodies (pydantic; unknown fields are refused, never ignored)


def _models():
    """Pydantic models, built on first use so `import dgport.serve` needs no pydantic."""
    from pydantic import BaseModel, ConfigDict, Field

    class Strict(BaseModel):
        # no coercion ("5" or true for a number, 5.0 for a count) and no NaN or infinities
        model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    class Message(Strict):
        role: Literal["system", "developer", "user", "assistant", "tool"]
        # a list of parts (text, image_url): judged on the planning thread (serve/image_plan.py), in one line
        # naming the part
        content: str | list[Any] | None = None
        name: str | None = None  # does not reach the template
        reasoning_content: str | None = None  # earlier turns' reasoning: the template drops it anyway
        reasoning: str | None = None
        refusal: str | None = None
        tool_calls: list[Any] | None = None  # judged by dgport.tool_calls.chat_messages
        tool_call_id: str | None = None

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
        # dgport's extension: a canvas template, a list of strings and {"hole": N} objects. Any type here:
        # Template.from_json judges it on the planning thread, in one line naming the part
        template: Any = None
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
        # structured output: judged on the planning thread (serve/schema_plan.py), in one line naming the field
        response_format: Any = None
        # tools (serve/tool_plan.py): judged on the planning thread, in one line naming the field
        tools: Any = None
        tool_choice: Any = None
        parallel_tool_calls: Any = None
        # dgport's extension: soft tokens per image (70, 140, 280, 560, 1120; default: the model's)
        max_soft_tokens: int | None = None

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

