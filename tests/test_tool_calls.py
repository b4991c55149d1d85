"""Tool calls in Gemma 4's syntax: the parser (well-formed calls become OpenAI tool calls, malformed ones
stay text, never an error), forced calls by a template whose arguments always parse and validate (over
random parameter schemas and seeds), tools rendered by the chat template, conversations rendered back, and
the Python API's `tool_calls`."""
from __future__ import annotations

import json
import random

import jsonschema
import pytest

import dgport
from dgport.errors import DgportError
from dgport.tool_calls import (ToolError, ToolTokens, check_tools, chat_messages, choose, forced_template,
                               parse_call, split_calls)

from test_json_schema import random_schema  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]},
                                                     "days": {"type": "integer"}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def tools_ckpt(tmp_path_factory):
    from models.fixtures import build_fixture

    return build_fixture("tiny", tmp_path_factory.mktemp("tools") / "ckpt", chat_template="tools")


@pytest.fixture(scope="module")
def gen(tools_ckpt):
    return dgport.load(tools_ckpt, backend="cpu", threads=2)


# ------------------------------------------------------------------------------------------ the parser

@pytest.mark.parametrize("text, args", [
    ('call:get_weather{city:<|"|>Paris, "FR"<|"|>,days:3}', {"city": 'Paris, "FR"', "days": 3}),
    ("call:get_weather{}", {}),
    ('call:get_weather{ city : <|"|>a<|"|> , x:[1,-2.5,true,null,{y:false}], z:{} }',
     {"city": "a", "x": [1, -2.5, True, None, {"y": False}], "z": {}}),
    ('call:get_weather{<|"|>odd key<|"|>:"json string",n:1e3}', {"odd key": "json string", "n": 1000.0}),
])
def test_well_formed_calls_parse(text, args):
    call = parse_call(text, {"get_weather"})
    assert call.name == "get_weather" and call.arguments == args and call.id.startswith("call_")
    assert json.loads(call.openai()["function"]["arguments"]) == args


@pytest.mark.parametrize("text", [
    "call:get_weather", "call:get_weather{city:", 'call:get_weather{city:<|"|>a}', "call:get_weather{city:1,}",
    "call:unknown{}", "get_weather{}", "call:get_weather{a:1} trailing", "call:get_weather[1]",
    "call:get_weather{a:01x}", "call:get_weather{" + "a:[" * 100 + "1" + "]" * 100 + "}",
])
def test_malformed_calls_are_none(text):
    assert parse_call(text, {"get_weather"}) is None


def test_split_keeps_malformed_calls_as_text_and_drops_the_syntax_of_good_ones(gen):
    tok = gen.tokenizer
    tokens = ToolTokens(tok)
    ids = tok.encode('Let me check.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
                     '<|tool_call>call:get_weather{city:<tool_call|> done<|tool_call>call:get_time{}<tool_call|>'
                     '<|tool_call>call:get_time{')
    content, calls = split_calls(ids, tok, tokens, {"get_weather", "get_time"})
    assert [c.name for c in calls] == ["get_weather", "get_time"] and calls[0].arguments == {"city": "Paris"}
    text = tok.decode(content)
    assert text == "Let me check.call:get_weather{city: donecall:get_time{"
    assert "<|tool_call>" not in tok.decode(content) and "Paris" not in text
    _, first = split_calls(ids, tok, tokens, {"get_weather", "get_time"}, parallel=False)
    assert [c.name for c in first] == ["get_weather"]


# ------------------------------------------------------------------------------------------ tools and choices

@pytest.mark.parametrize("tools, says", [
    ([], "1 to 128"), ([{"type": "function"}], "a tool is"), ([{"type": "code", "function": {"name": "f"}}], "a tool"),
    ([{"type": "function", "function": {"name": "bad name"}}], "name"),
    ([WEATHER, WEATHER], "twice"), ([{"type": "function", "function": {"name": "f", "parameters": []}}], "parameters"),
    ([{"type": "function", "function": {"name": "f", "extra": 1}}], "extra"),
])
def test_bad_tools_are_refused(tools, says):
    with pytest.raises(ToolError, match=says):
        check_tools(tools)


def test_tool_choice():
    tools = check_tools([WEATHER, TIME])
    assert choose(tools, None, None) == ("auto", None) and choose(tools, "none", True) == ("none", None)
    assert choose(tools, {"type": "function", "function": {"name": "get_time"}}, None)[1]["function"]["name"] == \
        "get_time"
    assert choose(check_tools([TIME]), "required", None)[0] == "forced"
    assert choose(tools, "required", None) == ("switch", None)
    for bad, says in (({"type": "function", "function": {"name": "x"}}, "no tool is named"),
                      ("sometimes", "tool_choice")):
        with pytest.raises(ToolError, match=says):
            choose(tools, bad, None)
    with pytest.raises(ToolError, match="parallel_tool_calls"):
        choose(tools, None, "yes")


