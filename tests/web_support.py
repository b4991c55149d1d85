"""Running the JavaScript step loop (web/) from tests: Node.js scripts and headless Chromium.

The tools come from the README's test command (tests/install-tools.sh): Node.js with web/node_modules
(`npm ci`) and Debian's chromium. A missing tool fails the test with the command to run; it is never
skipped, so CI cannot pass without running them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parent.parent / "web"
CHROME = os.environ.get("CHROME", "/usr/bin/chromium")
FIX = "run `bash tests/install-tools.sh` (the README's test command does)"


def need_node() -> str:
    node = shutil.which("node")
    if node is None or not (WEB / "node_modules" / "onnxruntime-node").is_dir():
        pytest.fail(f"Node.js with web/node_modules is needed: {FIX}")
    return node


def need_chrome() -> str:
    if not os.access(CHROME, os.X_OK):
        pytest.fail(f"{CHROME} is needed for the browser test: {FIX} (or set CHROME)")
    return CHROME


def node_lines(script: str, *args, timeout: float = 300) -> list:
    """`node web/scripts/SCRIPT ARGS`: its stdout, one JSON value per line."""
    proc = subprocess.run([need_node(), str(WEB / "scripts" / script), *map(str, args)], cwd=WEB,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"node {script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


def python_tokens(export, requests, threads: int = 1, **backend_options) -> list[dict]:
    """What dgport's Python loop (ONNX Runtime CPU) answers to each request, as generate.mjs reports it."""
    import dgport

    gen = dgport.load(export, backend="cpu", threads=threads, **backend_options)
    out = []
    for r in requests:
        res = gen.generate(r["prompt"], seed=r["seed"], max_new_tokens=r.get("max_new_tokens"), raw=r.get("raw", False),
                           template=_template(r.get("template")), **r.get("sampler", {}))
        out.append({"token_ids": res.token_ids[0], "steps_per_canvas": res.steps_per_canvas, "finished": res.finished,
                    "text": res.text, "holes": res.holes})
    return out


def _template(parts):
    if parts is None:
        return None
    from dgport import Hole

    return [Hole(p["hole"]) if isinstance(p, dict) else p for p in parts]
