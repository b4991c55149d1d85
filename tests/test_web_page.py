"""`dgport web` and the page in headless Chromium: the page's tokens equal `dgport run`'s for the same
seed; the server hands out only the page and the export, with the isolation headers threads need."""
from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import quote

import pytest

from cli_support import dg
from dgport.exporters.export import ExportOptions, export
from web_support import need_chrome, node_lines, python_tokens, write_json

PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
TEXT_PROMPTS = ["Why is the sky blue?", "Tell me a story"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebServer:
    """`dgport web ARGS` in a child process, up once it has printed its address."""

    def __init__(self, *args):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "dgport.cli", "web", *map(str, args), "--port",
                                      str(self.port)], stderr=subprocess.PIPE, text=True)
        self.banner = self.proc.stderr.readline()  # printed once the socket listens
        assert "dgport web:" in self.banner and f":{self.port}/" in self.banner, self.banner + self.rest()
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def rest(self) -> str:
        self.proc.kill()
        return self.proc.stderr.read()

    def url(self, **query) -> str:
        q = "&".join(f"{k}={quote(str(v))}" for k, v in query.items())
        return f"http://127.0.0.1:{self.port}/" + (f"?{q}" if q else "")

    def get(self, path: str, method: str = "GET", headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def text_export(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("webpage") / "tiny"
    export(checkpoints["tiny"], out, ExportOptions(validate=False))
    return out


@pytest.fixture(scope="module")
def sudoku_server():
    server = WebServer()  # the shipped model, as `dgport web` with no EXPORT serves it
    yield server
    server.stop()


def browser(*urls) -> list[dict]:
    need_chrome()
    got = node_lines("browser-run.mjs", *urls, timeout=600)
    for g in got:
        assert "error" not in g, g
    return got


def test_page_solves_puzzles_token_identical_to_dgport_run(sudoku_server):
    from dgport.default_model import ensure_default_export
    from dgport.task import answer_template

    seeds = [0, 1, 2, 3]
    urls = [sudoku_server.url(prompt=PUZZLE, seed=s, autorun=1) for s in seeds]
    urls += [sudoku_server.url(prompt=PUZZLE, seed=5, autorun=1, template=1)]
    got = browser(*urls)
    template = [{"hole": 1} if not isinstance(p, str) else p for p in answer_template("sudoku", PUZZLE).parts]
    want = python_tokens(ensure_default_export("cpu"), [{"prompt": PUZZLE, "seed": s} for s in seeds]
                         + [{"prompt": PUZZLE, "seed": 5, "template": template}], threads=0)
    for g, w, s in zip(got, want, seeds + [5]):
        assert (g["token_ids"], g["steps_per_canvas"], g["text"]) == (w["token_ids"], w["steps_per_canvas"], w["text"]), s
        assert g["seed"] == s and g["crossOriginIsolated"] is True
    assert all(g["finished"] for g in got)


def test_page_refuses_a_bad_puzzle_in_one_line(sudoku_server):
    """The model's chat template refuses it, in the browser as in Python (the same message)."""
    bad = "55" + PUZZLE[2:]
    got = node_lines("browser-run.mjs", sudoku_server.url(prompt=bad, seed=0, autorun=1), timeout=600)
    assert got[0]["error"] == "the puzzle breaks the rules: row 1 gives 5 twice"


def test_page_runs_a_text_model_token_identical(text_export):
    server = WebServer(text_export)
    try:
        requests = [{"prompt": p, "seed": s, "max_new_tokens": 40} for p in TEXT_PROMPTS for s in (0, 4)]
        got = browser(*[server.url(prompt=r["prompt"], seed=r["seed"], max_new_tokens=40, autorun=1) for r in requests])
        want = python_tokens(text_export, requests, threads=0)
        for g, w, r in zip(got, want, requests):
            assert (g["token_ids"], g["steps_per_canvas"], g["text"]) == (w["token_ids"], w["steps_per_canvas"], w["text"]), r
    finally:
        assert server.stop() == 0


def test_page_runs_a_quantized_export_with_fp32_activations(checkpoints, tmp_path):
    """WebAssembly has no int8-activation MatMulNBits kernel: the page's int8 tokens are those of
    dgport run with DGPORT_ORT_ACCURACY_LEVEL=0 (docs/web.md)."""
    int8 = tmp_path / "int8"
    export(checkpoints["tiny"], int8, ExportOptions(quantize=8, validate=False))
    requests = [{"prompt": TEXT_PROMPTS[0], "seed": s, "max_new_tokens": 33} for s in (0, 5)]
    server = WebServer(int8)
    try:
        got = node_lines("browser-run.mjs", "--api", server.url(threads=1),
                         write_json(tmp_path / "requests.json", requests), timeout=600)
    finally:
        server.stop()
    want = python_tokens(int8, requests, threads=1, accuracy_level=0)
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]


def test_server_hands_out_only_the_page_and_the_export(sudoku_server):
    s = sudoku_server
    status, headers, body = s.get("/")
    assert status == 200 and b"importmap" in body
    for k, v in {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}.items():
        assert headers[k] == v
    status, headers, body = s.get("/model/dgport.json")
    assert status == 200 and json.loads(body)["format_version"] == 3
    status, headers, gz = s.get("/vendor/ort-wasm-simd-threaded.wasm", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip" and headers["Content-Type"] == "application/wasm"
    status, headers, plain = s.get("/vendor/ort-wasm-simd-threaded.wasm")
    assert status == 200 and "Content-Encoding" not in headers and plain[:4] == b"\0asm" and len(plain) > len(gz)
    status, headers, body = s.get("/model/weights.bin", method="HEAD")
    assert status == 200 and int(headers["Content-Length"]) > 0 and body == b""
    for path in ["/model/../dgport.json", "/../web/app.js", "/model/missing.bin", "/web.py", "/vendor/",
                 "/src/../../dgport/web.py", "/%2e%2e/pyproject.toml", "/__init__.py"]:
        assert s.get(path)[0] == 404, path
    status, _, body = s.get("/", headers={"Host": "evil.example:8080"})
    assert status == 421 and b"--allow-host" in body
    assert s.get("/", method="POST")[0] == 501


def test_sigterm_stops_it_cleanly(text_export):
    server = WebServer(text_export)
    assert server.get("/")[0] == 200
    assert server.stop() == 0


def test_refusals_are_one_line(capsys, checkpoints, text_export, tmp_path):
    bf16 = tmp_path / "bf16"
    export(checkpoints["tiny"], bf16, ExportOptions(dtype="bf16", validate=False))
    code, out, err = dg(capsys, "web", bf16)
    assert code == 1 and "a bf16 export; the browser runs fp32 and fp16 exports" in err and len(err.splitlines()) == 1
    code, out, err = dg(capsys, "web", tmp_path / "nothing-here")
    assert code != 0 and "nothing-here" in err and len(err.splitlines()) == 1
    code, out, err = dg(capsys, "web", text_export, "--port", "0")
    assert code == 2 and "--port" in err
    code, out, err = dg(capsys, "web", text_export, "--allow-host", "http://x/")
    assert code == 2 and "--allow-host" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, out, err = dg(capsys, "web", text_export, "--port", busy.getsockname()[1])
    assert code == 1 and "choose another --port" in err


class _IsolatedStatic(threading.Thread):
    """Any static web server with the two headers (docs/web.md), here Python's."""

    def __init__(self, folder: Path):
        import http.server

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(folder), **kw)

            def end_headers(self):
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                super().end_headers()

            def log_message(self, *a):
                pass

        Handler.extensions_map = {**Handler.extensions_map, ".mjs": "text/javascript", ".wasm": "application/wasm"}
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        super().__init__(target=self.httpd.serve_forever, daemon=True)


def test_saved_site_runs_from_any_static_server(capsys, text_export, tmp_path):
    site = tmp_path / "site"
    code, out, err = dg(capsys, "web", text_export, "--save", site)
    assert code == 0, err
    assert (site / "index.html").is_file() and (site / "model" / "dgport.json").is_file()
    assert (site / "vendor" / "ort-wasm-simd-threaded.wasm").read_bytes()[:4] == b"\0asm"
    assert "Cross-Origin-Embedder-Policy: require-corp" in (site / "_headers").read_text()
    code, out, err = dg(capsys, "web", text_export, "--save", site)
    assert code == 1 and "already exists" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".site")]  # nothing half-written left
    static = _IsolatedStatic(site)
    static.start()
    try:
        port = static.httpd.server_address[1]
        got = browser(f"http://127.0.0.1:{port}/?prompt={quote(TEXT_PROMPTS[0])}&seed=3&max_new_tokens=20&autorun=1")
    finally:
        static.httpd.shutdown()
    want = python_tokens(text_export, [{"prompt": TEXT_PROMPTS[0], "seed": 3, "max_new_tokens": 20}], threads=0)
    assert got[0]["token_ids"] == want[0]["token_ids"]