def test_forced_calls_parse_and_validate_over_random_parameter_schemas_and_seeds(gen):
    r = random.Random(7)
    tokens = ToolTokens(gen.tokenizer)
    n = 0
    while n < 40:
        params = random_schema(r)
        if params.get("type") != "object":
            continue
        tool = {"type": "function", "function": {"name": f"f{n}", "parameters": params}}
        forced_template(tool)  # compiles
        res = gen.generate("Call it.", tools=[tool], tool_choice="required", seed=n)
        assert len(res.tool_calls) == 1 and res.tool_calls[0].name == f"f{n}", res.token_ids
        jsonschema.validate(res.tool_calls[0].arguments, params)
        assert res.text == ""
        answer = [t for t in res.token_ids[0] if t != gen.defaults.pad_token_id]
        content, calls = split_calls(answer, gen.tokenizer, tokens, {f"f{n}"})
        assert calls[0].arguments == res.tool_calls[0].arguments
        n += 1


# ------------------------------------------------------------------------------------------ rendering

def test_required_with_several_tools_lets_the_model_choose_and_always_validates(gen, tools_ckpt, tmp_path):
    """tool_choice "required" with several tools: canvases of whitespace, the call prefix and the name (a
    choice), then the chosen function's argument template; every call validates against its function, more
    than one tool gets chosen over the seeds, and ONNX, MLX and torch write the same tokens."""
    from dgport.exporters.export import ExportOptions, export

    r = random.Random(11)
    tools = [WEATHER, TIME]
    while len(tools) < 4:
        params = random_schema(r)
        if params.get("type") == "object":
            tools.append({"type": "function", "function": {"name": f"tool_{len(tools)}", "parameters": params}})
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    chosen = set()
    for seed in range(12):
        res = gen.generate("Use a tool.", tools=tools, tool_choice="required", seed=seed)
        assert len(res.tool_calls) == 1 and res.text == ""
        call = res.tool_calls[0]
        jsonschema.validate(call.arguments, schemas[call.name])
        chosen.add(call.name)
    assert len(chosen) >= 2, chosen
    out = tmp_path / "both"
    export(tools_ckpt, out, ExportOptions(formats=("onnx", "mlx"), validate=False))
    gens = {"cpu": dgport.load(out, backend="cpu", threads=2), "mlx": dgport.load(out, backend="mlx"),
            "torch": dgport.load(tools_ckpt, backend="torch")}
    for seed in (0, 1):
        runs = {k: g.generate("Use a tool.", tools=tools, tool_choice="required", seed=seed) for k, g in gens.items()}
        assert len({json.dumps(x.token_ids) for x in runs.values()}) == 1
        assert len({x.tool_calls[0].name for x in runs.values()}) == 1


def test_tools_and_conversations_are_rendered_by_the_chat_template(gen):
    tok = gen.tokenizer
    tools = check_tools([WEATHER])
    text = tok.render([{"role": "user", "content": "Weather?"}], tools=tools)
    assert '<|tool>declaration:get_weather{description:<|"|>The weather in a city.<|"|>' in text
    msgs = chat_messages([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}])
    text = tok.render(msgs, tools=tools)
    assert '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>' in text
    assert '<|tool_response>response:get_weather{value:<|"|>18 C<|"|>}<tool_response|>' in text
    for bad, says in (([{"role": "tool", "tool_call_id": "nope", "content": "x"}], "tool_call_id"),
                      ([{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{"}}]}],
                       "not valid JSON"),
                      ([{"role": "user", "tool_calls": [{"id": "a", "function": {"name": "f"}}]}], "only an assistant")):
        with pytest.raises(ToolError, match=says):
            chat_messages(bad)


def test_the_api_returns_calls_and_refuses_contradictions(gen):
    res = gen.generate("Weather in Paris?", tools=[WEATHER, TIME],
                       tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=3)
    assert [c.name for c in res.tool_calls] == ["get_weather"]
    jsonschema.validate(res.tool_calls[0].arguments, WEATHER["function"]["parameters"])
    free = gen.generate("Weather in Paris?", tools=[WEATHER], seed=3, max_new_tokens=16)
    assert free.tool_calls == [] and "<|tool_call>" not in free.text
    conv = gen.generate([{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": "", "tool_calls": [res.tool_calls[0].openai()]},
                         {"role": "tool", "tool_call_id": res.tool_calls[0].id, "content": "18 C"}],
                        tools=[WEATHER], seed=4, max_new_tokens=16)
    assert conv.tool_calls == []
    for kw, says in (({"tool_choice": "auto"}, "need tools"), ({"tools": [WEATHER], "raw": True}, "raw"),
                     ({"tools": [WEATHER], "tool_choice": "required", "json_schema": {"type": "null"}},
                      "template of its own"),
                     ({"tools": [WEATHER], "tool_choice": "required", "think": True}, "think")):
        with pytest.raises(DgportError, match=says):
            gen.generate("x", **kw)
