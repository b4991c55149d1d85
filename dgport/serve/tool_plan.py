"""Tools on /v1/chat/completions (dgport.tool_calls): `tools`, `tool_choice`, `parallel_tool_calls`, and
conversations with assistant `tool_calls` and `tool` messages, planned on the planning thread; the
answer's calls split from its content (`reply`, on a worker thread). Every refusal is a 400 naming the
field."""

from ..errors import DgportError
from .protocol import ApiError
from .text import TextStream


def plan_tools(req, gen, think: bool):
    """(the tools state: tools, mode, names, tokens, parallel; the forced call's (Layout, max_new_tokens)
    or None), or (None, None) without tools."""
    from ..tool_calls import ToolError, ToolTokens, check_tools, choose, forced_template

    if req.tools is None:
        if req.tool_choice is not None or req.parallel_tool_calls is not None:
            name = "tool_choice" if req.tool_choice is not None else "parallel_tool_calls"
            raise ApiError(400, f"{name} needs tools", param=name)
        return None, None
    try:
        tools = check_tools(req.tools)
    except ToolError as e:
        raise ApiError(400, str(e), param="tools") from e
    try:
        mode, forced = choose(tools, req.tool_choice, req.parallel_tool_calls)
    except ToolError as e:
        raise ApiError(400, str(e), param="parallel_tool_calls" if e.args[0].startswith("parallel") else
                       "tool_choice") from e
    try:
        tokens = ToolTokens(gen.tokenizer)
    except ToolError as e:
        raise ApiError(400, str(e), param="tools") from e
    if req.stop:
        raise ApiError(400, "stop strings cannot be used with tools (a stop string could cut a call); drop stop",
                       param="stop")
    state = {"tools": tools, "mode": mode, "names": {t["function"]["name"] for t in tools}, "tokens": tokens,
             "parallel": req.parallel_tool_calls is not False}
    if mode not in ("forced", "switch"):
        return state, None
    for field, given in (("template", req.template is not None), ("response_format", req.response_format
                                                                   not in (None, {"type": "text"}))):
        if given:
            raise ApiError(400, f"a forced tool call (tool_choice) is a template of its own; drop {field}",
                           param=field)
    if think:
        raise ApiError(400, "a forced tool call fixes the answer from its first position, where thinking mode's "
                       "thought channel would go; turn thinking off or use tool_choice auto", param="tool_choice")
    try:
        if mode == "forced":
            layout = forced_template(forced).layout(gen.tokenizer)
        else:  # "required" with several tools: the model chooses the function
            from ..tool_switch import CallSwitch

            layout = CallSwitch(tools, gen.tokenizer, gen.config.canvas_length)
    except DgportError as e:
        raise ApiError(400, str(e), param="tools") from e
    max_new = layout.check_budget(gen.config.canvas_length, None)
    cap = req.max_completion_tokens or req.max_tokens
    if cap is not None and cap < layout.length:
        raise ApiError(400, f"the forced call needs {layout.length} tokens, more than max_tokens={cap}; raise it or "
                       "leave it unset", param="max_completion_tokens" if req.max_completion_tokens else "max_tokens")
    if max_new >= gen.config.max_position_embeddings:
        raise ApiError(400, "the forced call's arguments need more positions than this model's context leaves",
                       param="tools", code="context_length_exceeded")
    return state, (layout, max_new)


def chat_messages(req, text_of) -> list[dict]:
    """The request's messages as the chat template renders them (developer = system; an assistant's
    tool_calls with object arguments; a tool message named after its call)."""
    from ..tool_calls import ToolError, chat_messages as convert

    raw = [{"role": "system" if m.role == "developer" else m.role, "content": text_of(m),
            "tool_calls": m.tool_calls, "tool_call_id": m.tool_call_id} for m in req.messages]
    try:
        return convert(raw)
    except ToolError as e:
        raise ApiError(400, str(e), param="messages") from e


def reply(plan, ids, tokenizer, pad_id) -> tuple[str, str, list[dict]]:
    """(content, reasoning, calls in OpenAI's shape) of a tools answer's ids."""
    from ..tool_calls import split_calls

    t = plan.tools
    content_ids, calls = split_calls(ids, tokenizer, t["tokens"], t["names"], t["parallel"])
    if t["mode"] == "none":
        content_ids, calls = ids, []
    text = TextStream(tokenizer, pad_id, plan.chat and plan.template is None, [])
    text.add(content_ids)
    content, reasoning = text.text()
    if calls and not content.strip():
        content = ""  # (a call among several tools is laid out after whitespace)
    return content, reasoning, [c.openai() for c in calls]
