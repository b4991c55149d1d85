"""Planning: a validated request -> the Plan the worker runs (checked, rendered and tokenized).

The app runs these functions on a worker thread: a 4 MB prompt takes seconds to tokenize."""

from dataclasses import dataclass, field

from ..errors import DgportError
from .protocol import MAX_STOP, MAX_STOP_CHARS, REASONING_EFFORTS, SAMPLER_FIELDS, ApiError
from ..canvas_template import Layout
from .schema_plan import plan_response_format
from .image_plan import check_no_image_tokens, expand, message_content, plan_images
from .tool_plan import chat_messages, plan_tools
from .template_plan import plan_template


@dataclass
class Plan:
    """What a request asks of the worker, checked before it is queued."""
    ids: list[int]
    max_new_tokens: int  # what the model runs: whole canvases covering it
    max_tokens: int | None  # the client's cap on the answer's tokens (None: the whole canvases)
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
    template: Layout | None = None  # a canvas template (the `template` field or `suffix`), tokenized
    tools: dict | None = None  # chat with tools (serve/tool_plan.py): the answer's calls are split from it
    infill: bool = False  # `suffix`: the answer is the inserted text alone (the hole), as OpenAI returns it
    images: object = None  # chat with images: their PromptImages (decoded and patched), in prompt order
    image_keys: list = field(default_factory=list)  # one per image: sha256 of its patches (the prefix cache's key)
    image_starts: list = field(default_factory=list)  # where each image's block starts in `ids`


def encode(tokenizer, text: str, raw: bool = False, check=None) -> list[int]:
    """tokenizer.encode(text) (raw: encode_raw) with the GIL released: `tokenizers` holds it through
    Tokenizer.encode (a 4 MB prompt: seconds in which the server's event loop could not run) and
    releases it in encode_batch, which gives the same ids. `check(n)` sees the token count (without
    the <bos> encode_raw may add) before the list of ids is built (50 ms with the GIL for 4M ids)."""
    enc = tokenizer.tok.encode_batch([text], add_special_tokens=False)[0]
    if check is not None:
        check(len(enc))
    ids = enc.ids
    if raw and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids = [tokenizer.bos_id] + ids
    return ids


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
    if len(stop) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"stop: give at most {MAX_STOP} non-empty strings of up to {MAX_STOP_CHARS} characters",
                       param="stop")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options needs stream=true", param="stream_options")
    if req.stream_drafts and not req.stream:
        raise ApiError(400, "stream_drafts needs stream=true", param="stream_drafts")
    return max_new, overrides, stop


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
    tools, forced = plan_tools(req, gen, think)
    template = forced or plan_response_format(req, gen, think) or plan_template(req, gen, think)
    if template is not None:
        max_new = template[1]
    contents, urls = {}, []
    for i, m in enumerate(req.messages):
        contents[id(m)], found = message_content(m, i)
        urls += found
    if messages_last_role(req) not in ("user", "tool"):
        raise ApiError(400, "the last message must be the user's or a tool's (dgport does not continue an "
                       "assistant turn)", param="messages")
    for i, m in enumerate(req.messages):
        content = contents[id(m)]
        if m.role == "user" and not (content.strip() if isinstance(content, str) else content):
            raise ApiError(400, f"messages[{i}]: the user message is empty; give some text",
                           param=f"messages[{i}].content")
    if tools is not None or any(m.tool_calls or m.role == "tool" for m in req.messages):
        messages = chat_messages(req, lambda m: contents[id(m)])
    else:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": contents[id(m)]}
                    for m in req.messages]
    images, keys = plan_images(urls, gen, req.max_soft_tokens)  # decoded and patched here, off the event loop
    try:
        rendered = gen.tokenizer.render(messages, enable_thinking=think, tools=tools and tools["tools"])
        ids = encode(gen.tokenizer, rendered, check=lambda n: _fits(gen, n, max_new, chat=True, template=template))
        ids, starts = expand(ids, images, getattr(gen.backend, "vision", None))
    except DgportError as e:
        raise ApiError(400, str(e), param="messages") from e
    plan = _plan(gen, ids, max_new, req, overrides, stop, chat=True, template=template)
    plan.messages, plan.think, plan.tools = messages, think, tools
    plan.images, plan.image_keys, plan.image_starts = images, keys, starts
    return plan


def messages_last_role(req) -> str:
    m = req.messages[-1]
    return "system" if m.role == "developer" else m.role


def plan_completion(req, gen) -> Plan:
    max_new, overrides, stop = _check_common(req, gen)
    if req.echo or req.best_of not in (None, 1):
        name = "echo" if req.echo else "best_of"
        raise ApiError(400, f"{name} is not supported by dgport serve; omit it", param=name)
    template = plan_template(req, gen, think=False)  # `template`, or `suffix`: in-filling after the prompt
    if template is not None:
        max_new = template[1]
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, "prompt: send one prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ApiError(400, "the prompt is empty; give some text", param="prompt")
        ids = encode(gen.tokenizer, prompt, raw=True,
                     check=lambda n: _fits(gen, n, max_new, chat=False, template=template))
    else:
        ids = [int(t) for t in prompt]
        V = gen.config.vocab_size
        if not ids or min(ids) < 0 or max(ids) >= V:
            raise ApiError(400, f"prompt token ids must be a non-empty list in [0, {V})", param="prompt")
    check_no_image_tokens(ids, gen, "prompt")
    return _plan(gen, ids, max_new, req, overrides, stop, chat=False, template=template)


def _fits(gen, n: int, max_new: int, chat: bool, template=None) -> None:
    from ..loop import check_context

    param = "messages" if chat else "prompt"
    try:
        check_context(gen.config, 0, n, max_new)
    except DgportError as e:
        if template is None:
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from e
        C, limit = gen.config.canvas_length, gen.config.max_position_embeddings
        raise ApiError(400, f"the prompt ({n} tokens) and the template ({template[0].length} positions: "
                       f"{max_new // C} canvases of {C}) need {n + max_new} positions, more than this model's "
                       f"context of {limit}; shorten the prompt to at most {limit - max_new} tokens or the template",
                       param=param, code="context_length_exceeded") from e


def _plan(gen, ids, max_new, req, overrides, stop, chat, template=None) -> Plan:
    _fits(gen, len(ids), max_new, chat, template)
    opts = req.stream_options
    # with a template the answer ends where it ends: max_tokens (checked against its length) cuts nothing
    cap = None if template is not None else req.max_completion_tokens or req.max_tokens
    return Plan(ids=ids, max_new_tokens=max_new, max_tokens=cap, seed=req.seed, overrides=overrides, stop=stop,
                chat=chat, stream=req.stream, include_usage=bool(opts and opts.include_usage),
                drafts=req.stream_drafts, return_token_ids=req.return_token_ids,
                template=template[0] if template is not None else None,
                infill=template is not None and getattr(req, "suffix", None) is not None)

