"""What reaches a person's terminal, and `dgport chat` as a person types it: text from a model or a
manifest never drives the terminal, undecodable bytes are one line each, and an interactive chat
survives empty lines, Ctrl-C at the prompt and a full conversation (/reset)."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dgport
from dgport.chat import ChatSession
from dgport.cli import main
from dgport.display import terminal_text
from dgport.errors import DgportError
from dgport.exporters.export import ExportOptions, export
from dgport.manifest import MANIFEST, manifest_digest
from hardening_support import copy_checkpoint, edit_json

CONTROLS = {chr(c) for c in [*range(0x00, 0x09), *range(0x0b, 0x20), *range(0x7f, 0xa0)]}
CLI = [sys.executable, "-m", "dgport.cli"]


@pytest.fixture(scope="module")
def short_export(checkpoints, tmp_path_factory) -> Path:
    """`tiny` with a 64-position context (canvas 16), exported: three chat turns fill it."""
    root = tmp_path_factory.mktemp("terminal")
    ckpt = copy_checkpoint(checkpoints["tiny"], root / "ckpt")
    edit_json(ckpt / "config.json", lambda c: c["text_config"].__setitem__("max_position_embeddings", 64))
    export(ckpt, root / "export", ExportOptions(validate=False))
    return root / "export"


def spawn_on_terminal(args: list[str], stderr_file: Path | None = None) -> tuple[int, int]:
    """`dgport ARGS` with a pseudo-terminal as its controlling terminal (stdin and stdout; stderr too
    unless `stderr_file` takes it). Returns (pid, the terminal's master fd)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: never returns
        try:
            # as a terminal's shell starts a program: a test run started in the background (bash `&`)
            # ignores SIGINT, and an ignored signal stays ignored across exec
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if stderr_file is not None:
                err = os.open(stderr_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(err, 2)
            os.execv(sys.executable, [*CLI, *args])
        finally:
            os._exit(127)
    return pid, fd


class Terminal:
    """Reads what the child shows until a given text appears (state, not sleeps; the deadline is only a
    safety net for a hung child)."""

    def __init__(self, fd: int):
        self.fd, self.seen, self.pos = fd, b"", 0

    def until(self, text: bytes, deadline_s: float = 300) -> bytes:
        """What the terminal showed from the end of the last match up to and including `text`."""
        end = time.monotonic() + deadline_s
        while text not in self.seen[self.pos:]:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {text!r} on the terminal; it shows {self.seen[self.pos:][-2000:]!r}")
            try:
                chunk = os.read(self.fd, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the program ended before showing {text!r}: {self.seen[self.pos:][-2000:]!r}")
            self.seen += chunk
        found = self.seen.index(text, self.pos) + len(text)
        shown, self.pos = self.seen[self.pos:found], found
        return shown

    def rest(self) -> bytes:
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except OSError:
                return self.seen
            if not chunk:
                return self.seen
            self.seen += chunk

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)


def exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# ------------------------------------------------------------------------------ control characters


def test_terminal_text_shows_controls_as_escapes():
    text = "ok\n\tdone \x1b]0;title\x07 \x1b[2J\r\x7f\x9b é ✓"
    shown = terminal_text(text)
    assert shown == "ok\n\tdone \\x1b]0;title\\x07 \\x1b[2J\\x0d\\x7f\\x9b é ✓"
    assert not CONTROLS & set(shown)


@pytest.fixture(scope="module")
def noisy(checkpoints, tmp_path_factory):
    """(export, seed, text): a seed whose answer on `tiny` (random weights, byte-level tokens) holds
    control characters."""
    out = tmp_path_factory.mktemp("noisy") / "export"
    export(checkpoints["tiny"], out, ExportOptions(validate=False))
    gen = dgport.load(out, backend="cpu")
    for seed in range(20):
        text = gen.generate("Hi", seed=seed, max_new_tokens=32).text
        if "\x1b" in text or CONTROLS & set(text):
            return out, seed, text
    pytest.fail("no seed of 20 gave control characters: the fixture changed")


def test_generated_controls_are_escaped_on_a_terminal_and_kept_when_piped(noisy, tmp_path):
    path, seed, text = noisy
    args = ["run", str(path), "--prompt", "Hi", "--seed", str(seed), "--max-new-tokens", "32"]
    as_json = subprocess.run(CLI + args + ["--json"], capture_output=True, text=True)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["text"] == text  # JSON keeps the model's text as it is
    piped = subprocess.run(CLI + args, capture_output=True)
    assert piped.returncode == 0 and piped.stdout == (text + "\n").encode()  # piped: raw
    pid, fd = spawn_on_terminal(args, stderr_file=tmp_path / "stderr")
    shown = Terminal(fd).rest().decode()
    assert exit_code(pid) == 0, (tmp_path / "stderr").read_text()
    shown = shown.replace("\r\n", "\n")  # the terminal's own newline translation
    assert not CONTROLS & set(shown), repr(shown)
    assert shown == terminal_text(text) + "\n"


def test_info_prints_manifest_strings_as_text(noisy, tmp_path, capsys):
    copied = tmp_path / "export"
    shutil.copytree(noisy[0], copied)

    def change(m):
        m["dgport_version"] = "[link=https://example.invalid]0.1[/link]"
        m["source"]["path"] = "\x1b]0;pwned\x07[bold red]ckpt[/bold red]"
        m["manifest_sha256"] = manifest_digest(m)
    edit_json(copied / MANIFEST, change)
    assert main(["info", str(copied)]) == 0
    out = capsys.readouterr().out
    assert "[link=https://example.invalid]0.1[/link]" in out  # shown, not turned into a hidden link
    assert "\\x1b]0;pwned\\x07[bold red]ckpt[/bold red]" in out
    assert "\x1b" not in out and "\x07" not in out


def test_error_lines_escape_controls(capsys):
    assert main(["run", "/nonexistent/\x1b[31mred\x07", "--prompt", "x"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "\\x1b[31mred\\x07" in err


# ------------------------------------------------------------------------------ bytes that are not UTF-8


def test_undecodable_prompts_are_one_line(noisy, tmp_path):
    base = CLI + ["run", str(noisy[0]), "--seed", "0", "--max-new-tokens", "16"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9")
    for extra, stdin, message in [
        ([b"--prompt", b"ab\xffcd"], None, "--prompt is not valid UTF-8 text (the byte 0xff at character 2)"),
        ([b"--prompt", b"Hi", b"--system", b"\xfe"], None, "--system is not valid UTF-8 text (the byte 0xfe"),
        ([], b"ok \xc3(", "standard input is not valid UTF-8 (the byte 0xc3 at offset 3)"),
        ([b"--prompt-file", str(bad).encode()], None, f"--prompt-file {bad} is not valid UTF-8 (the byte 0xe9"),
    ]:
        r = subprocess.run(base + extra, input=stdin, capture_output=True)
        err = r.stderr.decode()
        assert r.returncode == 1 and err.count("\n") == 1 and message in err, (extra, err)
        assert "Traceback" not in err and not r.stdout


def test_undecodable_text_through_the_api_is_refused(noisy):
    gen = dgport.load(noisy[0], backend="cpu")
    with pytest.raises(DgportError, match=r"the prompt is not valid UTF-8 text \(a lone surrogate U\+D800"):
        gen.generate("a\ud800b", seed=0, max_new_tokens=16)
    with pytest.raises(DgportError, match="the system prompt is not valid UTF-8 text"):
        gen.generate("Hi", system="\udcff", seed=0, max_new_tokens=16)
    session = ChatSession(gen, seed=0, max_new_tokens=16)
    with pytest.raises(DgportError, match="the message is not valid UTF-8 text"):
        session.say("\udcff")
    assert not session.messages
    session.say("Hi")  # the session goes on
    assert len(session.messages) == 2


def test_piped_chat_refuses_an_undecodable_line_and_goes_on(short_export):
    r = subprocess.run(CLI + ["chat", str(short_export), "--seed", "0", "--max-new-tokens", "16"],
                       input=b"\xff\xfe\n\nHi\n", capture_output=True)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "dgport: error: line 1 of standard input is not valid UTF-8 (the byte 0xff at offset 0)" in err
    assert err.count("tokens in") == 1  # the empty line was no turn; "Hi" was answered


# ------------------------------------------------------------------------------ chat on a terminal


def test_interactive_chat_keeps_the_conversation(short_export, tmp_path):
    pid, fd = spawn_on_terminal(["chat", str(short_export), "--seed", "0", "--max-new-tokens", "16"])
    term = Terminal(fd)
    try:
        term.until(b"> ")
        term.send(b"\n")  # an empty line: no turn, and the chat goes on
        term.until(b"> ")
        term.send(b"half a lin\x03")  # Ctrl-C at the prompt clears the line
        term.until(b"^C")
        term.until(b"> ")
        term.send(b"\xff\n")  # not UTF-8: one line, and the chat goes on
        assert b"not valid UTF-8" in term.until(b"> ")
        for turn in range(1, 8):  # 64 positions: a few turns fill the conversation
            term.send(b"Hi\n")
            shown = term.until(b"> ")
            if b"the conversation is full" in shown:
                break
            assert b"tokens in" in shown, shown
        assert b"type /reset to start one" in shown and turn >= 2
        term.send(b"/reset\n")
        assert b"[a new conversation]" in term.until(b"> ")
        term.send(b"Hi\n")
        shown = term.until(b"> ")
        assert b"tokens in" in shown and b"(cache kept)" not in shown  # a fresh conversation has room
        term.send(b"\x04")  # Ctrl-D quits
        term.rest()
        assert exit_code(pid) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
