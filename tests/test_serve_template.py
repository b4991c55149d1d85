"""`dgport serve` with canvas templates: the `template` field on both routes, `/v1/completions`
`suffix` (in-filling), `dgport_holes`, streaming, the 400s, and the cache after a templated answer.
Real servers in their own process (bench.serve_process): the shipped Sudoku model and a byte-level
fixture (random weights: its holes are noise, its tokens are exact). Every answer is checked token for
token against Generator.generate(prompt_ids, seed=S, template=...)."""
from __future__ import annotations

import json
import re
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from bench.serve_process import ServerProcess, wait_for  # noqa: E402
from dgport import Template  # noqa: E402

PUZZLES = [
    ".741......3.67.5.22.53..47..1....8....842.163356..8.2....83..466...9.21.1..24.357",
    "..9..351....8..9.....75.6..1....2.539.3475.6.785......658.9147.41726..9..92..718.",
]
JSON_TEMPLATE = ['{"name": "', {"hole": 8}, '", "age": ', {"hole": 3}, "}"]  # 32 positions: 2 canvases of 16
PROMPT = "Describe a user as JSON."


def sudoku_template(puzzle: str) -> list:
    return [{"hole": 1} if ch == "." else ch for ch in puzzle]


def expected(gen, prompt_ids, seed, template: Template):
    """Generator.generate's result, and the answer's ids as the server reports them: the template's
    positions, PAD dropped (not the EOS and PAD the loop writes after the template's end)."""
    ref = gen.generate(prompt_ids, seed=seed, template=template)
    length = template.layout(gen.tokenizer).length
    return ref, [t for t in ref.token_ids[0][:length] if t != 0]


@pytest.fixture(scope="module")
def sudoku_export():
    from dgport.default_model import ensure_default_export

    return ensure_default_export("cpu")


@pytest.fixture(scope="module")
def tiny_export(checkpoints, tmp_path_factory):
    from dgport.exporters.export import ExportOptions, export

    folder = tmp_path_factory.mktemp("serve-template") / "tiny"
    export(checkpoints["tiny"], folder, ExportOptions(formats=("onnx",), validate=False))
    return folder


@pytest.fixture(scope="module")
def sudoku(sudoku_export):
    srv = ServerProcess(sudoku_export, "--served-model-name", "sudoku")
    srv.model = "sudoku"
    srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tiny(tiny_export):
    srv = ServerProcess(tiny_export, "--served-model-name", "tiny")
    srv.model = "tiny"
    srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def sudoku_gen(sudoku_export):
    import dgport

    return dgport.load(sudoku_export, backend="cpu")


@pytest.fixture(scope="module")
def tiny_gen(tiny_export):
    import dgport

    return dgport.load(tiny_export, backend="cpu")


def chat(srv, content, **kw):
    return srv.client.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": content}], **kw)


def post(srv, route: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + route, json=body, timeout=120)


