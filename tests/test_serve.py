"""`dgport serve`: the real server (uvicorn in its own process, a free port on 127.0.0.1) on the
shipped Sudoku model, driven with the official `openai` client and raw httpx."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from bench.serve_process import ServerProcess, wait_for  # noqa: E402

KEY = "test-key"
PUZZLES = [  # held-out streams of the shipped model's puzzle generator (40 givens)
    ".741......3.67.5.22.53..47..1....8....842.163356..8.2....83..466...9.21.1..24.357",
    "..9..351....8..9.....75.6..1....2.539.3475.6.785......658.9147.41726..9..92..718.",
    "2....37.839.2.8...184.7...5.3...45215...614899.1..5.7..69.4...34..5...17.1.9..64.",
    "94..1872.2...7349..5329..185.7.4..3....7.9.8..38.....4....5..474.5...2.9379462...",
]
# the stability rule cannot stop it before step 1001: a request that lasts seconds even on a fast machine;
# the tests that send it hang up, which cancels it
LONG = {"max_denoising_steps": 3000, "stability_threshold": 1000}


def answer_ids(ids):
    """`dgport run`'s ids as the server reports them: whole canvases with PAD (0) after the first EOS
    there, the generated tokens without the PAD here (as vLLM reports them)."""
    return [t for t in ids if t != 0]


class Server(ServerProcess):
    def __init__(self, export: Path, *args: str):
        super().__init__(export, "--served-model-name", "sudoku", *args)


@pytest.fixture(scope="module")
def export():
    from dgport.default_model import ensure_default_export

    return ensure_default_export("cpu")


@pytest.fixture(scope="module")
def server(export):
    srv = Server(export, "--api-key", KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def gen(export):
    import dgport

    return dgport.load(export, backend="cpu")


def _run_json(export, *args) -> dict:
    from click.testing import CliRunner

    from dgport.cli import cli

    result = CliRunner().invoke(cli, ["run", str(export), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads([line for line in result.output.splitlines() if line.startswith("{")][-1])


def _chat(client, content, **kw):
    return client.chat.completions.create(model="sudoku", messages=[{"role": "user", "content": content}], **kw)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["sudoku"]
    health = httpx.get(server.url + "/health")  # open without a key (probes)
    assert health.status_code == 200 and health.json()["model"] == "sudoku"


def test_chat_tokens_equal_dgport_run(export, client):
    settings = {"max_denoising_steps": 20, "entropy_bound": 2.0}
    resp = _chat(client, PUZZLES[0], seed=3, extra_body={"return_token_ids": True, **settings})
    ref = _run_json(export, "--prompt", PUZZLES[0], "--seed", "3", "--max-denoising-steps", "20",
                    "--entropy-bound", "2.0")
    choice = resp.choices[0]
    assert choice.token_ids == answer_ids(ref["token_ids"])
    assert resp.prompt_token_ids == ref["prompt_ids"]
    assert choice.message.content == ref["text"]
    assert choice.finish_reason == ("stop" if ref["finished"] else "length")
    assert resp.usage.prompt_tokens == len(ref["prompt_ids"])
    assert resp.usage.completion_tokens == ref["generated_tokens"]
    assert resp.dgport["steps_per_canvas"] == ref["steps_per_canvas"]
    assert resp.system_fingerprint.startswith("dgport-") and resp.object == "chat.completion"


def test_streaming_chat_equals_non_streaming(client):
    whole = _chat(client, PUZZLES[1], seed=5)
    chunks = list(_chat(client, PUZZLES[1], seed=5, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # one content delta per committed canvas
    deltas = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert 1 <= len(deltas) <= len(whole.dgport["steps_per_canvas"])


def test_completions_raw_prompt_equals_dgport_run_raw(export, client):
    resp = client.completions.create(model="sudoku", prompt=PUZZLES[2], seed=11, max_tokens=82,
                                     extra_body={"return_token_ids": True})
    ref = _run_json(export, "--prompt", PUZZLES[2], "--raw", "--seed", "11", "--max-new-tokens", "82")
    assert resp.choices[0].token_ids == answer_ids(ref["token_ids"])
    assert resp.choices[0].text == ref["text"] and resp.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="sudoku", prompt=PUZZLES[2], seed=11, max_tokens=82, stream=True) if c.choices)
    assert streamed == ref["text"]


def test_stream_drafts_one_chunk_per_step(server):
    body = {"model": "sudoku", "messages": [{"role": "user", "content": PUZZLES[0]}], "seed": 1, "stream": True,
            "stream_drafts": True}
    drafts, final = [], None
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                data = json.loads(line[6:])
                if "dgport_draft" in data:
                    drafts.append(data["dgport_draft"])
                elif data["choices"] and data["choices"][0]["finish_reason"]:
                    final = data
    assert len(drafts) == sum(final["dgport"]["steps_per_canvas"]) and drafts[0]["step"] == 1 and drafts[0]["canvas"] == 1
    assert all(len(d["token_ids"]) == 82 for d in drafts)


def test_stop_string_ends_the_answer(client):
    whole = _chat(client, PUZZLES[0], seed=3).choices[0].message.content
    stop = whole[10:13]
    cut = whole[:whole.find(stop)]
    resp = _chat(client, PUZZLES[0], seed=3, stop=[stop])
    assert resp.choices[0].message.content == cut and resp.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in _chat(client, PUZZLES[0], seed=3, stop=stop,
                                                                      stream=True) if c.choices)
    assert streamed == cut


def test_thinking_fields(client):
    ok = _chat(client, PUZZLES[0], seed=0, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert ok.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="contradicts"):
        _chat(client, PUZZLES[0], extra_body={"reasoning_effort": "high",
                                              "chat_template_kwargs": {"enable_thinking": False}})
    with pytest.raises(openai.BadRequestError, match="only enable_thinking"):
        _chat(client, PUZZLES[0], extra_body={"chat_template_kwargs": {"tools": []}})


def test_thought_channel_goes_to_reasoning_content(gen):
    from dgport.serve import TextStream

    tok = gen.tokenizer
    ids = [100] + tok.encode("thought\nabc") + [101] + tok.encode("123")
    stream = TextStream(tok, gen.defaults.pad_token_id, chat=True, stop=[])
    stream.add(ids[:3])
    c1, r1 = stream.deltas()
    stream.add(ids[3:])
    c2, r2 = stream.deltas(final=True)
    assert (c1 + c2, r1 + r2) == ("123", "abc")


@pytest.mark.parametrize("kw, match", [
    ({"n": 2}, "n=2"),
    ({"temperature": 0.5}, "t_max"),
    ({"top_p": 0.9}, "top_p"),
    ({"extra_body": {"t_min": 0.9, "t_max": 0.1}}, "t_min"),
    ({"extra_body": {"max_denoising_steps": 0}}, "max_denoising_steps"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"extra_body": {"functions": [{"name": "f"}]}}, "`functions` is not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "maybe"}, "tool_choice"),
    ({"logprobs": True}, "logprobs"),
    ({"max_tokens": 2000}, "max_new_tokens"),
    ({"seed": 1 << 63}, "seed"),
    ({"max_tokens": 82, "extra_body": {"max_completion_tokens": 164}}, "disagree"),
    ({"extra_body": {"reasoning_effort": "extreme"}}, "reasoning_effort"),
    ({"stream_options": {"include_usage": True}}, "stream=true"),
])
def test_bad_fields_get_400(client, kw, match):
    with pytest.raises(openai.BadRequestError, match=match) as e:
        _chat(client, PUZZLES[0], **kw)
    assert e.value.status_code == 400 and e.value.body["message"]


def test_errors_in_openai_shape(server, client):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}  # raw bodies: say it is JSON
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"x" * (5 << 20), headers=auth)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    for field, value in (("t_min", "NaN"), ("t_max", "Infinity"), ("max_tokens", '"82"'), ("seed", "true"),
                         ("max_denoising_steps", "4.0")):
        raw = ('{"model": "sudoku", "messages": [{"role": "user", "content": "%s"}], "%s": %s}'
               % (PUZZLES[0], field, value)).encode()
        r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    r = httpx.get(server.url + "/v1/nothing", headers=auth)
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", headers=auth, json={
        "model": "sudoku", "messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]})
    assert r.status_code == 400 and "last message" in r.json()["error"]["message"]


def test_api_key(server):
    for key in ("wrong", KEY + "x"):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_client_disconnect_mid_stream_then_normal_request(server, client):
    before = server.health()["cancelled"]
    body = {"model": "sudoku", "messages": [{"role": "user", "content": PUZZLES[3]}], "seed": 2, "stream": True,
            "stream_drafts": True, **LONG}
    started = time.perf_counter()
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if "dgport_draft" in line:
                break  # the first draft canvas arrived: hang up
    expected = _chat(client, PUZZLES[0], seed=3).choices[0].message.content
    assert time.perf_counter() - started < 30
    wait_for(lambda: server.health()["cancelled"] != before, "the hung-up stream's cancellation")
    assert server.health()["cancelled"] == before + 1, server.health()
    again = _chat(client, PUZZLES[0], seed=3)
    assert again.choices[0].message.content == expected and again.choices[0].finish_reason
    # a non-streaming client that gives up is cancelled too: it hangs up once its request runs
    served = wait_for(lambda: (lambda h: not h["busy"] and h["served"])(server.health()), "an idle worker")
    raw = json.dumps({**body, "stream": False, "stream_drafts": False}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                     + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(raw)).encode() + b"\r\n\r\n" + raw)
        wait_for(lambda: server.health()["busy"], "the non-streaming request to run")
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)  # no answer yet: the client gives up on it
    wait_for(lambda: server.health()["cancelled"] != before + 1, "the non-streaming request's cancellation")
    assert server.health()["cancelled"] == before + 2, server.health()
    assert server.health()["served"] == served + 1
    assert _chat(client, PUZZLES[0], seed=3).choices[0].message.content == expected


def test_chat_continuation_reuses_the_cache_with_fresh_run_tokens(client, gen):
    first = _chat(client, PUZZLES[0], seed=4, extra_body={"return_token_ids": True})
    messages = [{"role": "user", "content": PUZZLES[0]},
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": PUZZLES[1]}]
    resp = client.chat.completions.create(model="sudoku", messages=messages, seed=9, max_tokens=82,
                                          extra_body={"return_token_ids": True})
    # as `dgport chat` continues: the first prompt and the model's own answer tokens are not encoded again
    answer = first.choices[0].token_ids
    answer = answer[:next(i for i, t in enumerate(answer) if t in gen.defaults.eos_token_ids)]
    assert resp.prompt_token_ids[:len(first.prompt_token_ids) + len(answer)] == first.prompt_token_ids + answer
    assert resp.usage.prompt_tokens_details.cached_tokens >= len(first.prompt_token_ids)
    assert resp.usage.prompt_tokens == len(resp.prompt_token_ids)
    # the same tokens as a fresh run (empty cache) on the same token stream and seed, encoded at the same
    # boundaries (the first prompt, then the rest: shorter than it here). Other boundaries give the same
    # cache up to fp32 rounding, which can flip a sampled token in a near tie on this small model.
    assert len(resp.prompt_token_ids) - len(first.prompt_token_ids) <= len(first.prompt_token_ids)
    fresh = gen.generate(resp.prompt_token_ids, seed=9, max_new_tokens=82, encode_chunk=len(first.prompt_token_ids))
    assert resp.choices[0].token_ids == answer_ids(fresh.token_ids[0])
    # a conversation whose history was edited is not continued
    edited = [dict(m) for m in messages]
    edited[1]["content"] = "1" * 81
    other = client.chat.completions.create(model="sudoku", messages=edited, seed=9, max_tokens=82,
                                           extra_body={"max_denoising_steps": 8})
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_eight_concurrent_clients(client, gen):
    jobs = [(PUZZLES[i % len(PUZZLES)], 100 + i) for i in range(8)]
    results: dict[int, object] = {}

    def ask(i):
        puzzle, seed = jobs[i]
        if i % 2:
            chunks = _chat(client, puzzle, seed=seed, stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            results[i] = _chat(client, puzzle, seed=seed, extra_body={"return_token_ids": True})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(8))
    for i, (puzzle, seed) in enumerate(jobs):
        ref = gen.generate(puzzle, seed=seed, max_new_tokens=4 * gen.config.canvas_length)
        if i % 2:
            assert results[i] == ref.text
        else:
            assert results[i].choices[0].token_ids == answer_ids(ref.token_ids[0])
            assert results[i].prompt_token_ids == ref.prompt_ids


def _hold(url: str, headers=None):
    """A streaming request that occupies the worker (or its queue) until the returned response is closed."""
    body = {"model": "sudoku", "messages": [{"role": "user", "content": PUZZLES[0]}], "seed": 0, "stream": True,
            "stream_drafts": True, **LONG}
    client = httpx.Client(timeout=60, headers=headers or {})
    r = client.send(client.build_request("POST", url + "/v1/chat/completions", json=body), stream=True)
    assert r.status_code == 200, r.read()
    r.lines = r.iter_lines()  # kept: a dropped line iterator would close the connection
    return r, client


def _running(r) -> None:
    """Returns once the held request runs (its first draft canvas arrived)."""
    for line in r.lines:
        if "dgport_draft" in line:
            return
    raise AssertionError("the stream ended before its first draft")


def _fill(url: str, n: int, headers=None) -> list:
    """n held requests, each running (a batch of n: the server's --max-batch)."""
    held = []
    for _ in range(n):
        held.append(_hold(url, headers))
        _running(held[-1][0])
    return held


def _release(held) -> None:
    for resp, client in held:
        resp.close()
        client.close()


@pytest.mark.parametrize("max_batch", [1, 2])
def test_queue_full_gets_503_with_retry_after(export, max_batch):
    """--max-queue counts the requests waiting behind a full batch (--max-batch of them running)."""
    srv = Server(export, "--max-queue", "1", "--max-batch", str(max_batch))
    try:
        held = _fill(srv.url, max_batch)
        held.append(_hold(srv.url))  # it waits: the batch is full, the queue holds one
        wait_for(lambda: srv.health()["waiting"] == 1, "a request in the queue")
        assert srv.health()["waiting"] == 1 and srv.health()["busy"], srv.health()
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": "sudoku", "messages": [{"role": "user", "content": PUZZLES[1]}]})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "server_overloaded"
        _release(reversed(held))
        wait_for(lambda: srv.health()["cancelled"] == max_batch + 1, "every held request to be cancelled")
        ok = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "model": "sudoku", "messages": [{"role": "user", "content": PUZZLES[1]}], "seed": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]  # served normally
    finally:
        out = srv.stop()
    assert "127.0.0.1" in out and "this machine only" in out and "no API key" in out  # says where it listens
    assert f"{max_batch} request{'s' if max_batch > 1 else ''} at a time" in out


