"""Read safetensors files into numpy without torch, bfloat16 included (through ml_dtypes).

The `safetensors` package's numpy loader rejects bfloat16, the dtype real DiffusionGemma
checkpoints are stored in, so the file format (8-byte header length, JSON header, raw data) is
read here and the data section is memory-mapped and viewed with ml_dtypes.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from dgport.errors import CheckpointError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """Lazy view of one .safetensors file: `.shapes`, `.dtypes` and `tensor(name)` (zero-copy memmap)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e}); re-save the checkpoint") from e
        self._offset = 8 + n
        header.pop("__metadata__", None)
        self._entries = header
        size = self.path.stat().st_size
        for name, e in header.items():
            if e["dtype"] not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
            if self._offset + e["data_offsets"][1] > size:
                raise CheckpointError(f"{self.path}: truncated (tensor {name} runs past the end of the file)")
        self._mmap = None

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str):
        return np.dtype(DTYPES[self._entries[name]["dtype"]])

    def close(self) -> None:
        """Drop this reader's memory map (arrays handed out keep their own reference to it)."""
        self._mmap = None

    def tensor(self, name: str) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self._entries[name]
        start, end = e["data_offsets"]
        raw = self._mmap[self._offset + start:self._offset + end]
        return raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])