def stream_chunks(srv, route: str, body: dict) -> list[dict]:
    with httpx.stream("POST", srv.url + route, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


# ---------------------------------------------------------------------------------------------
# the shipped Sudoku model: every given fixed, a one-position hole per blank


def test_sudoku_chat_template_keeps_every_given_with_the_apis_tokens(sudoku, sudoku_gen):
    for puzzle, seed in zip(PUZZLES, (3, 8)):
        tmpl = Template.from_json(sudoku_template(puzzle))
        resp = chat(sudoku, puzzle, seed=seed,
                    extra_body={"template": sudoku_template(puzzle), "return_token_ids": True})
        ref, ids = expected(sudoku_gen, resp.prompt_token_ids, seed, tmpl)
        assert resp.prompt_token_ids == sudoku_gen.prompt_ids(puzzle)  # the chat prompt, as generate renders it
        choice = resp.choices[0]
        assert choice.message.content == ref.text and choice.dgport_holes == ref.holes
        assert choice.token_ids == ids and resp.usage.completion_tokens == len(ids)
        assert choice.finish_reason == "stop" and len(choice.dgport_holes) == puzzle.count(".")
        grid = "".join(choice.message.content.split())
        assert len(grid) >= 81 and all(q == "." or q == a for q, a in zip(puzzle, grid))  # every given kept


def test_sudoku_completions_template(sudoku, sudoku_gen):
    puzzle = PUZZLES[1]
    resp = sudoku.client.completions.create(model="sudoku", prompt=puzzle, seed=5, extra_body={
        "template": sudoku_template(puzzle), "return_token_ids": True})
    ref, ids = expected(sudoku_gen, resp.prompt_token_ids, 5, Template.from_json(sudoku_template(puzzle)))
    assert resp.prompt_token_ids == sudoku_gen.prompt_ids(puzzle, raw=True)
    assert (resp.choices[0].text, resp.choices[0].dgport_holes, resp.choices[0].token_ids) == (ref.text, ref.holes, ids)
    assert resp.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------
# a byte-level fixture: JSON keys fixed, values in holes


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_json_template_holes_and_tokens_equal_the_api(tiny, tiny_gen, route):
    seed = 11
    extra = {"template": JSON_TEMPLATE, "return_token_ids": True}
    if route == "chat":
        resp = chat(tiny, PROMPT, seed=seed, extra_body=extra)
        content = resp.choices[0].message.content
    else:
        resp = tiny.client.completions.create(model="tiny", prompt=PROMPT, seed=seed, extra_body=extra)
        content = resp.choices[0].text
    ref, ids = expected(tiny_gen, resp.prompt_token_ids, seed, Template.from_json(JSON_TEMPLATE))
    holes = resp.choices[0].dgport_holes
    assert holes == ref.holes and resp.choices[0].token_ids == ids
    assert content.startswith('{"name": "') and content.endswith("}")
    assert content == '{"name": "' + holes[0] + '", "age": ' + holes[1] + "}" == ref.text
    assert resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens == len(ids) <= 32
    assert resp.dgport["steps_per_canvas"] == ref.steps_per_canvas


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_streaming_equals_non_streaming(tiny, route):
    body = {"model": "tiny", "seed": 4, "template": JSON_TEMPLATE, "return_token_ids": True,
            **({"messages": [{"role": "user", "content": PROMPT}]} if "chat" in route else {"prompt": PROMPT})}
    whole = post(tiny, route, body).json()["choices"][0]
    chunks = stream_chunks(tiny, route, {**body, "stream_options": {"include_usage": True}})
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    if "chat" in route:
        text, content = "".join(c["delta"].get("content") or "" for c in choices), whole["message"]["content"]
    else:
        text, content = "".join(c["text"] for c in choices), whole["text"]
    assert text == content
    final = [c for c in choices if c["finish_reason"]]
    assert len(final) == 1 and final[0]["finish_reason"] == "stop"
    assert final[0]["dgport_holes"] == whole["dgport_holes"] and final[0]["token_ids"] == whole["token_ids"]
    assert chunks[-1]["usage"]["completion_tokens"] == len(whole["token_ids"])


def test_suffix_is_in_filling_and_returns_the_inserted_text(tiny, tiny_gen):
    """As OpenAI's legacy completions: the text is what goes between the prompt and the suffix."""
    prefix, suffix = "def add(a, b):\n    return", "\n\nprint(add(2, 3))"
    resp = tiny.client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=12, seed=2,
                                          extra_body={"return_token_ids": True})
    ref, _ = expected(tiny_gen, resp.prompt_token_ids, 2, Template.infill(suffix, 12))
    choice = resp.choices[0]
    assert choice.text == choice.dgport_holes[0] == ref.holes[0] and ref.text == ref.holes[0] + suffix
    assert choice.token_ids == [t for t in ref.token_ids[0][:12] if t != 0] and choice.finish_reason == "stop"
    assert resp.usage.completion_tokens == len(choice.token_ids)
    assert resp.prompt_token_ids == tiny_gen.prompt_ids(prefix, raw=True)
    stream = tiny.client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=12, seed=2,
                                            stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == choice.text
    # without max_tokens the hole is one canvas
    default = tiny.client.completions.create(model="tiny", prompt=prefix, suffix=suffix, seed=2,
                                             extra_body={"return_token_ids": True})
    C = tiny_gen.config.canvas_length
    ref, _ = expected(tiny_gen, default.prompt_token_ids, 2, Template.infill(suffix, C))
    assert default.choices[0].text == ref.holes[0]


