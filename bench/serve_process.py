"""`python -m dgport.serve` in a subprocess on a free 127.0.0.1 port, for tests/test_serve.py and
bench/bench_serve.py: up when /health answers, its output kept in a file (a pipe nobody reads would
block a chatty server) and returned by `stop()`."""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wait_for(predicate, what: str, timeout: float = 60.0):
    """Poll `predicate` (a read of the server's state) until it is truthy: tests wait on state, never
    on a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)  # the polling interval, not a synchronization


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, export, *args: str, timeout: float = 60):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "dgport.serve", str(export), "--host", "127.0.0.1",
                                      "--port", str(self.port), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.output().strip()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer /health in {timeout:.0f} s")

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health").json()

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def stop(self) -> str:
        """Terminate it (kill after 15 s) and return everything it printed."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.output()
