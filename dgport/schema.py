"""Typed checks for untrusted JSON (the export manifest, checkpoint configs): each check raises
`SchemaError` naming the key path, e.g. `config.canvas_length: 1000000000 is out of range (1..65536)`.

Plain functions instead of a JSON-Schema library: the rules that matter here (ranges that depend on
other keys, file names that must stay inside a folder) are code either way, and the run path keeps
no extra dependency."""
from __future__ import annotations

import math
from pathlib import PurePosixPath, PureWindowsPath

from .errors import DgportError


class SchemaError(DgportError):
    """One bad value: `path` is the key path (e.g. "config.head_dims[3]"), `problem` what is wrong."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}" if path else problem)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def is_int(value) -> bool:
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(value, path: str, lo: int | None = None, hi: int | None = None) -> int:
    if not is_int(value):
        raise SchemaError(path, f"{_show(value)} is {_type_name(value)}, expected an integer")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise SchemaError(path, f"{value} is out of range ({'' if lo is None else lo}..{'' if hi is None else hi})")
    return value


def number(value, path: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """A finite int or float in [lo, hi] ((lo, hi] with lo_open)."""
    import numbers

    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise SchemaError(path, f"{_show(value)} is {_type_name(value)}, expected a number")
    value = float(value)
    if not math.isfinite(value):
        raise SchemaError(path, f"{value} is not a finite number")
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        left, low, high = "(" if lo_open else "[", "" if lo is None else lo, "" if hi is None else hi
        raise SchemaError(path, f"{value!r} is out of range {left}{low}, {high}]")
    return value


def string(value, path: str, choices=None, max_len: int = 4096) -> str:
    if not isinstance(value, str):
        raise SchemaError(path, f"{_show(value)} is {_type_name(value)}, expected a string")
    if len(value) > max_len:
        raise SchemaError(path, f"a string of {len(value)} characters, at most {max_len} allowed")
    if choices is not None and value not in choices:
        raise SchemaError(path, f"{_show(value)} is not one of {', '.join(map(repr, choices))}")
    return value


def boolean(value, path: str) -> bool:
    if not isinstance(value, bool):
        raise SchemaError(path, f"{_show(value)} is {_type_name(value)}, expected true or false")
    return value


def array(value, path: str, item=None, min_len: int = 0, max_len: int = 1 << 20) -> list:
    """A JSON list (tuples accepted: dataclasses hold them); `item(value, path)` checks each entry."""
    if not isinstance(value, (list, tuple)):
        raise SchemaError(path, f"{_show(value)} is {_type_name(value)}, expected a list")
    if not min_len <= len(value) <= max_len:
        raise SchemaError(path, f"has {len(value)} entries, expected {min_len}..{max_len}")
    return [item(v, f"{path}[{i}]") for i, v in enumerate(value)] if item else list(value)


def obj(value, path: str, required=(), optional=(), extra: bool = False) -> dict:
    """A JSON object with the `required` keys, maybe some `optional` ones and, with `extra`, others."""
    if not isinstance(value, dict):
        raise SchemaError(path, f"{_show(value)} is {_type_name(value)}, expected an object")
    for key in required:
        if key not in value:
            raise SchemaError(f"{path}.{key}" if path else key, "missing")
    if not extra:
        unknown = sorted(set(value) - set(required) - set(optional), key=str)
        if unknown:
            key = unknown[0]
            raise SchemaError(f"{path}.{key}" if path else str(key), "unknown key")
    return value


def key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def relative_file(value, path: str) -> str:
    """A file name relative to the export folder: no absolute path, drive, `..`, backslash or NUL."""
    string(value, path, max_len=512)
    if not value or "\x00" in value or "\\" in value:
        raise SchemaError(path, f"{_show(value)} is not a relative file path inside the export")
    p = PurePosixPath(value)
    if p.is_absolute() or PureWindowsPath(value).drive or any(part in ("..", ".", "") for part in value.split("/")):
        raise SchemaError(path, f"{_show(value)} is not a relative file path inside the export")
    return value


def utf8_text(value: str, what: str) -> str:
    """`value`, if it is text that UTF-8 can encode. An undecodable byte on the command line reaches
    Python as a lone surrogate (U+DC80..U+DCFF), and so does a JSON escape such as \\ud800: refused
    here, naming `what`, instead of failing inside the tokenizer."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        what_char = (f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF
                     else f"a lone surrogate U+{code:04X}")
        raise DgportError(f"{what} is not valid UTF-8 text ({what_char} at character {e.start}); "
                          "give UTF-8 text") from None
    return value


def decode_utf8(data: bytes, what: str) -> str:
    """`data` decoded as UTF-8, or one line naming `what` and the first byte that is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DgportError(f"{what} is not valid UTF-8 (the byte 0x{data[e.start]:02x} at offset {e.start}); "
                          "save it as UTF-8") from None
