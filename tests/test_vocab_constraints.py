"""Vocabulary constraints on the device: the ONNX graphs' token_masks / token_classes inputs (defaults:
the unconstrained step, bit for bit), the masked sampler against numpy on the graph's own logits in every
head form (streamed fp32, streamed half, whole-array half, the quantized step graph), and the same tokens
for the same seed on ONNX Runtime CPU, MLX and the torch reference."""
from __future__ import annotations

import numpy as np
import pytest

import dgport
from dgport.errors import DgportError
from dgport.exporters.export import ExportOptions, export
from dgport.manifest import open_export
from dgport.runtimes.onnx import OnnxBackend

FORMS = {"fp32": {}, "bf16": dict(dtype="bf16"), "fp16": dict(dtype="fp16"), "int8": dict(quantize=8, group_size=32)}
_EXPORTS: dict = {}


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    def get(name):
        if name not in _EXPORTS:
            out = tmp_path_factory.mktemp("vc") / name
            export(checkpoints["tiny"], out, ExportOptions(with_logits=True, validate=False, **FORMS[name]))
            _EXPORTS[name] = out
        return _EXPORTS[name]

    return get


def _one_step(be: OnnxBackend, rng, masks=None, classes=None):
    cfg = be.config
    C = cfg.canvas_length
    be.reset()
    be.encode(np.array([[2, 105, 300, 301, 106]]), np.arange(5)[None])
    be.new_canvas()
    canvas = rng.integers(0, cfg.vocab_size, (1, C))
    u = rng.random((1, C), dtype=np.float32)
    be.set_token_masks(masks)
    kw = {} if classes is None else {"classes": classes}
    out = be.denoise(canvas, np.arange(5, 5 + C)[None], np.float32(0.7), u, **kw)
    return out, be.last_logits, be.sc_numpy(), u


@pytest.mark.parametrize("form", list(FORMS))
def test_graph_masks_the_sampler_and_defaults_are_the_unconstrained_step(form, exports):
    path = exports(form)
    entry = open_export(path, "cpu").format("onnx")
    sets = ["graphs", "cpu_graphs"] if "cpu_graphs" in entry else ["graphs"]
    for graph_set in sets:
        if form == "bf16" and graph_set == "graphs":
            continue  # bf16 kernels: GPUs only
        be = OnnxBackend(open_export(path, "cpu"), device="cpu", threads=2, graph_set=graph_set)
        V, C = be.config.vocab_size, be.config.canvas_length
        plain, logits, sc, u = _one_step(be, np.random.default_rng(0))
        # every class 0: the table is not read, the outputs are the default step's bit for bit
        zero, _, sc0, _ = _one_step(be, np.random.default_rng(0), np.ones((2, V), bool), np.zeros((1, C), np.int64))
        for a, b in zip(plain, zero):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(sc, sc0)
        r = np.random.default_rng(1)
        masks = np.ones((4, V), bool)
        masks[1:] = r.random((3, V)) < 0.05
        masks[3, :] = False
        masks[3, [7, 300]] = True
        classes = r.integers(0, 4, (1, C))
        got, logits2, sc2, _ = _one_step(be, np.random.default_rng(0), masks, classes)
        np.testing.assert_array_equal(logits, logits2)  # the logits output is the model's, unmasked
        allowed = masks[classes[0]]
        assert allowed[np.arange(C), got.argmax[0]].all(), (form, graph_set)
        assert allowed[np.arange(C), got.sampled[0]].all(), (form, graph_set)
        proc = np.where(allowed, logits[0].astype(np.float64) / np.float32(0.7), -np.inf)
        np.testing.assert_array_equal(got.argmax[0], proc.argmax(-1))
        p = np.exp(proc - proc.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ent = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1)
        tol = 2e-3 if form in ("fp16", "bf16") else 1e-4
        np.testing.assert_allclose(got.entropy[0], ent, rtol=tol, atol=tol)
        assert not np.allclose(sc2, sc), "self-conditioning follows the constrained distribution"


