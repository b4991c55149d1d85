"""Shared ONNX exports for tests/test_onnx_*.py: each (preset, dtype) is exported once per session
(the cache is module-global, so every test module that imports the fixture shares it)."""
from __future__ import annotations

import pytest

from dgport.exporters.export import ExportOptions, export

THREADS = 2  # keep ORT modest: CI and dev boxes share 2 cores
_EXPORTS: dict = {}


@pytest.fixture(scope="session")
def onnx_exports(checkpoints, tmp_path_factory):
    """(preset, dtype) -> export folder (with_logits, validated against HF by the driver)."""

    class Lazy:
        def __getitem__(self, key):
            if key not in _EXPORTS:
                name, dtype = key
                out = tmp_path_factory.mktemp("onnx") / f"{name}-{dtype}"
                summary = export(checkpoints[name], out, ExportOptions(dtype=dtype, with_logits=True))
                _EXPORTS[key] = (out, summary)
            return _EXPORTS[key][0]

        def summary(self, key):
            self[key]
            return _EXPORTS[key][1]

    return Lazy()
