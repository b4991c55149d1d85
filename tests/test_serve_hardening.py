"""`dgport serve`, second hardening pass: the event loop never stalls, only this machine's pages can
drive a loopback server, shutdown and disconnects are clean, and the OpenAI contract holds as clients
read it (max_tokens is a hard cap). Real servers run in their own process (bench.serve_process);
every wait is on the server's state (/health's `busy`, `waiting`, a stream's first draft), never on
a fixed sleep."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from bench.serve_process import ServerProcess, free_port, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PUZZLE = ".741......3.67.5.22.53..47..1....8....842.163356..8.2....83..466...9.21.1..24.357"
PUZZLE2 = "..9..351....8..9.....75.6..1....2.539.3475.6.785......658.9147.41726..9..92..718."
LONG = {"max_denoising_steps": 3000, "stability_threshold": 1000}  # >= 1001 steps a canvas: held until closed
JSON = {"Content-Type": "application/json"}


def chat_body(content=PUZZLE, **kw) -> dict:
    return {"model": kw.pop("model", "m"), "messages": [{"role": "user", "content": content}], **kw}


def hold(url: str, model: str, **extra):
    """A streaming LONG request (a draft chunk per step); returns once its headers arrived."""
    client = httpx.Client(timeout=120)
    body = chat_body(model=model, seed=0, stream=True, stream_drafts=True, **LONG, **extra)
    r = client.send(client.build_request("POST", url + "/v1/chat/completions", json=body), stream=True)
    assert r.status_code == 200, r.read()
    r.lines = r.iter_lines()
    return r, client


def first_draft(r) -> None:
    for line in r.lines:
        if "dgport_draft" in line:
            return
    raise AssertionError("the stream ended before its first draft")


def rest_of(r) -> list[str]:
    """The remaining `data:` payloads of a stream, up to and including [DONE]."""
    return [line[6:] for line in r.lines if line.startswith("data: ")]


@pytest.fixture(scope="module")
def export():
    from dgport.default_model import ensure_default_export

    return ensure_default_export("cpu")


@pytest.fixture(scope="module")
def srv(export):
    """No --served-model-name: the model id is the export folder's name."""
    s = ServerProcess(export, "--allow-host", "dgport.test", "--max-queue", "4")
    s.model = Path(export).name
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gen(export):
    import dgport

    return dgport.load(export, backend="cpu")


def idle(s: ServerProcess) -> None:
    wait_for(lambda: (lambda h: not h["busy"] and h["waiting"] == 0)(s.health()), "an idle server")


# ---------------------------------------------------------------------------------------------
# 1. The server never stalls


