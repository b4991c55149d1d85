"""Tool calls in Gemma 4's syntax (spec section 7), as OpenAI's `tools` / `tool_calls` describe them.

- Tools (OpenAI's `[{"type": "function", "function": {"name", "description", "parameters"}}]`) are checked
  here and rendered by the checkpoint's own chat template (its `tools` variable, as transformers'
  `apply_chat_template(tools=...)` passes them).
- The model writes a call as `<|tool_call>call:NAME{key:value,...}<tool_call|>`: strings between `<|"|>`
  tokens, numbers, true/false/null, `{k:v,...}` objects with bare keys, `[v,...]` arrays. The special
  tokens are found by their text in the checkpoint's tokenizer. `split_calls` turns the answer's token
  ids into content ids and parsed calls; a malformed call stays in the content (its special tokens are
  dropped from the text like any other), never an error.
- A forced call (`tool_choice` "required" with one tool, or a named function) is a canvas template: the
  call prefix and the argument skeleton fixed, each value a constrained hole from the parameters'
  JSON schema (dgport.json_schema in Gemma's dialect), so it always parses and validates.
- Conversations: assistant messages' `tool_calls` (JSON `arguments`) and `tool` messages (`tool_call_id`)
  become what the template renders: arguments as objects, the tool message named after its call.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .errors import DgportError

CALL_OPEN, CALL_CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
MAX_TOOLS = 128
MAX_DEPTH = 64  # nesting of a call's arguments
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


class ToolError(DgportError):
    """Tools, a tool choice or a conversation that cannot be used as given (the message names the field)."""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict

    def openai(self) -> dict:
        """OpenAI's shape: arguments as a JSON text."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# ------------------------------------------------------------------------------------------- tools

def check_tools(tools, where: str = "tools") -> list[dict]:
    """OpenAI tools, checked: a list of {"type": "function", "function": {"name", "description"?,
    "parameters"?, "strict"?}}, names unique."""
    if not isinstance(tools, list) or not tools or len(tools) > MAX_TOOLS:
        raise ToolError(f"{where}: a list of 1 to {MAX_TOOLS} tools")
    out, names = [], set()
    for i, t in enumerate(tools):
        here = f"{where}[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict) \
                or set(t) - {"type", "function"}:
            raise ToolError(f'{here}: a tool is {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}')
        f = t["function"]
        unknown = sorted(set(f) - {"name", "description", "parameters", "strict"})
        if unknown:
            raise ToolError(f"{here}.function.{unknown[0]}: not a field of a function")
        name = f.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ToolError(f"{here}.function.name: 1 to 64 letters, digits, _ . - (starting with a letter or _)")
        if name in names:
            raise ToolError(f"{here}.function.name: {name!r} is given twice")
        names.add(name)
        if not isinstance(f.get("description", ""), str) or not isinstance(f.get("parameters", {}), dict) \
                or not isinstance(f.get("strict", False), (bool, type(None))):
            raise ToolError(f"{here}.function: description is a string, parameters a JSON schema object, "
                            "strict true or false")
        out.append({"type": "function", "function": {k: v for k, v in f.items() if k != "strict"}})
    return out


def choose(tools: list[dict], tool_choice, parallel) -> tuple[str, dict | None]:
    """(mode, the forced tool or None): mode "auto", "none", "forced" (a named function, or "required" with
    one tool) or "switch" ("required" with several: the model chooses which, dgport.tool_switch)."""
    if parallel not in (None, True, False):
        raise ToolError("parallel_tool_calls: true or false")
    if tool_choice in (None, "auto"):
        return "auto", None
    if tool_choice == "none":
        return "none", None
    if tool_choice == "required":  # several tools: the model chooses the function (dgport.tool_switch)
        return ("forced", tools[0]) if len(tools) == 1 else ("switch", None)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict) and set(tool_choice["function"]) == {"name"}:
        name = tool_choice["function"]["name"]
        for t in tools:
            if t["function"]["name"] == name:
                return "forced", t
        raise ToolError(f"tool_choice: no tool is named {str(name)[:64]!r}")
    raise ToolError('tool_choice: "auto", "none", "required" or {"type": "function", "function": {"name": ...}}')


def forced_template(tool: dict):
    """The canvas template of a call of `tool`: prefix and argument skeleton fixed, values constrained by
    its parameters' schema (Gemma's dialect)."""
    from .json_schema import SchemaError, compile_schema

    f = tool["function"]
    params = f.get("parameters") or {"type": "object", "properties": {}}
    if params.get("type", "object") != "object" and "properties" not in params:
        raise ToolError(f"tools: {f['name']}'s parameters must be an object schema to force a call")
    try:
        args = compile_schema(params, dialect="gemma")
    except SchemaError as e:
        raise ToolError(f"tools: {f['name']}'s parameters: {e}") from None
    from .canvas_template import Template

    return Template([f"{CALL_OPEN}call:{f['name']}", *args.parts, CALL_CLOSE])


# ------------------------------------------------------------------------------------------- output

