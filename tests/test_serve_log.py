"""`dgport serve` as an operator reads it: one log line per request (method, route, status, tokens,
milliseconds; never the prompt or the answer), `--debug`, draft steps counted like the CLI's, and
undecodable text refused with a 400."""
from __future__ import annotations

import json
import re

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from bench.serve_process import ServerProcess  # noqa: E402

PUZZLE = ".741......3.67.5.22.53..47..1....8....842.163356..8.2....83..466...9.21.1..24.357"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def export():
    from dgport.default_model import ensure_default_export

    return ensure_default_export("cpu")


def chat(content=PUZZLE, **kw) -> dict:
    return {"model": "sudoku", "messages": [{"role": "user", "content": content}], **kw}


def test_one_log_line_per_request_without_the_prompt(export):
    server = ServerProcess(export, "--served-model-name", "sudoku", "--debug")
    try:
        ok = httpx.post(server.url + "/v1/chat/completions", json=chat(seed=0, max_tokens=50))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 50
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat(seed=1, stream=True)) as r:
            answer = "".join(r.iter_lines())
        bad = httpx.post(server.url + "/v1/chat/completions", json=chat(seed=0, temperature=0.5))
        assert bad.status_code == 400
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        out = server.stop()
    lines = [line for line in out.splitlines() if line.startswith("dgport serve: ") and " ms" in line]
    lines = lines[next(i for i, line in enumerate(lines) if "POST" in line):]  # after the start-up polls
    assert re.search(r"^dgport serve: POST /v1/chat/completions 200 50 tokens \d+ ms$", lines[0], re.M), lines
    assert re.search(r"^dgport serve: POST /v1/chat/completions 200 \d+ tokens \d+ ms$", lines[1]), lines
    assert re.search(r"^dgport serve: POST /v1/chat/completions 400 \d+ ms$", lines[2]), lines
    assert re.search(r"^dgport serve: GET /health 200 \d+ ms$", lines[3]), lines
    assert PUZZLE not in out and "Traceback" not in out
    digits = re.findall(r"[1-9]{81}", answer)  # the streamed answer never reaches the log either
    assert all(d not in out for d in digits)


def test_drafts_count_from_one_and_bad_text_gets_400(export):
    server = ServerProcess(export, "--served-model-name", "sudoku")
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions",
                          json=chat(seed=0, stream=True, stream_drafts=True)) as r:
            drafts = [json.loads(line[6:])["dgport_draft"] for line in r.iter_lines()
                      if line.startswith("data: {") and "dgport_draft" in line]
        assert [d["step"] for d in drafts] == list(range(1, len(drafts) + 1)) and drafts[0]["canvas"] == 1
        for body in ('{"model": "sudoku", "messages": [{"role": "user", "content": "a\\ud800b"}]}'.encode(),
                     b'{"model": "sudoku", "messages": [{"role": "user", "content": "a\xffb"}]}',
                     '{"model": "sudoku", "prompt": "a\\udcffb"}'.encode()):
            route = "/v1/completions" if b"prompt" in body else "/v1/chat/completions"
            r = httpx.post(server.url + route, content=body, headers=JSON)
            error = r.json()["error"]
            assert r.status_code == 400 and "\n" not in error["message"], r.text
            assert "UTF-8" in error["message"] or "not valid JSON" in error["message"], r.text
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
    finally:
        server.stop()