def test_health_answers_while_a_4mb_body_is_tokenized(srv):
    """A 4 MB completions prompt takes seconds to tokenize (then it is refused: it cannot fit the
    context). Meanwhile /health keeps answering: its slowest poll is far below the request's time."""
    prompt = "1 2 3 4 5 6 7 8 9 " * ((4 << 20) // 18 - 20)
    body = json.dumps({"model": srv.model, "prompt": prompt}).encode()
    assert len(body) < 4 << 20
    out = {}

    def big():
        t0 = time.perf_counter()
        out["r"] = httpx.post(srv.url + "/v1/completions", content=body, headers=JSON, timeout=300)
        out["s"] = time.perf_counter() - t0

    t = threading.Thread(target=big)
    t.start()
    latencies = []
    with httpx.Client(timeout=300) as c:
        while t.is_alive():
            t0 = time.perf_counter()
            assert c.get(srv.url + "/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
    t.join()
    r = out["r"]
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    assert len(latencies) >= 5, (latencies, out["s"])
    assert max(latencies) < out["s"] / 4, (max(latencies), out["s"])


def test_health_answers_while_a_generation_runs(srv):
    r, c = hold(srv.url, srv.model)
    try:
        first_draft(r)
        latencies = []
        with httpx.Client(timeout=60) as h:
            for _ in range(40):
                t0 = time.perf_counter()
                assert h.get(srv.url + "/health").json()["busy"] is True
                latencies.append(time.perf_counter() - t0)
        assert statistics.median(latencies) < 0.1, latencies
    finally:
        r.close()
        c.close()
    idle(srv)


def test_parsing_planning_and_text_run_off_the_event_loop(export, monkeypatch):
    """Structural: the JSON parse and validation, the planning (template, tokenizer) and every
    TextStream call run on worker threads, never on the thread that runs the event loop."""
    import dgport
    import dgport.serve.app as app_module
    from dgport.serve import ServeConfig, TextStream, create_app

    seen: dict[str, set] = {}

    def spy(name, fn):
        def wrapper(*a, **k):
            seen.setdefault(name, set()).add(threading.current_thread())
            return fn(*a, **k)
        return wrapper

    for name in ("parse_body", "plan_chat", "plan_completion"):
        monkeypatch.setattr(app_module, name, spy(name, getattr(app_module, name)))
    for name in ("add", "deltas", "text"):
        monkeypatch.setattr(TextStream, name, spy(name, getattr(TextStream, name)))
    app = create_app(dgport.load(export, backend="cpu"), ServeConfig(model_id="m", backend="cpu", fingerprint="f"))

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as c:
            r1 = await c.post("/v1/chat/completions", json=chat_body(seed=1, max_tokens=82))
            r2 = await c.post("/v1/completions", json={"model": "m", "prompt": PUZZLE2, "seed": 2, "stream": True,
                                                       "max_tokens": 82, "stop": ["zz"]})
            return r1, r2, threading.current_thread()

    try:
        r1, r2, loop_thread = asyncio.run(main())
    finally:
        app.state.engine.close()
    assert r1.status_code == 200 and r2.status_code == 200 and "[DONE]" in r2.text
    for name in ("parse_body", "plan_chat", "plan_completion", "add", "deltas", "text"):
        assert seen.get(name) and loop_thread not in seen[name], (name, seen.get(name))


def test_stop_string_search_is_linear(gen):
    """The characters str.find scans over a whole answer grow linearly with its length: each delta
    searches its new text plus the longest stop's length - 1 of overlap (counted with a profiler,
    which sees every str.find call and the string it scans)."""
    from dgport.serve import TextStream

    tok = gen.tokenizer
    piece = tok.encode("1 2 3 4 5 6 7 8 9 ")
    stops = ["@@@", "9 1 2 3 4 5 6 7 8 9 9"]  # never in the text

    def scanned(n: int) -> tuple[int, int]:
        stream = TextStream(tok, gen.defaults.pad_token_id, chat=False, stop=stops)
        chars = [0]

        def prof(frame, event, arg):
            if event == "c_call" and getattr(arg, "__name__", "") in ("find", "index", "rfind", "rindex") \
                    and isinstance(getattr(arg, "__self__", None), str):
                chars[0] += len(arg.__self__)

        sys.setprofile(prof)
        try:
            for _ in range(n):
                stream.add(piece)
                stream.deltas()
        finally:
            sys.setprofile(None)
        return chars[0], len(stream.text()[0])

    work, length = scanned(400)
    assert work > 0, "no str.find call seen: the stop strings were not searched"
    longest = max(len(s) for s in stops)
    assert work <= len(stops) * (length + 400 * longest), (work, length)
    # and a stop string split across two deltas is still found
    stream = TextStream(tok, gen.defaults.pad_token_id, chat=False, stop=["3 4 5"])
    stream.add(tok.encode("1 2 3 "))
    assert stream.deltas() == ("1 2 ", "")  # "3 " may start the stop string: held back
    stream.add(tok.encode("4 5 6"))
    assert stream.deltas() == ("", "") and stream.stopped


def test_prompt_encoding_off_the_loop_equals_the_tokenizer(gen):
    """plan.encode releases the GIL (tokenizers' encode_batch) and gives the tokenizer's own ids."""
    from dgport.serve.plan import encode

    tok = gen.tokenizer
    for text in ("", " ", PUZZLE, "<bos>" + PUZZLE, "héllo\nwörld", "1 2 3" * 50):
        assert encode(tok, text, raw=False) == tok.encode(text)
        assert encode(tok, text, raw=True) == tok.encode_raw(text)


# ---------------------------------------------------------------------------------------------
# 2. Only this machine's pages can drive a loopback server


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:9", "localhost", "LOCALHOST:8000", "localhost.",
                                  "[::1]", "[::1]:8000", "dgport.test", "Dgport.Test:1", "10.1.2.3:80"])
