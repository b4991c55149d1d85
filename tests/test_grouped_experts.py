"""Grouped experts (exporters/onnx_grouped.py, `--encoder-moe/--denoise-moe grouped`): the same function
as the reference's loop over experts, for any routing (no token is ever dropped, however skewed), and
exports with it generate the reference's tokens."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import dgport
from backend_checks import assert_generates_like_torch
from dgport.errors import DgportError
from dgport.exporters.export import ExportOptions, export
from dgport.exporters.onnx_builder import FLOAT, INT64, Builder
from dgport.exporters.onnx_graph import Model
from dgport.exporters.onnx_grouped import grouped_experts
from onnx_support import THREADS, onnx_exports  # noqa: F401

E, K, H, M = 8, 3, 16, 12


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _reference(y, topi, topw, wgu, wd):
    """The reference's loop in float64: per expert in order, its routed tokens, index_add."""
    out = np.zeros(y.shape, np.float64)
    for e in range(E):
        tok, pos = np.nonzero(topi == e)
        if not len(tok):
            continue
        gu = y[tok].astype(np.float64) @ wgu[e]
        o = (_gelu_tanh(gu[:, :M]) * gu[:, M:]) @ wd[e]
        np.add.at(out, tok, o * topw[tok, pos][:, None])
    return out


@pytest.fixture(scope="module")
def session():
    """A graph holding only the grouped experts: y [N,H], topi/topw [N,K], the weights as inputs."""
    import onnxruntime as ort

    cfg = SimpleNamespace(moe_intermediate_size=M, num_experts=E, top_k_experts=K, rms_norm_eps=1e-6)
    b = Builder("grouped_only", store=None, md=FLOAT)
    m = Model(b, cfg, "decoder")
    ins = [b.input("y", FLOAT, ["n", H]), b.input("topi", INT64, ["n", K]), b.input("topw", FLOAT, ["n", K]),
           b.input("wgu", FLOAT, [E, H, 2 * M]), b.input("wd", FLOAT, [E, M, H])]
    b.output("out", grouped_experts(m, *ins), FLOAT, ["n", H])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    return ort.InferenceSession(b.model().SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _routing(rng, n, kind):
    if kind == "random":
        topi = np.stack([rng.permutation(E)[:K] for _ in range(n)])
    elif kind == "all-same":  # every token to the same K experts: capacity n, the rest empty
        topi = np.tile(rng.permutation(E)[:K], (n, 1))
    else:  # "skewed": expert 0 in every token, the others random
        topi = np.stack([np.r_[0, 1 + rng.permutation(E - 1)[:K - 1]] for _ in range(n)])
        topi = np.stack([rng.permutation(row) for row in topi])
    return topi.astype(np.int64), rng.random((n, K), dtype=np.float32)


@pytest.mark.parametrize("kind", ["random", "all-same", "skewed"])
@pytest.mark.parametrize("n", [1, 5, 40])
def test_grouped_equals_reference_loop_for_any_routing(session, kind, n):
    rng = np.random.default_rng(n + len(kind))
    y = rng.standard_normal((n, H), dtype=np.float32)
    wgu = (rng.standard_normal((E, H, 2 * M)) / 4).astype(np.float32)
    wd = (rng.standard_normal((E, M, H)) / 4).astype(np.float32)
    topi, topw = _routing(rng, n, kind)
    (out,) = session.run(None, {"y": y, "topi": topi, "topw": topw, "wgu": wgu, "wd": wd})
    ref = _reference(y, topi, topw, wgu, wd)
    assert out.shape == (n, H)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def _grouped_export(checkpoints, tmp_path, preset):
    out = tmp_path / f"grouped-{preset}"
    summary = export(checkpoints[preset], out, ExportOptions(encoder_moe="grouped", denoise_moe="grouped",
                                                               with_logits=True))
    assert dgport.manifest.open_export(out, "cpu").format("onnx")["moe"] == \
        {dev: {"encoder": "grouped", "denoise_step": "grouped"} for dev in ("cpu", "cuda")}
    errs = summary.validation["onnx"]  # the driver's gate against transformers, fp32's 1e-5
    assert {"encoder_kv", "step_logits"} <= set(errs) and max(errs.values()) <= 1e-5, errs
    return out


def test_grouped_export_passes_the_gate_and_steps_like_the_default(checkpoints, onnx_exports, tmp_path):
    """Both graphs grouped: within 1e-5 of transformers, and the denoise step's argmax equals the default
    (sparse on the CPU) export's."""
    gen = dgport.load(_grouped_export(checkpoints, tmp_path, "tiny"), backend="cpu", threads=THREADS)
    base = dgport.load(onnx_exports[("tiny", "fp32")], backend="cpu", threads=THREADS)
    rng = np.random.default_rng(0)
    cfg = gen.backend.config
    C, V = cfg.canvas_length, cfg.vocab_size
    prompt, canvas = rng.integers(0, V, size=(1, 13)), rng.integers(0, V, size=(1, C))
    steps = []
    for g in (gen, base):
        g.backend.reset()
        g.backend.encode(prompt, np.arange(13)[None])
        g.backend.new_canvas()
        steps.append(g.backend.denoise(canvas, np.arange(13, 13 + C)[None], np.float32(0.7),
                                       np.full((1, C), 0.5, np.float32)))
    a, b = steps
    assert np.array_equal(a.argmax, b.argmax)
    assert np.abs(a.entropy - b.entropy).max() <= 1e-4


@pytest.mark.slow
def test_grouped_export_generates_like_torch(checkpoints, torch_gens, tmp_path):
    gen = dgport.load(_grouped_export(checkpoints, tmp_path, "long-context"), backend="cpu", threads=THREADS)
    assert_generates_like_torch(gen, torch_gens["long-context"], "long-context")


def test_grouped_bf16_cpu_graph_passes_the_bf16_gate(checkpoints, tmp_path):
    """A bf16 export's fp32-compute CPU graph with grouped experts: written where the manifest says, and
    validated by the driver against transformers at bf16's tolerance (the export fails otherwise)."""
    out = tmp_path / "bf16"
    summary = export(checkpoints["tiny"], out, ExportOptions(dtype="bf16", denoise_moe="grouped"))
    entry = dgport.manifest.open_export(out, "cpu").format("onnx")
    assert entry["moe"]["cpu"]["denoise_step"] == "grouped"
    assert entry["cpu_graphs"]["denoise_step"]["file"] == "denoise_step.fp32compute.onnx"
    assert summary.validation["onnx"]


@pytest.mark.parametrize("opts,message", [
    (dict(denoise_moe="fast"), "--denoise-moe 'fast': choose auto, sparse, unrolled, dense or grouped"),
    (dict(encoder_moe="fast"), "--encoder-moe 'fast': choose auto, sparse, unrolled, dense or grouped"),
    (dict(denoise_moe="grouped", quantize=8), "--denoise-moe grouped with --quantize"),
])
def test_bad_expert_forms_are_refused(checkpoints, tmp_path, opts, message):
    with pytest.raises(DgportError, match=message):
        export(checkpoints["tiny"], tmp_path / "o", ExportOptions(**opts))
    assert not (tmp_path / "o").exists()
