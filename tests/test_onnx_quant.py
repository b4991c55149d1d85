"""Quantized ONNX exports (--format onnx --quantize int4|int8): the scheme (exporters/quantize.py),
the graphs (blocked DequantizeLinear, opset 21; experts dequantized after the sparse loop's gather),
their validation against the same model with dequantized weights, and bad input."""
from __future__ import annotations

import collections
import json

import ml_dtypes
import numpy as np
import pytest
from backend_checks import argmax_agreement

from dgport.errors import DgportError
from dgport.exporters.export import ExportOptions, export
from dgport.exporters.quantize import dequantize, pack4, quantize, quantized_tensors, unpack4
from dgport.manifest import read_manifest
from models.fixtures import PROMPTS, SEEDS
from onnx_support import onnx_exports  # noqa: F401

THREADS = 2  # keep ORT modest: the machine is shared
_EXPORTS: dict = {}


@pytest.fixture(scope="module")
def qexports(checkpoints, tmp_path_factory):
    """(preset, bits) -> (folder, ExportSummary); validated (the tight check included). Text-only: the
    fixtures' tiny towers have their own quantization tests (test_onnx_vision)."""

    def get(preset, bits, validate=True):
        key = (preset, bits, validate)
        if key not in _EXPORTS:
            out = tmp_path_factory.mktemp("onnxq") / f"{preset}-q{bits}"
            s = export(checkpoints[preset], out, ExportOptions(quantize=bits, group_size=32, with_logits=True,
                                                               validate=validate, text_only=True))
            _EXPORTS[key] = (out, s)
        return _EXPORTS[key]

    return get


# -- the scheme ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_roundtrip_and_error_bound(bits):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 128)).astype(np.float32)
    q, s, z = quantize(w, bits, 32)
    assert q.dtype == np.uint8 and q.max() < 2 ** bits and s.shape == (24, 4) and z.shape == (24, 4)
    # scales are bf16 values, so (q - z) * s is exact in fp32 and equals MLX's q * s + (-z * s)
    assert np.array_equal(s.astype(ml_dtypes.bfloat16).astype(np.float32), s)
    d = dequantize(q, s, z, 32)
    mlx_form = (q.reshape(24, 4, 32) * s[..., None] + (-(z.astype(np.float32) * s))[..., None]).reshape(24, 128)
    assert np.array_equal(d, mlx_form)
    # every weight within half a step of its dequantized value (the scale is rounded up to bf16)
    step = np.repeat(s, 32, axis=1)
    assert np.all(np.abs(d - w) <= 0.5 * step * (1 + 1e-6))


def test_pack4_is_onnx_int4_order():
    v = np.arange(16, dtype=np.uint8).reshape(2, 8) % 16
    p = pack4(v)
    assert p.shape == (2, 4) and p[0, 0] == (0 | (1 << 4)) and np.array_equal(unpack4(p), v)


def test_constant_and_zero_groups_are_exact():
    w = np.zeros((2, 64), np.float32)
    w[1, :32] = 3.75  # 15 x 0.25: the scale is a bf16 value, the group dequantizes exactly
    w[1, 32:] = -1.875
    assert np.array_equal(dequantize(*quantize(w, 4, 32), 32), w)


