"""Read safetensors files into numpy without torch, bfloat16 included (through ml_dtypes).

The `safetensors` package's numpy loader rejects bfloat16, the dtype real DiffusionGemma
checkpoints are stored in, so the file format (8-byte header length, JSON header, raw data) is
read here and the data section is memory-mapped and viewed with ml_dtypes.

The header is untrusted: its length is capped (HEADER_CAP, as the safetensors package caps it) and
checked against the file, and every entry must have a known dtype, a shape of non-negative
integers and data offsets inside the data section whose span is exactly the shape's bytes, with
no two tensors overlapping. Each problem is one line naming the file and the tensor.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from dgport import safe_files
from dgport.errors import CheckpointError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
HEADER_CAP = 100_000_000  # bytes of JSON header, the safetensors package's own limit
MAX_DIMS = 16
FIX = "the file is damaged or not a safetensors file: download or save the checkpoint again"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SafetensorsFile:
    """Lazy view of one .safetensors file: `.shapes`, `.dtypes` and `tensor(name)` (zero-copy memmap).
    `root`: the folder the file must really lie in (default: its checkpoint folder's model_root)."""

    def __init__(self, path: Path, root: Path | None = None):
        self.path = Path(path)
        self.root = safe_files.model_root(self.path.parent) if root is None else Path(root)
        with safe_files.open_binary(self.path, self.root, CheckpointError, FIX) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise self._bad(f"{size} bytes, shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n > HEADER_CAP:
                raise self._bad(f"header length {n} is over the {HEADER_CAP}-byte cap")
            if 8 + n > size:
                raise self._bad(f"header length {n} is larger than the file ({size} bytes)")
            self.header_bytes = f.read(n)
        header = safe_files.parse_json(self.header_bytes, self.path, CheckpointError, FIX)
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        header.pop("__metadata__", None)
        self._offset = 8 + n
        self._entries = header
        self._check(size - self._offset)
        self._mmap = None

    def _bad(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}; {FIX}")

    def _check(self, data_size: int) -> None:
        spans = []
        for name, e in self._entries.items():
            t = f"tensor {name}"
            if not isinstance(e, dict):
                raise self._bad(f"{t}: not an object")
            for key in ("dtype", "shape", "data_offsets"):
                if key not in e:
                    raise self._bad(f"{t}: no {key}")
            dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise self._bad(f"{t}: dtype {dtype!r} is not one of {', '.join(DTYPES)} (unsupported dtype)")
            if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
                raise self._bad(f"{t}: shape {shape!r} is not a list of at most {MAX_DIMS} non-negative integers")
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
                raise self._bad(f"{t}: data_offsets {offsets!r} are not two non-negative integers")
            start, end = offsets
            if start > end:
                raise self._bad(f"{t}: data_offsets {offsets} are reversed")
            if end > data_size:
                raise self._bad(f"{t}: runs past the end of the file (bytes {start}..{end} of a {data_size}-byte "
                                "data section; truncated?)")
            nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
            if nbytes != end - start:
                dims = "x".join(map(str, shape)) or "scalar"
                raise self._bad(f"{t}: {end - start} bytes hold {dims} {dtype}, which takes {nbytes}")
            if end > start:
                spans.append((start, end, name))
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise self._bad(f"tensors {a} and {b} overlap (bytes {start}..{end})")

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype_name(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def dtype(self, name: str):
        return np.dtype(DTYPES[self._entries[name]["dtype"]])

    def close(self) -> None:
        """Drop this reader's memory map (arrays handed out keep their own reference to it)."""
        self._mmap = None

    def tensor(self, name: str) -> np.ndarray:
        if self._mmap is None:
            with safe_files.open_binary(self.path, self.root, CheckpointError, FIX) as f:
                if os.fstat(f.fileno()).st_size < self._offset + max((e["data_offsets"][1] for e in
                                                                      self._entries.values()), default=0):
                    raise self._bad("shorter than when it was opened (changed meanwhile)")
                self._mmap = np.memmap(f, dtype=np.uint8, mode="r")
        e = self._entries[name]
        start, end = e["data_offsets"]
        raw = self._mmap[self._offset + start:self._offset + end]
        return raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])
