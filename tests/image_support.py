"""What the image tests share: two test images of odd sizes on the 'vision' fixture (padding patches),
their PNG bytes, an answer's tokens, and the fp32 ONNX export of that fixture with a generator on it."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import dgport
from onnx_support import THREADS

PRESET = "vision"
_rng = np.random.default_rng(7)
IMAGES = [Image.fromarray(_rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)),
          Image.fromarray(_rng.integers(0, 256, (90, 41, 3), dtype=np.uint8))]


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def answer(res) -> list[int]:
    return res.token_ids[0]


@pytest.fixture(scope="module")
def export(onnx_exports):
    """The vision fixture's fp32 ONNX export (needs onnx_support's onnx_exports in the test module)."""
    return onnx_exports[PRESET, "fp32"]


@pytest.fixture(scope="module")
def gen(export):
    return dgport.load(export, backend="cpu", threads=THREADS)