def test_host_header_accepted(srv, host):
    r = httpx.get(srv.url + "/health", headers={"Host": host})
    assert r.status_code == 200, (host, r.text)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io",
                                  "dgport.test.evil", "[::1", "::1", "a b", "localhost:x"])
def test_host_header_refused(srv, host):
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        r = httpx.request(method, srv.url + path, headers={"Host": host, **JSON},
                          content=json.dumps(chat_body(model=srv.model)))
        assert r.status_code == 421, (host, path, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == "host_not_allowed" and "--allow-host" in err["message"] and "\n" not in r.text


def test_host_rule():
    from dgport.serve.guard import allowed_hosts, host_allowed

    local = allowed_hosts("127.0.0.1", ())
    assert host_allowed("localhost:80", local) and host_allowed("[::1]", local) and host_allowed("192.0.2.1", local)
    assert not host_allowed("example.com", local) and not host_allowed("", local)
    named = allowed_hosts("myhost.lan", ("api.example",))
    assert host_allowed("myhost.lan:8000", named) and host_allowed("API.example", named)
    anyhost = allowed_hosts("0.0.0.0", ("*",))
    assert anyhost is None and host_allowed("whatever.example", anyhost)
    assert not host_allowed("whatever.example", allowed_hosts("0.0.0.0", ()))


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                   "application/json; charset=latin-1", "application/jsonx", "text/json"])
def test_post_needs_json_content_type(srv, ctype):
    body = json.dumps(chat_body(model=srv.model, seed=1)).encode()
    headers = {"Content-Type": ctype} if ctype else {}
    r = httpx.post(srv.url + "/v1/chat/completions", content=body, headers=headers, timeout=60)
    assert r.status_code == 415, (ctype, r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "application/json" in err["message"]


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8",
                                   "Application/JSON;charset=UTF-8"])
def test_json_content_type_accepted(srv, ctype):
    body = json.dumps({"model": srv.model, "prompt": PUZZLE, "seed": 1, "max_tokens": 82}).encode()
    r = httpx.post(srv.url + "/v1/completions", content=body, headers={"Content-Type": ctype}, timeout=60)
    assert r.status_code == 200, r.text


def test_no_absolute_path_in_any_response(srv, export):
    """The model id is the export folder's name; no response carries a path of this machine."""
    secrets = {str(export), str(Path(export).resolve()), str(ROOT), str(Path.home())}
    bodies = [httpx.get(srv.url + "/health").text, httpx.get(srv.url + "/v1/models").text,
              httpx.get(srv.url + "/v1/models/" + srv.model).text,
              httpx.get(srv.url + "/v1/models/" + str(export)).text,
              httpx.post(srv.url + "/v1/chat/completions", json=chat_body(model=srv.model, seed=1)).text,
              httpx.post(srv.url + "/v1/chat/completions", json=chat_body(model=str(export))).text,
              httpx.post(srv.url + "/v1/chat/completions", json=chat_body(content="nope", model=srv.model)).text]
    assert httpx.get(srv.url + "/health").json()["model"] == Path(export).name
    for text in bodies:
        for s in secrets:
            assert s not in text, (s, text)


def test_served_model_name_rule(tmp_path):
    from dgport.serve.command import served_name

    assert served_name(str(tmp_path / "my-export"), None) == "my-export"
    assert served_name(str(tmp_path) + "/my-export/", None) == "my-export"
    assert served_name("google/some-model", None) == "google/some-model"
    assert served_name(None, None) == "sudoku"
    assert served_name(str(tmp_path), "mine") == "mine"