class ToolTokens:
    """The ids of the call syntax's special tokens in a tokenizer (found by their text)."""

    def __init__(self, tokenizer):
        ids = {text: tokenizer.tok.token_to_id(text) for text in (CALL_OPEN, CALL_CLOSE, QUOTE)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ToolError(f"this model's tokenizer has no {missing[0]} token, so it cannot call tools (Gemma 4's "
                            "tool syntax); drop tools")
        self.open, self.close, self.quote = ids[CALL_OPEN], ids[CALL_CLOSE], ids[QUOTE]


def split_calls(ids, tokenizer, tokens: ToolTokens, names, parallel: bool = True):
    """(content ids, calls): each well-formed `<|tool_call>call:NAME{...}<tool_call|>` of a known tool
    becomes a ToolCall and leaves the content; a malformed or unknown one stays in it (as text, its
    special tokens dropped). parallel=False: the first call only (later ones are dropped)."""
    ids = [int(t) for t in ids]
    content, calls, i = [], [], 0
    while i < len(ids):
        if ids[i] != tokens.open:
            content.append(ids[i])
            i += 1
            continue
        try:
            end = ids.index(tokens.close, i + 1)
        except ValueError:
            content.extend(ids[i:])
            break
        call = parse_call(tokenizer.decode(ids[i + 1:end], skip_special_tokens=False), names)
        if call is None:
            content.extend(ids[i:end + 1])
        elif parallel or not calls:
            calls.append(call)
        i = end + 1
    return content, calls


def parse_call(text: str, names) -> ToolCall | None:
    """A call's text between its markers (`call:NAME{...}`) as a ToolCall, or None when it is malformed or
    names no known tool."""
    m = re.match(r"\s*call:([^{\s]+)\s*", text)
    if not m or m.group(1) not in names:
        return None
    try:
        args, pos = _value(text, m.end(), 0)
    except (ValueError, IndexError, RecursionError):
        return None
    if not isinstance(args, dict) or text[pos:].strip():
        return None
    return ToolCall(call_id(), m.group(1), args)


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _value(text: str, i: int, depth: int):
    if depth > MAX_DEPTH:
        raise ValueError("too deep")
    i = _skip(text, i)
    if text.startswith(QUOTE, i):
        end = text.index(QUOTE, i + len(QUOTE))
        return text[i + len(QUOTE):end], end + len(QUOTE)
    if text.startswith('"', i):
        return json.JSONDecoder().raw_decode(text, i)
    if text.startswith("{", i):
        out, i = {}, _skip(text, i + 1)
        if text.startswith("}", i):
            return out, i + 1
        while True:
            i = _skip(text, i)
            if text.startswith(QUOTE, i):
                key, i = _value(text, i, depth + 1)
            else:
                j = i
                while j < len(text) and text[j] not in ":{}[],":
                    j += 1
                key, i = text[i:j].strip(), j
                if not key:
                    raise ValueError("empty key")
            i = _skip(text, i)
            if not text.startswith(":", i):
                raise ValueError("no ':'")
            out[key], i = _value(text, i + 1, depth + 1)
            i = _skip(text, i)
            if text.startswith("}", i):
                return out, i + 1
            if not text.startswith(",", i):
                raise ValueError("no ','")
            i += 1
    if text.startswith("[", i):
        out, i = [], _skip(text, i + 1)
        if text.startswith("]", i):
            return out, i + 1
        while True:
            v, i = _value(text, i, depth + 1)
            out.append(v)
            i = _skip(text, i)
            if text.startswith("]", i):
                return out, i + 1
            if not text.startswith(",", i):
                raise ValueError("no ','")
            i += 1
    for word, v in (("true", True), ("false", False), ("null", None)):
        if text.startswith(word, i):
            return v, i + len(word)
    m = NUMBER.match(text, i)
    if not m:
        raise ValueError(f"no value at {i}")
    return json.loads(m.group(0)), m.end()


def gemma_dumps(value) -> str:
    """A JSON value in Gemma's call syntax (what a forced call's fixed parts and choices are written in)."""
    if isinstance(value, str):
        if QUOTE in value:
            raise ToolError(f"a string holding {QUOTE} cannot be written in Gemma's tool syntax")
        return QUOTE + value + QUOTE
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ",".join(gemma_dumps(v) for v in value) + "]"
    return "{" + ",".join(f"{gemma_key(k)}:{gemma_dumps(v)}" for k, v in value.items()) + "}"


def gemma_key(key: str) -> str:
    return key if BARE_KEY.fullmatch(key) else gemma_dumps(key)


# ------------------------------------------------------------------------------------------- conversations

def chat_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages (dicts: role, content, tool_calls, tool_call_id) as the chat template renders them:
    an assistant's calls with their arguments as objects, a tool message with the name of its call."""
    names: dict[str, str] = {}
    out = []
    for i, m in enumerate(messages):
        here = f"messages[{i}]"
        msg = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            if m["role"] != "assistant":
                raise ToolError(f"{here}.tool_calls: only an assistant message has tool calls")
            calls = []
            for j, c in enumerate(m["tool_calls"]):
                at = f"{here}.tool_calls[{j}]"
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(c.get("id", ""), str):
                    raise ToolError(f'{at}: {{"id": ..., "type": "function", "function": {{"name": ..., "arguments": ...}}}}')
                args = f.get("arguments", "{}")
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except (ValueError, RecursionError):
                        raise ToolError(f"{at}.function.arguments: not valid JSON") from None
                if not isinstance(args, dict):
                    raise ToolError(f"{at}.function.arguments: a JSON object")
                names[c.get("id", "")] = f["name"]
                calls.append({"id": c.get("id", ""), "type": "function",
                              "function": {"name": f["name"], "arguments": args}})
            msg["tool_calls"] = calls
        if m["role"] == "tool":
            cid = m.get("tool_call_id")
            if not isinstance(cid, str) or cid not in names:
                raise ToolError(f"{here}.tool_call_id: names no earlier assistant tool call")
            msg["tool_call_id"], msg["name"] = cid, names[cid]
        out.append(msg)
    return out
