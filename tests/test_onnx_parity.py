"""ONNX graphs vs the transformers modules on the same inputs (fp32 exports, ORT CPU EP)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import ALL_PRESETS
from dgport.exporters.checkpoint import read_checkpoint
from dgport.exporters.validation import compare, max_abs_rel_err, rel_err, validate_export
from dgport.exporters.onnx_graph import rope_inv_freq_f32
from dgport.manifest import open_export
from dgport.runtimes.onnx import OnnxBackend
from dgport.runtimes.torch_ref import TorchRefBackend
from onnx_support import THREADS, onnx_exports  # noqa: F401


@pytest.mark.slow
@pytest.mark.parametrize("graph_set", ["cpu_graphs", "graphs"])  # denoise-step experts unrolled (CPU) / dense (GPU)
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_fp32_parity_with_hf(preset, graph_set, onnx_exports, checkpoints, hf_models):
    out = onnx_exports[(preset, "fp32")]
    # the export driver validated both graph sets (exporters/validation.py: 1e-5 norm-wise, or as
    # close to float64 as transformers' own fp32); the export would have raised otherwise
    validation = onnx_exports.summary((preset, "fp32")).validation
    for name in ("onnx", "onnx gpu graphs"):
        assert {"encoder_kv", "step_logits", "step_entropy"} <= set(validation[name]), validation
    backend = OnnxBackend(open_export(out, "cpu"), threads=THREADS, graph_set=graph_set)
    assert backend.graphs["denoise_step"]["moe"] == ("unrolled" if graph_set == "cpu_graphs" else "dense")
    ref = TorchRefBackend(checkpoints[preset], model=hf_models[preset])
    errs = compare(backend, ref, backend.config, seed=7)
    assert set(errs) == {"encoder_kv", "step_logits", "step_entropy"}
    # the gate on other inputs: <= 1e-5, or at least as close to float64 as transformers' fp32 is
    report = validate_export(backend, read_checkpoint(checkpoints[preset]), "onnx", "fp32", None, rel_err, seed=7)
    print(f"\n{preset}: vs HF fp32 {errs}; gate report {report}")
    # the elementwise measure (max |diff| / max |ref|) stays at fp32 noise level too
    loose = compare(backend, ref, backend.config, seed=7, metric=max_abs_rel_err)
    assert max(loose.values()) <= 5e-5, loose


@pytest.mark.parametrize("preset", ["tiny", "long-context"])
def test_step_outputs_match_reference_sampler(preset, onnx_exports, checkpoints, hf_models):
    """argmax / entropy / inverse-CDF samples / self-conditioning across steps."""
    backend = OnnxBackend(open_export(onnx_exports[(preset, "fp32")], "cpu"), threads=THREADS)
    ref = TorchRefBackend(checkpoints[preset], model=hf_models[preset])
    cfg = backend.config
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, cfg.vocab_size, size=(1, 2 * cfg.sliding_window + 1))
    pos = np.arange(prompt.shape[1])[None]
    for b in (backend, ref):
        b.encode(prompt, pos)
        b.new_canvas()
    canvas = rng.integers(0, cfg.vocab_size, size=(1, cfg.canvas_length))
    cpos = np.arange(prompt.shape[1], prompt.shape[1] + cfg.canvas_length)[None]
    for t in (0.8, 0.6, 0.5):
        u = rng.random((1, cfg.canvas_length), dtype=np.float32)
        a = backend.denoise(canvas, cpos, np.float32(t), u)
        r = ref.denoise(canvas, cpos, np.float32(t), u)
        np.testing.assert_array_equal(a.argmax, r.argmax)
        np.testing.assert_array_equal(a.sampled, r.sampled)
        np.testing.assert_allclose(a.entropy, r.entropy, rtol=1e-5, atol=1e-6)
        canvas = r.sampled
    # sliding caches hold exactly the last sliding_window - 1 positions
    for i in cfg.sliding_layers:
        k, _ = backend.cache_numpy(i)
        assert k.shape[2] == cfg.sliding_cache_len
        np.testing.assert_allclose(k, ref.cache_numpy(i)[0], rtol=0, atol=1e-5)


def test_rope_frequencies_match_transformers(hf_models):
    model = hf_models["tiny"]
    from dgport.config import TextConfig

    rot = model.model.decoder.rotary_emb
    cfg = TextConfig.from_hf(model.config.to_dict())
    for i in range(cfg.num_layers):
        ref = getattr(rot, f"{cfg.layer_types[i]}_inv_freq").numpy()
        np.testing.assert_array_equal(rope_inv_freq_f32(cfg, i), ref)


def test_graphs_share_one_weights_file_and_use_standard_ops(onnx_exports):
    out = onnx_exports[("tiny", "fp32")]
    export = open_export(out, "cpu")
    entry = export.format("onnx")
    # the fixture keeps the tiny vision tower transformers builds with every model: vision.onnx reads it
    assert sorted(entry["files"]) == ["denoise_step.onnx", "denoise_step.unrolled.onnx", "encoder.onnx",
                                      "encoder.unrolled.onnx", "vision.onnx", "weights.bin"]
    assert entry["vision_graph"]["file"] == "vision.onnx"
    # the CPU runs the unrolled experts (each expert's weights a view of the stacked tensor), GPUs the
    # sparse encoder and the dense step; all read the same bytes of one weights file
    tensors = entry["weights"]["tensors"]
    for key, gpu in (("encoder", "encoder.onnx"), ("denoise_step", "denoise_step.onnx")):
        assert (entry["cpu_graphs"][key]["file"], entry["graphs"][key]["file"]) == (f"{key}.unrolled.onnx", gpu)
        cpu = {tensors[w].get("view_of", w) for w in entry["cpu_graphs"][key]["weights"]}
        assert cpu == set(entry["graphs"][key]["weights"])
    locations = set()
    enc_w, den_w = set(entry["graphs"]["encoder"]["weights"]), set(entry["graphs"]["denoise_step"]["weights"])
    assert "embed_tokens" in enc_w & den_w and len(enc_w & den_w) > 10
    for g in [f for f in entry["files"] if f.endswith(".onnx")]:
        m = onnx.load(str(out / g), load_external_data=False)
        assert {op.domain for op in m.opset_import} == {""}
        assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
        for t in m.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                locations.add({e.key: e.value for e in t.external_data}["location"])
        assert (out / g).stat().st_size < 200_000  # graphs only; weights live in weights.bin
    assert locations == {"weights.bin"}
    # encoder and decoder layer scalars are different tensors
    assert any("encoder.language_model" in w for w in enc_w) and not any("encoder.language_model" in w for w in den_w)
    # one copy of every weight in the file: sizes add up
    size = sum(t["nbytes"] for t in entry["weights"]["tensors"].values() if "view_of" not in t)
    assert size <= (out / "weights.bin").stat().st_size < size + 64 * len(entry["weights"]["tensors"])


def test_runtime_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "import dgport.runtimes.onnx, dgport.manifest, dgport.loop; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("kind", ["int4", "fp32", "bf16"])
def test_streamed_head_computes_the_whole_vocabulary_sampler(kind, checkpoints, tmp_path, monkeypatch, capfd):
    """The head of every fp32-compute graph streams the vocabulary in chunks (online max, normalizer,
    entropy and p @ E, then the inverse-CDF draw: the chunk, then the id inside it). With 100-row
    chunks (the 512-token fixture in six, the last one padded) its outputs must be what the
    whole-vocabulary math gives from its own logits, in float64: argmax, entropy, the sampled ids and
    the next self-conditioning input (bf16: p rounded to bf16 before p @ E, as the reference does)."""
    import ml_dtypes
    from safetensors.numpy import load_file

    from dgport.exporters import onnx_head
    from dgport.exporters.export import ExportOptions, export
    from dgport.exporters.quantize import dequantize, quantize
    from dgport.manifest import read_manifest

    bf16 = lambda x: np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)  # noqa: E731
    monkeypatch.setattr(onnx_head, "VOCAB_CHUNK", 100)
    out = tmp_path / kind
    opts = dict(quantize=4, group_size=32) if kind == "int4" else dict(dtype=kind)
    export(checkpoints["tiny"], out, ExportOptions(with_logits=True, validate=False, **opts))
    backend = OnnxBackend(read_manifest(out), threads=THREADS)
    cfg = backend.config
    V, H, C, P = cfg.vocab_size, cfg.hidden_size, cfg.canvas_length, 5
    rng = np.random.default_rng(3)
    capfd.readouterr()
    backend.encode(rng.integers(0, V, (1, P)), np.arange(P)[None])
    # quantized exports encode with the step graph, whose head Loop then runs zero times: onnxruntime
    # must know its outputs' shapes (no warning)
    assert "onnxruntime" not in capfd.readouterr().err
    temp, unif = np.float32(0.7), rng.random((1, C), dtype=np.float32)
    step = backend.denoise(rng.integers(0, V, (1, C)), np.arange(P, P + C)[None], temp, unif)
    proc32 = (backend.last_logits[0] / temp).astype(np.float32)
    proc = proc32.astype(np.float64)
    p = np.exp(proc - proc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert np.array_equal(step.argmax[0], proc.argmax(-1))
    entropy = -(p * np.log(p)).sum(-1)
    assert np.max(np.abs(step.entropy[0] - entropy) / entropy) < 1e-5
    cdf = np.cumsum(p, -1)
    count = np.minimum((cdf <= unif[0][:, None]).sum(-1), V - 1)
    near = np.abs(cdf - unif[0][:, None]).min(-1) < 1e-6  # within rounding of a boundary: either side
    assert np.all((step.sampled[0] == count) | near) and near.mean() < 0.1
    table = load_file(str(checkpoints["tiny"] / "model.safetensors"))["model.decoder.embed_tokens.weight"]
    if kind == "int4":
        table = dequantize(*quantize(table, 8, 32), 32)
    sc = np.asarray(backend.sc_numpy(), np.float64)[0]  # the next step's sc_embeds, as the graph returned it
    if kind == "bf16":
        pm = bf16(proc32)
        p_sc = np.exp(pm - pm.max(-1, keepdims=True))
        want = bf16(p_sc / p_sc.sum(-1, keepdims=True)) @ bf16(table) * bf16(np.sqrt(H))
        tol = 1e-2  # sc_embeds come back in bf16
    else:
        want, tol = p @ np.asarray(table, np.float64) * np.sqrt(H), 1e-5
    assert np.linalg.norm(sc - want) / np.linalg.norm(want) < tol