def test_error_messages_are_redacted():
    from dgport.serve.app import Redactor

    home = str(Path.home())
    red = Redactor(["/srv/models/x-export", home])
    assert red("failed to open /srv/models/x-export/model.onnx") == "failed to open x-export/model.onnx"
    assert red(f"cache {home}/.cache/dgport") == "cache ~/.cache/dgport"


# ---------------------------------------------------------------------------------------------
# 3. Shutdown and disconnects are clean


@pytest.mark.parametrize("max_batch", [1, 2])
def test_sigterm_answers_queued_and_streaming_requests_then_exits_0(export, max_batch):
    """A full batch running (--max-batch of them), one stream and one plain request queued behind it."""
    s = ServerProcess(export, "--served-model-name", "m", "--max-queue", "4", "--max-batch", str(max_batch))
    held = []
    try:
        for _ in range(max_batch):
            held.append(hold(s.url, "m"))
            first_draft(held[-1][0])
        held.append(hold(s.url, "m"))  # queued
        out = {}

        def plain():
            out["r"] = httpx.post(s.url + "/v1/chat/completions", json=chat_body(model="m", seed=3), timeout=120)

        t = threading.Thread(target=plain)
        t.start()
        wait_for(lambda: s.health()["waiting"] == 2, "two queued requests")
        s.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        for r, _ in held:
            data = rest_of(r)
            assert data[-1] == "[DONE]", data[-3:]
            err = json.loads(data[-2])["error"]
            assert err["code"] == "server_shutting_down" and "shutting down" in err["message"], data[-2]
        t.join(timeout=60)
        r = out["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down", r.text
        assert s.proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 10
    finally:
        log = s.stop()
        for _, c in held:
            c.close()
    assert "Traceback" not in log and "Error" not in log, log


def test_client_that_drops_mid_body_leaves_no_traceback(export):
    s = ServerProcess(export, "--served-model-name", "m")
    try:
        before = s.output().strip().splitlines()
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", s.port)) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":")
        assert httpx.post(s.url + "/v1/chat/completions", json=chat_body(model="m", seed=1),
                          timeout=60).status_code == 200
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=30) == 0  # every connection handled, all output written
    finally:
        log = s.stop()
    extra = log.strip().splitlines()[len(before):]
    dropped = [line for line in extra if line.startswith("dgport serve: POST /v1/chat/completions 400 ")]
    other = [line for line in extra if not re.match(r"dgport serve: (GET|POST) \S+ \d+( \d+ tokens)? \d+ ms$", line)]
    # each client that dropped is its request's one access-log line (test_serve_log), nothing more
    assert "Traceback" not in log and len(dropped) == 2 and len(other) <= 1, log


# ---------------------------------------------------------------------------------------------
# 4. The OpenAI contract as clients read it


def _answer_text(gen, ids) -> str:
    from dgport.serve import TextStream

    stream = TextStream(gen.tokenizer, gen.defaults.pad_token_id, chat=True, stop=[])
    stream.add(ids)
    return stream.text()[0]