def test_start_errors_are_one_line(export):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for args, says in ((["--port", str(port)], "cannot listen on 127.0.0.1"),
                           (["--api-key", " "], "--api-key is empty")):
            r = subprocess.run([sys.executable, "-m", "dgport.serve", str(export), *args], capture_output=True,
                               text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
            assert r.returncode == 1 and r.stderr.startswith(f"dgport: error: {says}"), r.stderr
            assert len(r.stderr.strip().splitlines()) == 1


def test_client_that_leaves_while_queued_is_never_run(server):
    """The shared server batches DEFAULT_MAX_BATCH requests: a full batch runs, one more waits and
    leaves; then the running ones are cancelled between two steps."""
    from dgport.serve.command import DEFAULT_MAX_BATCH

    auth = {"Authorization": f"Bearer {KEY}"}
    before = server.health()
    held = _fill(server.url, DEFAULT_MAX_BATCH, auth)
    waiting = _hold(server.url, auth)
    wait_for(lambda: server.health()["waiting"] == 1, "a request in the queue")
    _release([waiting])  # leaves while queued
    _release(held)
    n = DEFAULT_MAX_BATCH + 1
    wait_for(lambda: server.health()["cancelled"] >= before["cancelled"] + n, "every cancellation")
    wait_for(lambda: not server.health()["busy"], "an idle worker")
    after = server.health()
    assert after["cancelled"] == before["cancelled"] + n, after
    assert after["served"] == before["served"] + DEFAULT_MAX_BATCH, after  # the queued one never ran


def test_mlx_backend_serves_from_its_worker_thread():
    """MLX streams belong to the thread that made them: the model is loaded on the worker thread."""
    pytest.importorskip("mlx.core")
    from dgport.default_model import ensure_default_export

    export = ensure_default_export("mlx")
    srv = Server(export, "--backend", "mlx")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        resp = _chat(client, PUZZLES[0], seed=3, extra_body={"return_token_ids": True})
    finally:
        srv.stop()
    ref = _run_json(export, "--backend", "mlx", "--prompt", PUZZLES[0], "--seed", "3")
    assert resp.choices[0].token_ids == answer_ids(ref["token_ids"])


def test_prompt_that_starts_with_the_cached_tokens_reuses_them(client, gen):
    first = client.completions.create(model="sudoku", prompt=PUZZLES[2], seed=1, max_tokens=82,
                                      extra_body={"return_token_ids": True})
    longer = first.prompt_token_ids + gen.tokenizer.encode(PUZZLES[3])
    resp = client.completions.create(model="sudoku", prompt=longer, seed=2, max_tokens=82,
                                     extra_body={"return_token_ids": True})
    assert resp.usage.prompt_tokens_details.cached_tokens == len(first.prompt_token_ids)
    assert resp.prompt_token_ids == longer  # exactly the tokens asked for: the prefix was already encoded
    fresh = gen.generate(longer, seed=2, max_new_tokens=82, encode_chunk=len(first.prompt_token_ids))
    assert resp.choices[0].token_ids == answer_ids(fresh.token_ids[0])
