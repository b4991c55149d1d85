"""Every `bash` and `python` block in README.md and docs/*.md runs as written.

The blocks of one page run in order in one empty folder (a page's tour builds on its earlier blocks),
with an empty HOME, no network (HF_HUB_OFFLINE=1) and this interpreter's `dgport` and `python` first
on PATH. The line right before a fence may say how to run it:

    <!-- doc-test: skip REASON -->    not run; the reason is shown (e.g. it needs a GPU)
    <!-- doc-test: no-install -->     a set-up line: its leading `pip install ... &&` is left out
                                      (the suite runs in an environment that has it), the rest runs
    <!-- doc-test: background -->     a server: started, waited on until its /health answers, and
                                      stopped when the page's blocks are done

Other fences (`text`, `json`, ...) are examples of output or formats and are not run; a fence with
no language is refused, so that nothing meant to run is silently skipped."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN = ("bash", "python")
KNOWN = RUN + ("text", "json", "jinja", "javascript", "http")
FENCE = re.compile(r"^```(\S*)\s*$")
MARK = re.compile(r"^<!-- doc-test: (skip|no-install|background)\b\s*(.*?)\s*-->$")
BLOCK_TIMEOUT_S = 900


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    mark: str | None = None
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    out, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        mark = MARK.match(lines[start - 1].strip()) if start else None
        out.append(Block(page, start + 1, m.group(1), "\n".join(body) + "\n",
                         mark.group(1) if mark else None, mark.group(2) if mark else ""))
        i += 1
    return out


def test_every_block_says_what_it_is():
    for page in PAGES:
        for b in blocks(page):
            assert b.lang in KNOWN, f"{b.where}: a fence needs a language ({', '.join(KNOWN)})"
            assert b.mark is None or b.lang in RUN, f"{b.where}: doc-test marks are for bash and python blocks"
            assert b.mark != "skip" or len(b.reason) > 10, f"{b.where}: a skipped block says why"


def _environment(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "HF_"))}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", HF_HOME=str(home / "hf"), PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", COLUMNS="100")
    env.pop("DGPORT_DEBUG", None)
    # npm keeps the machine's package cache (tests/install-tools.sh filled it): no download per page
    env.setdefault("npm_config_cache", str(Path.home() / ".npm"))
    return env


def _wait_for_health(block: Block, proc: subprocess.Popen, log: Path) -> None:
    port = re.search(r"--port\s+(\d+)", block.code)
    url = f"http://127.0.0.1:{port.group(1) if port else 8000}/health"
    deadline = time.monotonic() + BLOCK_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{block.where}: the server ended ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        proc_wait = min(0.5, max(0.0, deadline - time.monotonic()))
        try:
            proc.wait(timeout=proc_wait)  # wakes early if the server dies
        except subprocess.TimeoutExpired:
            pass
    pytest.fail(f"{block.where}: no answer from {url} within {BLOCK_TIMEOUT_S} s")


def _run_page(page: Path, work: Path) -> list[str]:
    home = work / "home"
    home.mkdir(parents=True)
    cwd = work / "cwd"
    cwd.mkdir()
    env = _environment(home)
    background, skipped = [], []
    try:
        for b in blocks(page):
            if b.lang not in RUN:
                continue
            if b.mark == "skip":
                skipped.append(f"{b.where}: {b.reason}")
                continue
            code = b.code
            if b.mark == "no-install":
                code, n = re.subn(r"^pip install [^&\n]*&&\s*", "", code, flags=re.M)
                assert n, f"{b.where}: marked no-install but has no `pip install ... &&`"
            argv = ["bash", "-e", "-o", "pipefail", "-c", code] if b.lang == "bash" else [sys.executable, "-c", code]
            if b.mark == "background":
                log = work / f"background-{b.line}.log"
                with open(log, "w") as f:
                    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                            start_new_session=True)
                background.append(proc)
                _wait_for_health(b, proc, log)
                continue
            r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
            assert r.returncode == 0, (f"{b.where} failed ({r.returncode}):\n{code}\n--- stdout\n{r.stdout[-3000:]}"
                                       f"\n--- stderr\n{r.stderr[-3000:]}")
    finally:
        for proc in background:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
    return skipped


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_page_runs_as_written(page, tmp_path):
    skipped = _run_page(page, tmp_path)
    if skipped:
        print("\nnot run:\n  " + "\n  ".join(skipped))
