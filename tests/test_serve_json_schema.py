"""`dgport serve` structured output: `response_format: {"type": "json_schema", ...}` on chat completions
(strict or not, the openai client's `parse` with a pydantic model), streaming, concurrent requests with
different schemas sharing a batch, and the 400s (json_object, a keyword outside the subset, with a
template, with stop). A real server in its own process on a byte-level fixture; every answer equals
Generator.generate(prompt, json_schema=..., seed=S) and validates."""
from __future__ import annotations

import json
import threading

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
jsonschema = pytest.importorskip("jsonschema")

from bench.serve_process import ServerProcess  # noqa: E402

PROMPT = "Describe a user as JSON."
USER = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
                                         "admin": {"type": "boolean"}},
        "required": ["name", "age", "admin"], "additionalProperties": False}
POINTS = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}


def fmt(schema, strict=True):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


@pytest.fixture(scope="module")
def tiny_export(checkpoints, tmp_path_factory):
    from dgport.exporters.export import ExportOptions, export

    folder = tmp_path_factory.mktemp("serve-schema") / "tiny"
    export(checkpoints["tiny"], folder, ExportOptions(formats=("onnx",), validate=False))
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_export):
    srv = ServerProcess(tiny_export, "--served-model-name", "tiny", "--max-batch", "4")
    srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tiny_gen(tiny_export):
    import dgport

    return dgport.load(tiny_export, backend="cpu")


def ask(srv, schema, seed, strict=True, **kw):
    return srv.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                              seed=seed, response_format=fmt(schema, strict), **kw)


@pytest.mark.parametrize("strict", [True, False])
def test_json_schema_answers_validate_and_equal_the_api(tiny, tiny_gen, strict):
    for seed in (0, 1, 2):
        resp = ask(tiny, USER, seed, strict)
        content = resp.choices[0].message.content
        jsonschema.validate(json.loads(content), USER)
        assert content == tiny_gen.generate(PROMPT, json_schema=USER, seed=seed).text
        assert resp.choices[0].finish_reason == "stop"


def test_the_openai_clients_parse_with_a_pydantic_model(tiny):
    from pydantic import BaseModel

    class Point(BaseModel):
        x: float
        y: float
        label: str

    resp = tiny.client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                              response_format=Point, seed=3)
    assert isinstance(resp.choices[0].message.parsed, Point)


def test_streaming_equals_the_whole_answer(tiny):
    whole = ask(tiny, USER, 7).choices[0].message.content
    stream = ask(tiny, USER, 7, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole


def test_concurrent_requests_with_different_schemas_share_a_batch(tiny, tiny_gen):
    jobs = [(USER, 10), (POINTS, 11), (None, 12), (USER, 13), (POINTS, 14)]
    results = {}

    def one(i, schema, seed):
        msgs = [{"role": "user", "content": PROMPT}]
        kw = {"response_format": fmt(schema)} if schema else {"max_tokens": 16}
        results[i] = tiny.client.chat.completions.create(model="tiny", messages=msgs, seed=seed, **kw)

    threads = [threading.Thread(target=one, args=(i, s, seed)) for i, (s, seed) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (schema, seed) in enumerate(jobs):
        if schema is None:
            continue
        content = results[i].choices[0].message.content
        jsonschema.validate(json.loads(content), schema)
        assert content == tiny_gen.generate(PROMPT, json_schema=schema, seed=seed).text


@pytest.mark.parametrize("extra, param, says", [
    ({"response_format": {"type": "json_object"}}, "response_format.type", "schema"),
    ({"response_format": fmt({"type": "string", "pattern": "^a"})}, "response_format.json_schema.schema",
     "'pattern'"),
    ({"response_format": fmt({"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                              "$ref": "#/$defs/n"})}, "response_format.json_schema.schema", "recursive"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     '"schema"'),
    ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    ({"response_format": fmt(USER), "template": ["a", {"hole": 2}]}, "template", "one of them"),
    ({"response_format": fmt(USER), "stop": ["}"]}, "stop", "drop stop"),
    ({"response_format": fmt(USER), "max_tokens": 3}, "max_tokens", "more than max_tokens=3"),
    ({"response_format": fmt(USER), "reasoning_effort": "high"}, "response_format", "thinking"),
])
def test_bad_response_formats_get_400_naming_the_field(tiny, extra, param, says):
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], **extra}
    r = httpx.post(tiny.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err


def test_text_response_format_is_the_plain_answer(tiny):
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "seed": 1, "max_tokens": 16}
    a = httpx.post(tiny.url + "/v1/chat/completions", json=body, timeout=60).json()
    b = httpx.post(tiny.url + "/v1/chat/completions", json={**body, "response_format": {"type": "text"}},
                   timeout=60).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]


def test_the_one_request_engine_answers_the_same(tiny_export, tiny_gen):
    """--max-batch 1 runs each request through Generator.generate (the single-row path) instead of rows."""
    srv = ServerProcess(tiny_export, "--served-model-name", "tiny", "--max-batch", "1")
    try:
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        for seed in (0, 5):
            content = ask(srv, USER, seed).choices[0].message.content
            assert content == tiny_gen.generate(PROMPT, json_schema=USER, seed=seed).text
        plain = srv.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                                   seed=1, max_tokens=16).choices[0].message.content
        assert plain == tiny_gen.generate(PROMPT, seed=1, max_new_tokens=16).text
    finally:
        srv.stop()