# -- exports -------------------------------------------------------------------------------
def _optimized(path):
    """The graph onnxruntime's CPU EP runs (after its fusions)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(path.parent / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    m = onnx.load(so.optimized_model_filepath, load_external_data=False)
    (path.parent / "optimized.onnx").unlink()
    return m.graph


def _all_nodes(graph):
    """Every node of a graph and of its subgraphs (Loop bodies)."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.g.node:
                yield from _all_nodes(a.g)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_export_validates_against_dequantized_model(qexports, bits):
    out, summary = qexports("tiny", bits)
    v = summary.validation
    # tight: the graphs compute what the dequantized weights in fp32 compute (checks the graph); one
    # graph set: quantized exports run the unrolled sparse experts on every device by default
    assert "onnx vs dequantized fp32 (gpu graphs)" not in v
    assert max(v["onnx vs dequantized fp32"].values()) <= 1e-5, v
    # against the unquantized model: the quantization's cost, reported (random fixture: large)
    assert "onnx" in v and np.isfinite(max(v["onnx"].values()))
    m = read_manifest(out)  # passes the manifest schema
    entry = m.format("onnx")
    q = entry["quantization"]
    assert q["bits"] == bits and q["group_size"] == 32 and q["scheme"] == "affine-zp"
    per_tensor = entry["quantized_tensors"]
    assert set(per_tensor) == set(quantized_tensors(m.config, bits))
    emb = per_tensor["model.decoder.embed_tokens.weight"]
    assert emb["bits"] == 8 and 0 < emb["rel_error"] < 0.02
    assert "model.decoder.layers.0.router.proj.weight" not in per_tensor
    assert q["roles"]["experts"]["bits"] == bits and q["roles"]["embedding"]["bits"] == 8
    assert q["roles"]["attention"]["bits"] == 8 and q["roles"]["dense MLP"]["bits"] == bits
    # 4 bits: ~8 % relative weight error on random Gaussian weights, 8 bits ~0.5 %
    assert q["roles"]["experts"]["max_rel_error"] < (0.12 if bits == 4 else 0.01)
    tensors = entry["weights"]["tensors"]
    assert tensors["layers.0.router"]["dtype"] == "fp32"
    assert tensors["layers.0.attn.qkv.q"]["dtype"] == "uint8"  # attention: 8 bits in int4 exports too
    assert tensors["layers.0.mlp.gate_up.q"]["dtype"] == ("uint4" if bits == 4 else "uint8")
    assert tensors["layers.0.experts.gate_up.3.q"]["dtype"] == ("uint4" if bits == 4 else "uint8")
    assert tensors["layers.0.experts.gate_up.3.scale"]["dtype"] == "bf16"
    assert tensors["embed_tokens.q"]["dtype"] == "uint8"
    # onnxruntime fuses the constant weights' DequantizeLinear -> MatMul into MatMulNBits on the CPU EP:
    # q/k/v, o, gate_up and down per layer, the self-conditioning MLP's two, and every expert's two
    # (the sparse form is unrolled: no Loop)
    cfg = m.config
    # one graph set, one graph for encoding and denoising: each weight feeds one MatMulNBits kernel, so
    # onnxruntime keeps one packed copy of it (two graphs would be two sessions, two packed copies)
    assert "cpu_graphs" not in entry and set(entry["graphs"]) == {"step"} and entry["moe"]["cuda"] == {"step": "sparse"}
    graph = _optimized(out / entry["graphs"]["step"]["file"])
    ops = collections.Counter(n.op_type for n in graph.node)
    # (the tied lm_head is not among them: the streamed head computes it from the 8-bit table's chunks)
    assert ops["MatMulNBits"] == 4 * cfg.num_layers + 2 + 2 * cfg.num_experts * cfg.num_layers, ops
    # left unfused: the embedding rows' DequantizeLinear, and the streamed head's Loop over chunks of
    # the table (no fp32 copy of the whole table and no packed one, at load or per step): one Loop in each
    # branch of the If that picks the vocabulary-constrained head or the plain one, so one runs per step
    loops = [n for n in _all_nodes(graph) if n.op_type == "Loop"]
    assert ops["If"] == 1 and len(loops) == 2 and ops["DequantizeLinear"] == 1, ops
    # and those (the embedding rows', and the table chunks' in each branch's Loop) are per-axis (over
    # [rows * H/g, g] blocks), not blocked: the CUDA EP runs blocked DequantizeLinear for 4-bit types only
    # and fails on a blocked uint8 one at run time
    left = [n for n in _all_nodes(graph) if n.op_type == "DequantizeLinear"]
    assert len(left) == 3 and all(a.i == 0 for n in left for a in n.attribute if a.name == "block_size"), left