def test_max_tokens_at_the_templates_length_cuts_nothing(tiny):
    body = {"model": "tiny", "prompt": PROMPT, "seed": 4, "template": JSON_TEMPLATE}
    whole = post(tiny, "/v1/completions", body).json()
    capped = post(tiny, "/v1/completions", {**body, "max_tokens": 32}).json()  # the template's 32 tokens
    assert capped["choices"] == whole["choices"] and capped["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------------------
# what is refused: one line, OpenAI's shape, the field as `param`


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}]}
COMPLETION = {"model": "tiny", "prompt": PROMPT}


@pytest.mark.parametrize("extra, param, says", [
    ({"template": "{{hole:3}}"}, "template", "list"),
    ({"template": {"hole": 3}}, "template", "list"),
    ({"template": []}, "template", "non-empty"),
    ({"template": [1]}, "template", r"template\[0\]: a part is a string or \{\"hole\": N\}"),
    ({"template": ["a", None]}, "template", r"template\[1\]: a part is"),
    ({"template": ["a", ["b"]]}, "template", r"template\[1\]: a part is"),
    ({"template": [{"hole": 0}]}, "template", r"template\[0\]: a hole has 1 to 65536"),
    ({"template": [{"hole": 70000}]}, "template", r"template\[0\]: a hole has 1 to 65536"),
    ({"template": [{"hole": "3"}]}, "template", r"template\[0\]: a part is"),
    ({"template": [{"hole": True}]}, "template", r"template\[0\]: a part is"),
    ({"template": [{"hole": 2.0}]}, "template", r"template\[0\]: a part is"),
    ({"template": [{"hole": 2, "x": 1}]}, "template", r"template\[0\]: a part is"),
    ({"template": JSON_TEMPLATE, "max_tokens": 31}, "max_tokens", "needs 32 tokens, more than max_tokens=31"),
    ({"template": JSON_TEMPLATE, "max_completion_tokens": 5}, "max_completion_tokens", "max_completion_tokens=5"),
    ({"template": JSON_TEMPLATE, "stop": ["}"]}, "stop", "stop strings cannot be used"),
    ({"template": [{"hole": 16}] * 600}, "template", "context"),
])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_bad_templates_get_400(tiny, route, extra, param, says):
    r = post(tiny, route, {**(CHAT if "chat" in route else COMPLETION), **extra})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param, r.text
    assert "\n" not in error["message"] and error["type"] == "invalid_request_error"
    assert re.search(says, error["message"]), error["message"]


