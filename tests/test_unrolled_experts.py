"""Unrolled experts (`--encoder-moe/--denoise-moe unrolled`, the CPU's default for unquantized exports):
the reference's loop over experts written out one expert at a time, each expert's weights its own
initializer over the bytes of the stacked tensor (a manifest "view", no second copy). Same function
as the Loop, bit for bit on the CPU EP; the weights file is no larger."""
from __future__ import annotations

import json

import numpy as np
import pytest

import dgport
from dgport.exporters.export import ExportOptions, export
from onnx_support import THREADS, onnx_exports  # noqa: F401

FORMS = ("sparse", "unrolled")


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("unrolled")
    out = {}
    for dtype in ("fp32", "bf16"):
        for form in FORMS:
            out[dtype, form] = root / f"{dtype}-{form}"
            export(checkpoints["tiny"], out[dtype, form],
                   ExportOptions(dtype=dtype, encoder_moe=form, denoise_moe=form, validate=False))
    return out


def _encode_and_step(path):
    gen = dgport.load(path, backend="cpu", threads=THREADS)
    be, cfg = gen.backend, gen.backend.config
    rng = np.random.default_rng(3)
    prompt, canvas = rng.integers(0, cfg.vocab_size, size=(1, 21)), rng.integers(0, cfg.vocab_size, size=(1, cfg.canvas_length))
    be.reset()
    be.encode(prompt, np.arange(21)[None])
    kv = [np.asarray(be.cache_numpy(i)) for i in range(cfg.num_layers)]
    be.new_canvas()
    step = be.denoise(canvas, np.arange(21, 21 + cfg.canvas_length)[None], np.float32(0.7),
                      rng.random((1, cfg.canvas_length), dtype=np.float32))
    return kv, step


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_unrolled_equals_the_loop_bit_for_bit(exports, dtype):
    (kv_a, a), (kv_b, b) = (_encode_and_step(exports[dtype, f]) for f in FORMS)
    for x, y in zip(kv_a, kv_b):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert np.array_equal(a.argmax, b.argmax) and np.array_equal(a.entropy, b.entropy)


def test_expert_weights_are_views_of_one_stored_tensor(exports):
    """Each expert's initializer is a slice of the stacked tensor: the weights file is the Loop export's
    size, and the manifest says which tensor each view reads."""
    sizes = {f: (exports["fp32", f] / "weights.bin").stat().st_size for f in FORMS}
    assert sizes["unrolled"] == sizes["sparse"]
    tensors = json.loads((exports["fp32", "unrolled"] / "dgport.json").read_text())["formats"]["onnx"]["weights"]["tensors"]
    views = {n: t for n, t in tensors.items() if "view_of" in t}
    assert views
    for name, t in views.items():
        parent = tensors[t["view_of"]]
        e = int(name.rsplit(".", 1)[1])
        assert name == f"{t['view_of']}.{e}" and t["shape"] == parent["shape"][1:]
        assert t["offset"] == parent["offset"] + e * t["nbytes"]


def test_default_cpu_graphs_unroll_the_experts(onnx_exports):
    """Unquantized exports: the CPU runs the unrolled form in both graphs; GPUs keep theirs."""
    entry = dgport.manifest.open_export(onnx_exports[("tiny", "fp32")], "cpu").format("onnx")
    assert entry["moe"] == {"cpu": {"encoder": "unrolled", "denoise_step": "unrolled"},
                            "cuda": {"encoder": "sparse", "denoise_step": "dense"}}
