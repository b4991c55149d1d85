"""`dgport serve` with tools: OpenAI `tools` rendered by the checkpoint's chat template (a fixture with
Gemma 4's tool syntax), forced calls (`tool_choice` required / named) that always validate, `auto` and
`none`, tool-call deltas when streaming, a whole tool-calling loop with the openai client (the assistant's
`tool_calls` and the `tool` message rendered back), `parallel_tool_calls`, and the 400s. Every answer equals
Generator.generate on the same conversation and seed."""
from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
jsonschema = pytest.importorskip("jsonschema")

from bench.serve_process import ServerProcess  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}}}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from dgport.exporters.export import ExportOptions, export
    from models.fixtures import build_fixture

    root = tmp_path_factory.mktemp("serve-tools")
    ckpt = build_fixture("tiny", root / "ckpt", chat_template="tools")
    export(ckpt, root / "tiny", ExportOptions(formats=("onnx",), validate=False))
    return root / "tiny"


@pytest.fixture(scope="module")
def srv(export_dir):
    s = ServerProcess(export_dir, "--served-model-name", "tiny")
    s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gen(export_dir):
    import dgport

    return dgport.load(export_dir, backend="cpu")


def test_forced_call_is_a_valid_tool_call_equal_to_the_api(srv, gen):
    for choice in ("required", NAMED):
        tools = [WEATHER] if choice == "required" else [WEATHER, TIME]
        r = srv.client.chat.completions.create(model="tiny", messages=USER, tools=tools, tool_choice=choice, seed=2)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, WEATHER["function"]["parameters"])
        api = gen.generate(USER, tools=tools, tool_choice=choice, seed=2)
        assert api.tool_calls[0].arguments == args


def test_required_with_several_tools_calls_one_of_them(srv, gen):
    for seed in (0, 3):
        r = srv.client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, TIME],
                                               tool_choice="required", seed=seed)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
        api = gen.generate(USER, tools=[WEATHER, TIME], tool_choice="required", seed=seed).tool_calls[0]
        assert (api.name, api.arguments) == (call.function.name, json.loads(call.function.arguments))


def test_auto_and_none_answer_text_without_call_syntax(srv, gen):
    for choice in ("auto", "none"):
        r = srv.client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], tool_choice=choice,
                                               seed=5, max_tokens=16)
        c = r.choices[0]
        assert c.finish_reason in ("stop", "length") and not c.message.tool_calls
        assert "<|tool_call>" not in (c.message.content or "")
        assert c.message.content == gen.generate(USER, tools=[WEATHER], tool_choice=choice, seed=5,
                                                 max_new_tokens=16).text


def test_streaming_sends_tool_call_deltas(srv):
    whole = srv.client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], tool_choice="required",
                                               seed=7).choices[0].message.tool_calls[0]
    chunks = list(srv.client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER],
                                                     tool_choice="required", seed=7, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    assert json.loads(deltas[0].function.arguments) == json.loads(whole.function.arguments)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    assert not any(ch.choices and ch.choices[0].delta.content for ch in chunks)


def test_a_tool_calling_loop_renders_calls_and_results_back(srv, gen):
    messages = list(USER)
    r = srv.client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice=NAMED, seed=1)
    msg = r.choices[0].message
    messages.append({"role": "assistant", "content": None,
                     "tool_calls": [tc.model_dump() for tc in msg.tool_calls]})
    messages.append({"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "18 C, sunny"})
    final = srv.client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], seed=9,
                                               max_tokens=16, extra_body={"return_token_ids": True})
    prompt = gen.prompt_ids(messages, tools=[WEATHER])
    assert final.prompt_token_ids == prompt
    rendered = gen.tokenizer.decode(prompt, skip_special_tokens=False)
    assert "<|tool_call>call:get_weather{city:" in rendered
    assert '<|tool_response>response:get_weather{value:<|"|>18 C, sunny<|"|>}<tool_response|>' in rendered
    assert final.choices[0].message.content == gen.generate(messages, tools=[WEATHER], seed=9,
                                                            max_new_tokens=16).text


@pytest.mark.parametrize("extra, param, says", [
    ({"tools": []}, "tools", "1 to 128"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", "name"),
    ({"tools": [WEATHER], "tool_choice": "required", "stop": ["x"]}, "stop", "drop stop"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "auto"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "null"}}}}, "response_format", "template of its own"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"d": {"type": "string", "format": "date"}}}}}], "tool_choice": "required"},
     "tools", "'format'"),
    ({"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}], "tools": [WEATHER]}, "messages",
     "tool_call_id"),
])
def test_bad_tool_requests_get_400(srv, extra, param, says):
    body = {"model": "tiny", "messages": USER, **extra}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err
