"""dgport processes that load onnxruntime open no network connection and write no telemetry state.

onnxruntime's Linux builds (1.29+) start a 1DS telemetry uploader with the runtime's environment: it
writes ~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db} at once and, a few
seconds into the session, resolves mobile.events.data.microsoft.com (DNS to port 53) to post events.
dgport/ort_env.py sets ORT_DISABLE_TELEMETRY=1 before the first import. These tests run real dgport
processes with a scratch HOME and ORT_DISABLE_TELEMETRY=0 inherited (dgport must override it):
- fast: `dgport run` writes nothing under HOME/.cache/Microsoft (needs no strace);
- slow: a >= 15 s generate loop under `strace -f` makes no AF_INET/AF_INET6 socket and no connect()
  outside AF_UNIX (the uploader's first DNS query comes after ~5 s).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dgport.exporters.export import ExportOptions, export

LOOP_SECONDS = 16
INET = re.compile(r"\b(socket|connect)\((.*AF_INET6?\b|\d+, \{sa_family=AF_INET6?\b)")


@pytest.fixture(scope="module")
def tiny_export(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("net") / "tiny-fp32"
    export(checkpoints["tiny"], out, ExportOptions(dtype="fp32", validate=False))
    return out


def _env(home: Path) -> dict:
    env = dict(os.environ)
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), ORT_DISABLE_TELEMETRY="0",
               DGPORT_ORT_THREADS="1")
    return env


def _dgport() -> str:
    exe = Path(sys.executable).with_name("dgport")
    return str(exe) if exe.exists() else shutil.which("dgport")


def _telemetry_files(home: Path) -> list[str]:
    root = home / ".cache" / "Microsoft"
    return sorted(str(p.relative_to(home)) for p in root.rglob("*")) if root.exists() else []


def _strace() -> str:
    path = shutil.which("strace")
    if path is None:
        pytest.skip("strace is not installed (apt-get install strace); the fast test still checks the "
                    "telemetry state files")
    probe = subprocess.run([path, "-f", "-e", "trace=socket", "-o", os.devnull, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace refused: {probe.stderr.decode().strip()[:200]})")
    return path


def _inet_calls(trace: Path) -> list[str]:
    return [line for line in trace.read_text().splitlines() if INET.search(line)]


def test_dgport_run_writes_no_telemetry_state(tiny_export, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    r = subprocess.run([_dgport(), "run", str(tiny_export), "--prompt", "hello", "--seed", "0",
                        "--max-new-tokens", "8"], env=_env(home), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _telemetry_files(home) == [], "onnxruntime's telemetry initialised inside `dgport run`"


def test_strace_parser_sees_inet_sockets(tmp_path):
    """The check below can fail: a process that opens a UDP socket is caught."""
    strace = _strace()
    trace = tmp_path / "trace.txt"
    code = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(('127.0.0.1', 9))"
    subprocess.run([strace, "-f", "-e", "trace=socket,connect", "-o", str(trace), sys.executable, "-c", code],
                   check=True, capture_output=True)
    calls = _inet_calls(trace)
    assert any(c.split(None, 1)[1].startswith("socket(") for c in calls) and \
        any(c.split(None, 1)[1].startswith("connect(") for c in calls), trace.read_text()


@pytest.mark.slow
def test_generate_loop_opens_no_network_connection(tiny_export, tmp_path):
    strace = _strace()
    home = tmp_path / "home"
    home.mkdir()
    trace = tmp_path / "trace.txt"
    loop = textwrap.dedent(f"""
        import sys, time
        import dgport
        g = dgport.load(sys.argv[1], backend="cpu", threads=1)
        t0, n = time.monotonic(), 0
        while time.monotonic() - t0 < {LOOP_SECONDS}:
            g.generate("hello", max_new_tokens=16, seed=n)
            n += 1
        print("generations", n)
    """)
    r = subprocess.run([strace, "-f", "-e", "trace=socket,connect,sendto", "-o", str(trace), sys.executable, "-c",
                        loop, str(tiny_export)], env=_env(home), capture_output=True, text=True,
                       timeout=LOOP_SECONDS + 240)
    assert r.returncode == 0, r.stderr
    assert "generations" in r.stdout
    assert _inet_calls(trace) == [], "network sockets opened during generation"
    assert _telemetry_files(home) == []


def test_late_import_is_reported():
    """An application that imported onnxruntime (telemetry on) before dgport is told how to fix it. (A
    stand-in module plays the early import, so this test starts no telemetry itself.)"""
    code = ("import sys, types, warnings; warnings.simplefilter('error')\n"
            "fake = types.ModuleType('onnxruntime'); fake.disable_telemetry_events = lambda: None\n"
            "sys.modules['onnxruntime'] = fake\n"
            "from dgport.ort_env import onnxruntime as ort\n"
            "try:\n    ort()\nexcept RuntimeWarning as w:\n    print('warned:', w)\n")
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "warned: onnxruntime was imported before dgport with its telemetry on; set ORT_DISABLE_TELEMETRY=1" \
        in r.stdout, r.stdout + r.stderr