@pytest.mark.parametrize("body, param, says", [
    ({**COMPLETION, "template": JSON_TEMPLATE, "suffix": "}"}, "suffix", "send one of them"),
    ({**COMPLETION, "suffix": ""}, "suffix", "suffix is empty"),
    ({**COMPLETION, "suffix": "x", "max_tokens": 70000}, "max_tokens", "in-fill"),
    ({**COMPLETION, "suffix": "x", "stop": ["y"]}, "stop", "stop strings"),
    ({**CHAT, "template": JSON_TEMPLATE, "reasoning_effort": "high"}, "template", "thinking"),
    ({**CHAT, "template": JSON_TEMPLATE, "chat_template_kwargs": {"enable_thinking": True}}, "template", "thinking"),
    ({**CHAT, "suffix": "x"}, "suffix", "not supported"),  # chat has no suffix
])
def test_template_combinations_refused(tiny, body, param, says):
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = post(tiny, route, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert says in r.json()["error"]["message"]


def test_a_huge_template_is_refused_quickly_while_health_answers(tiny):
    """4 MB of one-position holes (380,000 parts): refused before it is parsed (parsing it into Python
    objects would hold the GIL, and so the event loop, for seconds), /health answering meanwhile. Then
    65,537 parts (parsed: more than a template may have) and 65,536 holes of 16 positions (past the
    context): each a 400 naming `template`."""
    raw = json.dumps({**COMPLETION, "template": [{"hole": 1}] * 380_000}, separators=(",", ":")).encode()
    assert len(raw) < 4 << 20
    out = {}

    def big():
        t0 = time.perf_counter()
        out["r"] = httpx.post(tiny.url + "/v1/completions", content=raw, timeout=120,
                              headers={"Content-Type": "application/json"})
        out["s"] = time.perf_counter() - t0

    t = threading.Thread(target=big)
    t.start()
    latencies = []
    with httpx.Client(timeout=120) as c:
        while t.is_alive():
            t0 = time.perf_counter()
            assert c.get(tiny.url + "/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
    t.join()
    r = out["r"]
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_complex", r.text[:300]
    assert "JSON values" in r.json()["error"]["message"] and out["s"] < 30, out
    assert max(latencies) < 1, latencies  # 2.6 s when the body was parsed (a 2-core box)
    for template, says, code in (([{"hole": 1}] * 65_537, "65537 parts, more than 65536", None),
                                 ([{"hole": 16}] * 65_536, "context", "context_length_exceeded"),
                                 (["ab"] * 65_535 + [{"hole": 1}], "context", "context_length_exceeded")):
        r = post(tiny, "/v1/completions", {**COMPLETION, "template": template})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "template" and error["code"] == code, r.text[:300]
        assert says in error["message"]


# ---------------------------------------------------------------------------------------------
# the cache after a templated answer


def test_a_templated_answer_is_never_continued_as_a_conversation(tiny, tiny_gen):
    first = chat(tiny, PROMPT, seed=6, extra_body={"template": JSON_TEMPLATE})
    messages = [{"role": "user", "content": PROMPT},
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And another one."}]
    nxt = tiny.client.chat.completions.create(model="tiny", messages=messages, seed=9, max_tokens=32,
                                              extra_body={"return_token_ids": True})
    assert nxt.usage.prompt_tokens_details.cached_tokens == 0
    tok = tiny_gen.tokenizer
    assert nxt.prompt_token_ids == tok.encode(tok.render(messages, enable_thinking=False))  # a fresh rendering
    fresh = tiny_gen.generate(nxt.prompt_token_ids, seed=9, max_new_tokens=32)
    assert nxt.choices[0].token_ids == [t for t in fresh.token_ids[0] if t != 0][:32]


def test_a_plain_request_after_a_templated_one_equals_a_fresh_run(tiny, tiny_gen):
    body = {**COMPLETION, "seed": 21, "max_tokens": 48, "return_token_ids": True}
    post(tiny, "/v1/completions", {**COMPLETION, "seed": 21, "template": JSON_TEMPLATE}).raise_for_status()
    after = post(tiny, "/v1/completions", body).json()
    fresh = tiny_gen.generate(after["prompt_token_ids"], seed=21, max_new_tokens=48)
    assert after["choices"][0]["token_ids"] == [t for t in fresh.token_ids[0] if t != 0][:48]
    wait_for(lambda: not tiny.health()["busy"], "an idle worker")


# ---------------------------------------------------------------------------------------------
# planning off the event loop


def test_template_planning_runs_off_the_event_loop_and_equals_template_layout(tiny_export, tiny_gen, monkeypatch):
    """The template is parsed and tokenized on a planning thread (one encode_batch call, which releases
    the GIL), into the layout Template.layout gives."""
    import asyncio

    import dgport
    import dgport.serve.plan as plan_module
    from dgport.serve import ServeConfig, create_app
    from dgport.serve import template_plan

    parts = ['{"a": "', {"hole": 3}, '"}<turn|>', "héllo", {"hole": 2}, "héllo"]
    tok = tiny_gen.tokenizer
    seen = {}
    real = plan_module.plan_template

    def spy(*a, **k):
        seen.setdefault("threads", set()).add(threading.current_thread())
        out = real(*a, **k)
        seen["layout"] = out[0]
        return out

    monkeypatch.setattr(plan_module, "plan_template", spy)
    app = create_app(dgport.load(tiny_export, backend="cpu"), ServeConfig(model_id="tiny", backend="cpu",
                                                                          fingerprint="f"))

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as c:
            r = await c.post("/v1/completions", json={**COMPLETION, "seed": 1, "template": parts})
            return r, threading.current_thread()

    try:
        r, loop_thread = asyncio.run(main())
    finally:
        app.state.engine.close()
    assert r.status_code == 200 and len(r.json()["choices"][0]["dgport_holes"]) == 2
    assert seen["threads"] and loop_thread not in seen["threads"]
    want = Template.from_json(parts).layout(tok)
    got = seen["layout"]
    assert got.ids.tolist() == want.ids.tolist() and got.fixed.tolist() == want.fixed.tolist()
    assert got.holes == want.holes