def test_default_inputs_give_the_graphs_from_before_constraints_bit_for_bit(exports, checkpoints, tmp_path):
    """A graph built without the constraint inputs (as before them) and today's graph fed only the old
    inputs compute the same bits, dense and sparse experts, and the encoder is untouched."""
    from unittest import mock

    from dgport.exporters import onnx_steps

    before = tmp_path / "before"
    with mock.patch.object(onnx_steps, "constraint_inputs", lambda *a: None):
        export(checkpoints["tiny"], before, ExportOptions(with_logits=True, validate=False))
    now = exports("fp32")
    for graph_set in ("graphs", "cpu_graphs"):
        outs = []
        for path in (before, now):
            be = OnnxBackend(open_export(path, "cpu"), device="cpu", threads=2, graph_set=graph_set)
            outs.append(_one_step(be, np.random.default_rng(3)))
        (a, la, sa, _), (b, lb, sb, _) = outs
        for x, y in zip((*a, la, sa), (*b, lb, sb)):
            np.testing.assert_array_equal(x, y)
    g = open_export(before, "cpu").format("onnx")["graphs"]["denoise_step"]
    assert not g.get("optional_inputs")


def test_bad_masks_and_classes_are_refused_in_one_line(exports):
    be = OnnxBackend(open_export(exports("fp32"), "cpu"), device="cpu", threads=2)
    V, C = be.config.vocab_size, be.config.canvas_length
    for masks, says in ((np.ones((2, V - 1), bool), "bool \\[K"), (np.ones((2, V), np.float32), "bool \\[K"),
                        (np.zeros((2, V), bool), "at least one token")):
        with pytest.raises(DgportError, match=says):
            be.set_token_masks(masks)
    be.set_token_masks(None)
    be.encode(np.array([[2, 5]]), np.arange(2)[None])
    with pytest.raises(DgportError, match="set_token_masks first"):
        be.denoise(np.zeros((1, C), np.int64), np.arange(2, 2 + C)[None], np.float32(1), np.zeros((1, C), np.float32),
                   classes=np.zeros((1, C), np.int64))
    be.set_token_masks(np.ones((2, V), bool))
    with pytest.raises(DgportError, match="in \\[0, 2\\)"):
        be.denoise(np.zeros((1, C), np.int64), np.arange(2, 2 + C)[None], np.float32(1), np.zeros((1, C), np.float32),
                   classes=np.full((1, C), 2))


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "n": {"type": "integer"}, "x": {"type": "number"},
    "ok": {"type": "boolean"}, "tag": {"enum": ["red", "green", 7, None]}, "note": {"type": "string"}}}


def test_same_seed_same_tokens_on_onnx_mlx_and_torch(checkpoints, tmp_path, torch_gens):
    out = tmp_path / "both"
    export(checkpoints["tiny"], out, ExportOptions(formats=("onnx", "mlx"), validate=False))
    gens = {"torch": torch_gens["tiny"], "cpu": dgport.load(out, backend="cpu", threads=2),
            "mlx": dgport.load(out, backend="mlx")}
    for seed in range(4):
        results = {k: g.generate([2, 105, 300, 301, 106, 107], json_schema=SCHEMA, seed=seed) for k, g in gens.items()}
        ref = results["torch"]
        for k, r in results.items():
            assert (r.token_ids, r.steps_per_canvas, r.text) == (ref.token_ids, ref.steps_per_canvas, ref.text), k
        assert set(ref.parsed) == set(SCHEMA["properties"])


@pytest.mark.parametrize("backend", ["cpu", "mlx", pytest.param("torch", marks=pytest.mark.slow)])  # torch: ~30 s
def test_batched_rows_with_and_without_schemas_equal_each_run_alone(backend, checkpoints, tmp_path, torch_gens):
    """Rows with different schemas (and a free row) share a batch: the backend's table is the rows' tables
    stacked, each row's classes offset into it; every row equals its single-row run."""
    from dgport.json_schema import compile_schema

    if backend == "torch":
        gen = torch_gens["tiny"]
    else:
        out = tmp_path / "x"
        export(checkpoints["tiny"], out, ExportOptions(formats=("onnx", "mlx"), validate=False))
        gen = dgport.load(out, backend=backend, **({"threads": 2} if backend == "cpu" else {}))
    other = {"type": "array", "items": {"type": "number"}, "maxItems": 2}
    schemas = [SCHEMA, None, other, SCHEMA]
    prompts = [[2, 105, 300, 301, 106, 107], [2, 105, 310, 106, 107], [2, 105, 320, 321, 322, 106, 107],
               [2, 105, 330, 106, 107]]
    templates = [None if s is None else compile_schema(s) for s in schemas]
    rows = gen.generate_batch(prompts, seeds=[5, 6, 7, 8], templates=templates)
    for p, s, seed, r in zip(prompts, schemas, [5, 6, 7, 8], rows):
        alone = gen.generate(p, seed=seed, json_schema=s)
        assert r.token_ids == alone.token_ids and r.text == alone.text