@pytest.mark.parametrize("flag", [{"denoise_moe": "dense"}, {"encoder_moe": "dense"}])
def test_quantized_dense_experts_refused(checkpoints, tmp_path, flag):
    """Quantized experts run only as unrolled constants (fused into MatMulNBits): a dense form asked
    for would be silently ignored, so it is refused before anything is written."""
    with pytest.raises(DgportError) as e:
        export(checkpoints["tiny"], tmp_path / "q", ExportOptions(quantize=4, **flag))
    assert "--quantize" in _one_line(e.value) and "moe" in _one_line(e.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_quantization_that_costs_too_much_is_refused(checkpoints, tmp_path, monkeypatch):
    """The loose gate against the unquantized model: a scheme far lossier than int4 (its 16 codes
    collapsed to 2) still passes the tight check (the graph computes its own dequantized weights
    exactly) but changes the outputs of a trained model past QUANT_LIMIT, so it is refused and
    nothing is written. (Measured on the shipped Sudoku model: this scheme 0.13, the real int4 0.015.
    The random fixtures are either too sensitive to rounding for the gate to apply, or, like eos,
    barely read their MLPs: 0.07 there with 69 % MLP weight error.)"""
    from pathlib import Path

    from dgport.errors import ExportError
    from dgport.exporters import quantize as qmod

    real = qmod.quantize

    def two_levels(w, bits, group):
        q, s, z = real(w, bits, group)
        return ((q // 8) * 8 + 4).astype(q.dtype), s, z

    monkeypatch.setattr(qmod, "quantize", two_levels)
    with pytest.raises(ExportError, match="changes the model's outputs too much"):
        export(Path(__file__).resolve().parents[1] / "models" / "sudoku", tmp_path / "q", ExportOptions(quantize=4))
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_quantized_weights_smaller(qexports, onnx_exports):
    sizes = {bits: qexports("tiny", bits, validate=False)[1].files["weights.bin"] for bits in (4, 8)}
    entry = read_manifest(onnx_exports[("tiny", "fp32")]).format("onnx")
    tower = set(entry["vision_graph"]["weights"])  # the fp32 export's tower, left out of the comparison
    fp32 = onnx_exports.summary(("tiny", "fp32")).files["weights.bin"] - \
        sum(t["nbytes"] for name, t in entry["weights"]["tensors"].items() if name in tower)
    assert sizes[4] < sizes[8] < fp32 / 2, (sizes, fp32)


@pytest.mark.slow
def test_quantized_agreement_with_fp32_reported(qexports, onnx_exports):
    """Teacher-forced argmax and generated-token agreement with the fp32 export, as the MLX 4-bit
    test reports them (gated on the confident fixtures only: the near-uniform ones are at chance)."""
    import dgport
    from dgport.runtimes.onnx import OnnxBackend

    report = {}
    for preset in ("confident", "eos"):
        fp_dir = onnx_exports[(preset, "fp32")]
        for bits in (4, 8):
            q_dir = qexports(preset, bits, validate=False)[0]
            argmax = argmax_agreement(OnnxBackend(read_manifest(fp_dir), threads=THREADS),
                                       OnnxBackend(read_manifest(q_dir), threads=THREADS), 5)
            fp, qg = dgport.load(fp_dir, backend="cpu"), dgport.load(q_dir, backend="cpu")
            same = total = 0
            for prompt in PROMPTS[preset]:
                for seed in SEEDS:
                    a, b = fp.generate(prompt, seed=seed).token_ids[0], qg.generate(prompt, seed=seed).token_ids[0]
                    n = min(len(a), len(b))
                    same += int(np.sum(np.array(a[:n]) == np.array(b[:n])))
                    total += max(len(a), len(b))
            report[(preset, bits)] = {"argmax": round(argmax, 3), "tokens": round(same / max(total, 1), 3)}
    print(f"\nONNX quantized (group 32) vs fp32 agreement: {report}")
    # measured 2026-11-30 (runtime default, accuracy level 4; int4 with attention at 8 bits): argmax int8
    # 1.0 / 0.993, int4 0.958 / 0.979 (confident / eos); tokens int8 0.20 / 0.73, int4 0.20 / 0.57
    # (unrelated fp32 streams agree at ~0.06, tests/test_mlx_e2e.py)
    assert min(r["argmax"] for (p, b), r in report.items() if b == 8) >= 0.95, report
    assert min(r["argmax"] for (p, b), r in report.items() if b == 4) >= 0.80, report
    assert np.mean([r["tokens"] for r in report.values()]) >= 0.15, report


# -- bad input -----------------------------------------------------------------------------
def _one_line(err: Exception) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, msg
    return msg


def test_group_size_not_dividing_names_the_tensor(checkpoints, tmp_path):
    # the fixture's intermediate width is 96: group 64 cannot divide the down projections' input
    out = tmp_path / "q"
    with pytest.raises(DgportError) as e:
        export(checkpoints["tiny"], out, ExportOptions(quantize=4, group_size=64))
    msg = _one_line(e.value)
    assert "--group-size 64" in msg and "down_proj.weight" in msg and "96" in msg and "--group-size 32" in msg
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("formats", [("onnx",), ("onnx", "mlx")])
def test_quantize_with_half_dtype_refused_for_onnx(checkpoints, tmp_path, formats):
    with pytest.raises(DgportError) as e:
        export(checkpoints["tiny"], tmp_path / "q", ExportOptions(formats=formats, quantize=4, dtype="bf16"))
    msg = _one_line(e.value)
    assert "--quantize" in msg and "--dtype bf16" in msg
    assert not list(tmp_path.iterdir())


def test_quantize_3_refused(checkpoints, tmp_path):
    with pytest.raises(DgportError) as e:
        export(checkpoints["tiny"], tmp_path / "q", ExportOptions(quantize=3))
    assert "--quantize 3" in _one_line(e.value)


def test_manifest_rejects_bad_uint4_size(qexports):
    from dgport import schema as S
    from dgport.manifest_schema import _onnx_weights

    out, _ = qexports("tiny", 4, validate=False)
    entry = json.loads((out / "dgport.json").read_text())["formats"]["onnx"]
    t = entry["weights"]["tensors"]["layers.0.mlp.gate_up.q"]
    t["nbytes"] += 1
    with pytest.raises(S.SchemaError):
        _onnx_weights(entry["weights"], "formats.onnx.weights", {})


# -- the size plan (dgport export --plan) -------------------------------------------------------
REAL_CONFIG = "diffusiongemma-26B-A4B-it.config.json"


def _plan_for(checkpoint, **kw):
    from dgport.exporters.plan import plan

    return plan(checkpoint, ExportOptions(**kw))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["q4", "q8", "fp32", "bf16"])
def test_plan_matches_real_export(kind, qexports, onnx_exports, checkpoints):
    if kind.startswith("q"):
        bits = int(kind[1])
        out, summary = qexports("tiny", bits, validate=False)
        p = _plan_for(checkpoints["tiny"], quantize=bits, group_size=32, text_only=True)  # as qexports
    else:
        summary = onnx_exports.summary(("tiny", kind))
        p = _plan_for(checkpoints["tiny"], dtype=kind)
    actual = summary.files["weights.bin"]
    assert p["weights_bytes"] <= actual <= p["weights_bytes"] + p["padding_max"], (actual, p["weights_bytes"])


def test_plan_of_the_real_config(tmp_path):
    from pathlib import Path

    data = Path(__file__).parent / "data"
    (tmp_path / "config.json").write_text((data / REAL_CONFIG).read_text())
    p4 = _plan_for(tmp_path, quantize=4, group_size=64)
    bf16 = _plan_for(tmp_path, dtype="bf16")
    assert p4["weights_bytes"] <= 16e9  # the size target for the int4 export
    # the estimated CPU peak: within 18 GB at accuracy level 0 (no packed or fp32 copy of the table, no
    # whole-vocabulary sampler arrays: the streamed head); level 4's block sums take it past 18 GB
    assert p4["rss_by_level"][0] <= 18e9 < p4["rss_by_level"][4] < 19.5e9, p4["rss_by_level"]
    assert 48e9 < bf16["weights_bytes"] < 53e9  # the released checkpoint is ~52 GB of bf16 (with the vision tower)
    with pytest.raises(DgportError) as e:
        _plan_for(tmp_path, quantize=4, group_size=128)  # 2112 and 704 are not multiples of 128
    assert "2112" in _one_line(e.value) and "--group-size 32 or 64" in str(e.value)


def test_cli_plan_writes_nothing(tmp_path):
    from pathlib import Path

    from click.testing import CliRunner

    from dgport.cli import cli

    data = Path(__file__).parent / "data"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text((data / REAL_CONFIG).read_text())
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "src"), str(tmp_path / "out"), "--plan",
                                 "--quantize", "int4"])
    assert r.exit_code == 0, r.output
    assert "weights.bin" in r.output and "experts" in r.output and not (tmp_path / "out").exists()