def test_max_tokens_is_a_hard_cap(srv, gen):
    url = srv.url + "/v1/chat/completions"
    whole = httpx.post(url, json=chat_body(model=srv.model, seed=7, max_tokens=82, return_token_ids=True),
                       timeout=60).json()
    ids = whole["choices"][0]["token_ids"]
    assert len(ids) > 5 and whole["choices"][0]["finish_reason"] == "stop"  # it ends on EOS in one canvas
    for field in ("max_tokens", "max_completion_tokens"):
        cut = httpx.post(url, json=chat_body(model=srv.model, seed=7, return_token_ids=True, **{field: 5}),
                         timeout=60).json()
        choice = cut["choices"][0]
        assert choice["token_ids"] == ids[:5] and cut["usage"]["completion_tokens"] == 5
        assert choice["finish_reason"] == "length" and choice["message"]["content"] == _answer_text(gen, ids[:5])
        assert cut["usage"]["total_tokens"] == cut["usage"]["prompt_tokens"] + 5
    exact = httpx.post(url, json=chat_body(model=srv.model, seed=7, max_tokens=len(ids), return_token_ids=True),
                       timeout=60).json()
    assert exact["choices"][0]["token_ids"] == ids and exact["choices"][0]["finish_reason"] == "stop"
    # streaming: the same cut, in the deltas, the final chunk and the usage chunk
    body = chat_body(model=srv.model, seed=7, max_tokens=5, stream=True, return_token_ids=True,
                     stream_options={"include_usage": True})
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == _answer_text(gen, ids[:5])
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["choices"][0]["finish_reason"] == "length"
    assert final[0]["choices"][0]["token_ids"] == ids[:5] and chunks[-1]["usage"]["completion_tokens"] == 5
    # completions too
    comp = httpx.post(srv.url + "/v1/completions", json={"model": srv.model, "prompt": whole["prompt_token_ids"],
                                                         "seed": 7, "max_tokens": 3, "return_token_ids": True},
                      timeout=60).json()
    assert comp["choices"][0]["token_ids"] == ids[:3] and comp["usage"]["completion_tokens"] == 3
    assert comp["choices"][0]["finish_reason"] == "length"
    assert comp["choices"][0]["text"] == gen.tokenizer.decode(comp["choices"][0]["token_ids"])


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streaming_sends_prompt_token_ids_in_the_first_chunk(srv, path):
    if "chat" in path:
        body = chat_body(model=srv.model, seed=2, max_tokens=82, return_token_ids=True)
    else:
        body = {"model": srv.model, "prompt": PUZZLE2, "seed": 2, "max_tokens": 82, "return_token_ids": True}
    whole = httpx.post(srv.url + path, json=body, timeout=60).json()
    with httpx.stream("POST", srv.url + path, json={**body, "stream": True}, timeout=60) as r:
        first = next(json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))
    assert first["prompt_token_ids"] == whole["prompt_token_ids"]


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": " \n\t"}],
    [{"role": "user", "content": [{"type": "text", "text": "  "}]}],
    [{"role": "user", "content": []}],
    [{"role": "user", "content": None}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": ""}],
    [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}, {"role": "user", "content": PUZZLE}],
])
def test_empty_user_message_gets_400(srv, messages):
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": srv.model, "messages": messages}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "empty" in err["message"] and err["param"].startswith("messages["), err


# ---------------------------------------------------------------------------------------------
# 5. `python -m dgport.serve` errors are one line


def _start(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dgport.serve", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, **(env or {})})


def _one_line(r, says: str) -> None:
    assert r.returncode != 0, r.stderr
    assert r.stderr.startswith("dgport: error: ") and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.fixture()
def busy_port():
    """A port in use: a check that is missing ends in 'cannot listen' instead of a server that runs."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield str(busy.getsockname()[1])


@pytest.mark.parametrize("key, says", [(" k", "--api-key has leading or trailing whitespace"),
                                       ("k\n", "--api-key has leading or trailing whitespace"),
                                       ("a key", "--api-key must be printable ASCII without spaces"),
                                       ("k\u00e9y", "--api-key must be printable ASCII without spaces")])
def test_api_key_with_whitespace_is_refused_at_start(export, busy_port, key, says):
    _one_line(_start(str(export), "--port", busy_port, "--api-key", key), says)
    r = _start(str(export), "--port", busy_port, env={"DGPORT_API_KEY": key})
    _one_line(r, says.replace("--api-key", "DGPORT_API_KEY"))


def test_start_errors_are_one_line(export, tmp_path, busy_port):
    _one_line(_start(str(tmp_path / "missing"), "--port", str(free_port())), "no such folder")
    for bad in ("a b", "http://x.example", "x.example:80", "", "-x.example", "a..b", "*.example"):
        _one_line(_start(str(export), "--port", busy_port, "--allow-host", bad), "is not a host name")
    _one_line(_start(str(export), "--port", busy_port, "--served-model-name", " "), "--served-model-name")
    _one_line(_start(str(export), "--port", busy_port), f"cannot listen on 127.0.0.1:{busy_port}")
