"""Reading the files a user hands dgport: a checkpoint folder, a Hugging Face cache snapshot, an export.

Every reader opens model files through this module, so every file is checked the same way before a
byte of it is read:
  - its real path (symlinks followed) lies inside the model's folder (`model_root`: the folder
    itself; for a Hub cache snapshot `.../models--owner--name/snapshots/<rev>`, whose files link
    into `../../blobs/`, the repo's cache folder `models--owner--name`);
  - it is a regular file (not a FIFO, socket, device or folder), checked with stat before opening,
    and the file is opened non-blocking without following a last link and checked again with fstat,
    so a FIFO swapped in meanwhile cannot block the read;
  - what is read into memory is capped (CAPS), by fstat before reading.
Each refusal is one line: "<path>: <what is wrong>; <what to do>", raised as the caller's error type.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
from pathlib import Path

from .errors import DgportError, ExportError

MiB = 1 << 20
# What each file may hold, read into memory whole. Real DiffusionGemma / Gemma files are far below:
# tokenizer.json ~33 MB, tokenizer_config.json ~1.2 MB (Gemma 3's, chat template included), a 26B
# model's safetensors index ~0.1 MB and its export manifest ~1 MB.
DEFAULT_CAP = 1 * MiB  # config.json, generation_config.json, special_tokens_map.json, ...
CAPS = {
    "tokenizer.json": 64 * MiB,
    "tokenizer_config.json": 16 * MiB,
    "chat_template.jinja": 1 * MiB,
    "dgport.json": 64 * MiB,
}
INDEX_CAP = 16 * MiB  # *.safetensors.index.json
REF_CAP = 1024  # a Hub cache refs/<branch> file: one 40-character commit hash
CHUNK = 16 * MiB


def cap_for(path) -> int:
    name = Path(path).name
    if name.endswith(".safetensors.index.json"):
        return INDEX_CAP
    return CAPS.get(name, DEFAULT_CAP)


def size_text(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB and n % MiB == 0 else f"{n} bytes"


def model_root(folder) -> Path:
    """The folder every file of the model at `folder` must really lie in: the folder itself, or for
    a Hugging Face cache snapshot (given as such, or reached through a link) the repo's cache folder."""
    given, real = Path(os.path.abspath(folder)), Path(os.path.realpath(folder))
    for p in (given, real):
        if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
            return Path(os.path.realpath(p.parent.parent))
    return real


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a plain file"


def _real(path: Path, root: Path, error, fix: str) -> Path:
    """The real path of `path`, refused unless it lies inside `root`."""
    root = Path(os.path.realpath(root))  # a relative or linked root names the same folder
    try:
        os.lstat(path)
    except FileNotFoundError:
        raise error(f"{path}: missing; {fix}") from None
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror}); {fix}") from None
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise error(f"{path}: links to {real}, outside the model folder {root}; dgport reads only files inside "
                    "the model's folder: copy the file into it") from None
    return real


def check(path, root, error=DgportError, fix: str = "replace it with the model's own file") -> os.stat_result:
    """Refuse `path` unless it is a regular file whose real path lies inside `root` (no read)."""
    path = Path(path)
    real = _real(path, Path(root), error, fix)
    try:
        st = os.stat(real)
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror}); {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: not a regular file ({_kind(st.st_mode)}); {fix}")
    return st


def open_fd(path, root, error=DgportError, fix: str = "replace it with the model's own file") -> int:
    """A read-only descriptor of `path` after `check`; opened without blocking (a FIFO swapped in
    after the check cannot hang it) and without following a last link, then checked with fstat."""
    path = Path(path)
    before = check(path, root, error, fix)
    real = Path(os.path.realpath(path))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(real, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{path}: changed into a link while being opened; {fix}") from None
        raise error(f"{path}: cannot read it ({e.strerror}); {fix}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not os.path.samestat(st, before):
        os.close(fd)
        raise error(f"{path}: changed while being opened ({_kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else 'another file'}); {fix}")
    return fd


def open_binary(path, root, error=DgportError, fix: str = "replace it with the model's own file"):
    """`open_fd` as a binary file object (for headers and memory maps)."""
    return os.fdopen(open_fd(path, root, error, fix), "rb")


def read_bytes(path, root, error=DgportError, fix: str = "replace it with the model's own file",
               cap: int | None = None) -> bytes:
    """The whole file, refused (by its size, before reading) when over `cap` (default: cap_for)."""
    cap = cap_for(path) if cap is None else cap
    with open_binary(path, root, error, fix) as f:
        size = os.fstat(f.fileno()).st_size
        if size > cap:
            raise error(f"{path}: {size} bytes, over the {size_text(cap)} cap for this file; {fix}")
        data = f.read(cap + 1)
    if len(data) > cap:  # grew while being read
        raise error(f"{path}: over the {size_text(cap)} cap for this file; {fix}")
    return data


def read_text(path, root, error=DgportError, fix: str = "replace it with the model's own file",
              cap: int | None = None) -> str:
    data = read_bytes(path, root, error, fix, cap)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start} is {data[e.start]:#04x}); {fix}") from None


def parse_json(text, path, error=DgportError, fix: str = "replace it with the model's own file",
               constants: bool = True):
    """JSON text -> value, every failure one line: syntax, nesting (RecursionError), NaN/Infinity
    when `constants` is False."""
    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, **({} if constants else {"parse_constant": no_constant}))
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply; {fix}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not valid JSON (not UTF-8 text, byte {e.start}); {fix}") from None
    except ValueError as e:
        raise error(f"{path}: not valid JSON ({e}); {fix}") from None


def read_json(path, root, error=DgportError, fix: str = "replace it with the model's own file",
              cap: int | None = None, constants: bool = True):
    return parse_json(read_text(path, root, error, fix, cap), path, error, fix, constants)


def hash_into(h, path, root, error=DgportError, fix: str = "replace it with the model's own file"):
    """Feed the file to hashlib object `h` in chunks; returns the fstat taken before reading, or None
    when the file changed while it was read (its digest then describes no one version of it)."""
    with open_binary(path, root, error, fix) as f:
        before = os.fstat(f.fileno())
        while block := f.read(CHUNK):
            h.update(block)
        after = os.fstat(f.fileno())
    same = (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (after.st_size, after.st_mtime_ns,
                                                                       after.st_ctime_ns)
    return before if same else None


def sha256(path, root, error=DgportError, fix: str = "replace it with the model's own file"):
    """(sha256 hex digest, fstat before reading or None when it changed meanwhile)."""
    h = hashlib.sha256()
    st = hash_into(h, path, root, error, fix)
    return h.hexdigest(), st


class WriteFailed(ExportError):
    """A file of an export could not be written (a full disk: ENOSPC); the exporter removes its
    partial folder and names the file in its own message."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: could not be written ({reason}); free some space on that disk or choose "
                         "another folder")
        self.path, self.reason = Path(path), reason


@contextlib.contextmanager
def writing(path):
    """Turn a failed write of `path` into WriteFailed naming it."""
    try:
        yield
    except OSError as e:
        raise WriteFailed(path, e.strerror or str(e)) from e