# -- one scheme for ONNX and MLX ----------------------------------------------------------------
def _onnx_tensor(folder, entry, name):
    t = entry["weights"]["tensors"][name]
    raw = np.fromfile(folder / entry["weights"]["file"], np.uint8, count=t["nbytes"], offset=t["offset"])
    if t["dtype"] == "uint4":
        return unpack4(raw.reshape(*t["shape"][:-1], t["shape"][-1] // 2))
    if t["dtype"] == "bf16":
        return raw.view(ml_dtypes.bfloat16).astype(np.float32).reshape(t["shape"])
    return raw.reshape(t["shape"])


@pytest.mark.slow
def test_onnx_and_mlx_dequantize_to_the_same_weights(checkpoints, tmp_path):
    mx = pytest.importorskip("mlx.core")
    import dgport
    from dgport.exporters.checkpoint import read_checkpoint

    out = tmp_path / "both"
    export(checkpoints["eos"], out, ExportOptions(formats=("onnx", "mlx"), quantize=4, group_size=32, validate=False))
    m = read_manifest(out)
    entry = m.format("onnx")
    ckpt = read_checkpoint(checkpoints["eos"])
    mlx_layer = mx.load(str(out / "mlx" / "layer-001.safetensors"))
    mlx_glob = mx.load(str(out / "mlx" / "globals.safetensors"))

    def onnx_deq(key):  # ONNX layout [.., in, out] -> transformers [.., out, in]
        q, s, z = (_onnx_tensor(out, entry, f"{key}.{p}") for p in ("q", "scale", "zp"))
        return dequantize(np.swapaxes(q, -1, -2), np.swapaxes(s, -1, -2), np.swapaxes(z, -1, -2), 32)

    def mlx_deq(w, name, bits):
        return np.array(mx.dequantize(w[f"{name}.weight"], w[f"{name}.scales"], w[f"{name}.biases"], group_size=32,
                                      bits=bits))

    # attention q (the first columns of the fused q/k/v), an expert, the embedding (8 bits)
    q_hf = ckpt.tensor("model.decoder.layers.1.self_attn.q_proj.weight")
    onnx_q = onnx_deq("layers.1.attn.qk")[: q_hf.shape[0]]
    mlx_q = mlx_deq(mlx_layer, "layers.1.self_attn.q_proj", 8)  # attention: 8 bits
    assert np.array_equal(onnx_q, mlx_q) and np.array_equal(onnx_q, dequantize(*quantize(q_hf, 8, 32), 32))
    up_hf = ckpt.tensor("model.decoder.layers.1.mlp.up_proj.weight")
    onnx_up = onnx_deq("layers.1.mlp.gate_up")[-up_hf.shape[0]:]
    mlx_up = mlx_deq(mlx_layer, "layers.1.mlp.up_proj", 4)
    assert np.array_equal(onnx_up, mlx_up) and np.array_equal(onnx_up, dequantize(*quantize(up_hf, 4, 32), 32))
    onnx_e = onnx_deq("layers.1.experts.down.2")
    mlx_e = mlx_deq(mlx_layer, "layers.1.experts.down_proj", 4)[2]
    assert np.array_equal(onnx_e, mlx_e)
    t = entry["weights"]["tensors"]
    emb = dequantize(*(_onnx_tensor(out, entry, f"embed_tokens.{p}") for p in ("q", "scale", "zp")), 32)
    assert t["embed_tokens.q"]["dtype"] == "uint8"
    assert np.array_equal(emb, mlx_deq(mlx_glob, "embed_tokens", 8))
    # generated tokens: the two runtimes on the same dequantized weights (reported; rounding order differs)
    o, x = dgport.load(out, backend="cpu"), dgport.load(out, backend="mlx")
    same = total = 0
    for prompt in PROMPTS["eos"]:
        for seed in SEEDS:
            a, b = o.generate(prompt, seed=seed).token_ids[0], x.generate(prompt, seed=seed).token_ids[0]
            n = min(len(a), len(b))
            same += int(np.sum(np.array(a[:n]) == np.array(b[:n])))
            total += max(len(a), len(b))
    # measured: 1.000 with the ONNX runtime at accuracy level 0, 0.750 at level 4 (int8 activations, the default)
    print(f"\nONNX int4 vs MLX int4 (same weights) generated-token agreement: {same / total:.3f}")
    assert same / total >= 0.5


def test_bench_memory_runs_on_a_quantized_export(qexports, capsys):
    """bench/bench_memory.py (the figures of bench/RESULTS.md's memory table) runs on the step graph."""
    from bench import bench_memory

    out, _ = qexports("tiny", 4, validate=False)
    bench_memory.main([str(out), "--prompt", "5", "--steps", "2"])
    text = capsys.readouterr().out
    assert "VmHWM" in text and "denoise steps (canvas 16) ms [" in text and "argmax [" in text


def test_bench_quant_rebuilds_exports_older_than_the_exporter(tmp_path):
    """bench_quant reuses the exports in its work folder only when they are newer than the exporter's
    code: a cached export from an earlier graph builder would benchmark that builder."""
    import os

    from bench.bench_quant import needs_export

    assert needs_export(tmp_path)
    (tmp_path / "dgport.json").write_text("{}")
    assert not needs_export(tmp_path)
    os.utime(tmp_path / "dgport.json", (0, 0))
    assert needs_export(tmp_path)


def test_bench_quant_sudoku_reports_each_band_and_the_activations_share(tmp_path, capsys):
    """`bench_quant --sudoku`: one table per givens band; level 4's agreement with its level-0 twin (the
    int8 activations' error apart from the weights') beside the agreement with fp32."""
    from bench import bench_quant

    out = tmp_path / "r.json"
    bench_quant.main(["--sudoku", "--puzzles", "2", "--threads", "1", "--givens", "50,60;44,45", "--template",
                      "--workdir", str(tmp_path), "--json", str(out)])
    r = json.loads(out.read_text())
    assert list(r) == ["50-60", "44-45"]
    for band in r.values():
        assert band["fp32"]["token_agreement"] == 1.0 and band["fp32"]["agreement_with_level_0"] is None
        assert 0.5 < band["int8 acc4"]["agreement_with_level_0"] <= 1.0 and band["int8"]["agreement_with_level_0"] is None
    text = capsys.readouterr().out
    assert text.count("| export | solve rate |") == 2 and "44-45 givens, CPU EP, answer template" in text
    with pytest.raises(SystemExit):
        bench_quant.main(["--sudoku", "--givens", "50;60"])


def test_gemm_ceiling_counts_the_steps_products_and_runs_them_fused():
    """bench/gemm_ceiling.py bounds the int4 step against transformers from the products alone: its
    list must be the step's (bench_quant's FLOP count, less attention scores, the head and the
    self-conditioning MLP), and onnxruntime must run each as MatMulNBits at both bit widths."""
    import json

    import numpy as np

    from bench.bench_quant import step_flops
    from bench.gemm_ceiling import CONFIG, _onnx_session, gemms
    from dgport.config import TextConfig

    cfg = TextConfig.from_hf(json.loads(CONFIG.read_text()))
    C, H, I, V = 256, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    products = sum(2 * m * k * n for i in range(cfg.num_layers) for shapes in gemms(cfg, C, i).values()
                   for m, k, n, _ in shapes)
    scores = sum(2 * 2 * cfg.num_heads * cfg.head_dims[i] * C * C for i in range(cfg.num_layers))
    assert products == step_flops(cfg, C, 0) - scores - 2 * C * (3 * H * I + 2 * H * V)
    assert {bits for shapes in gemms(cfg, C, 0).values() for *_, bits in shapes} == {4, 8}
    run, fused = _onnx_session([(16, 128, 64, 4), (8, 128, 32, 8)], threads=1, level=4)
    assert fused == 2 and np.isfinite(run()[0])
    run, fused = _onnx_session([(16, 128, 64, 8)], threads=1, level=0, w8a8=True)
    assert fused == 1 and np.isfinite(run()[0])
