"""Every graph of an export runs in a stock onnxruntime session opened by path alone, and agrees with
dgport's backend (docs/GRAPH_CONTRACT.md). No dgport code drives the stock sessions: they get a path, the
CPU EP and the inputs the contract names; past K/V come from the session's own input metadata.

Also: `onnx.checker.check_model(full_check=True)` on every graph, ONNX's reference evaluator on the
sparse-expert denoise step (its Loop has an explicit `cond`), no Slice with a negative constant start,
and onnxruntime versions that cannot run `--attention fused` correctly are refused at load."""
from __future__ import annotations

import ctypes

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from dgport.errors import BackendUnavailable
from dgport.exporters.export import ExportOptions, export
from dgport.manifest import open_export
from dgport.runtimes.onnx import OnnxBackend, check_fused_attention, ort_version
from onnx_support import THREADS

BF16 = onnx.TensorProto.BFLOAT16
# (preset, dtype, attention): the default fp32 export (dense + sparse denoise), bf16 (fp32-compute twins
# for the CPU), fp16, fused attention, and a prompt longer than the sliding window (cache trimming)
CASES = [("tiny", "fp32", "explicit"), ("tiny", "bf16", "explicit"), ("tiny", "fp16", "explicit"),
         ("tiny", "fp32", "fused"), ("long-context", "fp32", "explicit"), ("long-context", "bf16", "fused")]
_EXPORTS: dict = {}


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    def get(case):
        if case not in _EXPORTS:
            preset, dtype, attention, *form = case  # form: both graphs' experts (default: each device's own)
            out = tmp_path_factory.mktemp("stock") / "-".join(case)
            moe = {"encoder_moe": form[0], "denoise_moe": form[0]} if form else {}
            export(checkpoints[preset], out, ExportOptions(dtype=dtype, attention=attention, with_logits=True,
                                                           validate=False, **moe))
            _EXPORTS[case] = out
        return _EXPORTS[case]

    return get


# ------------------------------------------------------------------ a stock caller, no dgport code
def value(arr: np.ndarray, elem_type: str) -> ort.OrtValue:
    """A numpy array as an OrtValue of the session input's type (bf16: raw bits, as C/C++/C# callers do)."""
    if elem_type == "tensor(bfloat16)":
        bits = np.ascontiguousarray(np.asarray(arr, np.float32).astype(ml_dtypes.bfloat16)).view(np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, BF16)
    if elem_type == "tensor(float16)":
        arr = np.asarray(arr, np.float16)
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))


def host(v: ort.OrtValue) -> np.ndarray:
    """An output OrtValue as numpy (bf16 read as its raw bits from CPU memory, widened to float32)."""
    if v.data_type() != "tensor(bfloat16)":
        return v.numpy()
    n = int(np.prod(v.shape()))
    bits = np.ctypeslib.as_array((ctypes.c_uint16 * n).from_address(v.data_ptr())) if n else np.zeros(0, np.uint16)
    return bits.copy().view(ml_dtypes.bfloat16).astype(np.float32).reshape(v.shape())


def stock_run(sess: ort.InferenceSession, feeds: dict) -> dict:
    types = {i.name: i.type for i in sess.get_inputs()}
    assert set(feeds) == set(types), f"the session asks for {sorted(types)}"
    vals = {k: v if isinstance(v, ort.OrtValue) else value(v, types[k]) for k, v in feeds.items()}
    names = [o.name for o in sess.get_outputs()]
    outs = sess._sess.run_with_ort_values({k: v._ortvalue for k, v in vals.items()}, names, None)
    return {n: ort.OrtValue(o) for n, o in zip(names, outs)}


def empty_past(sess: ort.InferenceSession, batch: int) -> dict:
    """past_key_i / past_value_i of length 0, shaped from the session's input metadata."""
    feeds = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_"):
            shape = [batch if d == "batch" else (0 if isinstance(d, str) or d is None else d) for d in i.shape]
            feeds[i.name] = value(np.zeros(shape, np.float32), i.type)
    return feeds


def graph_sets(out) -> dict:
    entry = open_export(out, "cpu").format("onnx")
    return {name: entry[name] for name in ("graphs", "cpu_graphs") if name in entry}


def cpu_runnable(out, set_name: str) -> bool:
    """bf16 exports' GPU graphs compute in bf16, which the CPU EP has no kernels for."""
    return not (open_export(out, "cpu").format("onnx")["dtype"] == "bf16" and set_name == "graphs")


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_every_graph_passes_onnx_full_check(case, exports):
    out = exports(case)
    files = {g["file"] for graphs in graph_sets(out).values() for g in graphs.values()}
    assert files
    for f in sorted(files):
        onnx.checker.check_model(str(out / f), full_check=True)


def compare_set(out, set_name: str, graphs: dict, so, exact: bool) -> None:
    """One encode (a prompt longer than the sliding window) and one denoise step through stock sessions
    of one graph set, against dgport's backend on the same inputs. `exact`: bit-identical (the same
    graphs, session options and thread count); otherwise within fp32 reassociation."""
    def same(ours, theirs, name):
        assert ours.shape == theirs.shape, name
        if exact:
            np.testing.assert_array_equal(ours, theirs, err_msg=name)
        elif ours.dtype.kind == "f":
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5, err_msg=name)
        else:
            assert (ours == theirs).mean() > 0.95, name  # a near-tie may flip an argmax or a draw

    enc = ort.InferenceSession(str(out / graphs["encoder"]["file"]), so, providers=["CPUExecutionProvider"])
    den = ort.InferenceSession(str(out / graphs["denoise_step"]["file"]), so, providers=["CPUExecutionProvider"])
    be = OnnxBackend(open_export(out, "cpu"), device="cpu", threads=THREADS, graph_set=set_name)
    cfg = be.config
    rng = np.random.default_rng(7)
    T, C, B = 3 * cfg.sliding_window + 5, cfg.canvas_length, 1
    ids, pos = rng.integers(0, cfg.vocab_size, (B, T)), np.arange(T)[None].repeat(B, 0)
    kv = stock_run(enc, {"input_ids": ids, "position_ids": pos, **empty_past(enc, B)})
    be.encode(ids, pos)
    for i in range(cfg.num_layers):
        for j, name in enumerate((f"present_key_{i}", f"present_value_{i}")):
            same(be.cache_numpy(i)[j], host(kv[name]), name)
    canvas, cpos = rng.integers(0, cfg.vocab_size, (B, C)), np.arange(T, T + C)[None].repeat(B, 0)
    u = rng.random((B, C), dtype=np.float32)
    sc_type = next(i.type for i in den.get_inputs() if i.name == "sc_embeds")
    feeds = {"canvas_ids": canvas, "position_ids": cpos, "temperature": np.float32(0.8), "uniforms": u,
             "sc_embeds": value(np.zeros((B, C, cfg.hidden_size), np.float32), sc_type),
             **{f"past_{n}": kv[f"present_{n}"] for i in range(cfg.num_layers) for n in (f"key_{i}", f"value_{i}")}}
    step = stock_run(den, feeds)
    ours = be.denoise(canvas, cpos, np.float32(0.8), u)
    same(ours.argmax, host(step["argmax_ids"]), "argmax_ids")
    same(ours.sampled, host(step["sampled_ids"]), "sampled_ids")
    same(ours.entropy, host(step["entropy"]), "entropy")
    same(be.last_logits, host(step["logits"]), "logits")
    same(be.sc_numpy(), host(step["next_sc_embeds"]), "next_sc_embeds")


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_stock_session_matches_backend(case, exports):
    """With the contract's session options (prepacking off, as dgport, and the same thread count) the
    outputs are bit-identical to dgport's; a session with no options at all (ORT prepacks the constant
    weights, whose GEMM sums in another order) agrees to fp32 rounding."""
    out = exports(case)
    ran = 0
    for set_name, graphs in graph_sets(out).items():
        if not cpu_runnable(out, set_name):
            continue
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.log_severity_level = 3
        so.add_session_config_entry("session.disable_prepacking", "1")
        compare_set(out, set_name, graphs, so, exact=True)
        plain = ort.SessionOptions()
        plain.log_severity_level = 3  # only to keep the bf16 graphs' overridable-initializer notices quiet
        compare_set(out, set_name, graphs, plain, exact=False)
        ran += 1
    assert ran >= 1


@pytest.mark.parametrize("case", [("long-context", "fp32", "explicit"), ("long-context", "bf16", "fused")],
                         ids=["fp32", "bf16-fused"])
def test_stock_session_batches_rows_of_different_lengths(case, exports):
    """docs/GRAPH_CONTRACT.md's recipe for batching requests, with numpy alone: encode each row (B = 1),
    left-pad every row's cache with zeros to the longest per layer, stack them, and run one denoise
    step with a [B] temperature. Each row gets its own run's outputs (a scalar temperature, its cache
    alone) up to the last bits a kernel rounds differently for a padded row (docs/onnx.md)."""
    out = exports(case)
    graphs = graph_sets(out)["cpu_graphs" if "cpu_graphs" in graph_sets(out) else "graphs"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    enc = ort.InferenceSession(str(out / graphs["encoder"]["file"]), so, providers=["CPUExecutionProvider"])
    den = ort.InferenceSession(str(out / graphs["denoise_step"]["file"]), so, providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in den.get_inputs()}
    cfg = open_export(out, "cpu").config
    C, H, L = cfg.canvas_length, cfg.hidden_size, cfg.num_layers
    rng = np.random.default_rng(11)
    lengths = [4, 12, 27]
    temps = np.array([0.6, 0.9, 1.3], np.float32)
    caches, alone = [], []
    canvas = rng.integers(0, cfg.vocab_size, (len(lengths), C))
    u = rng.random((len(lengths), C), dtype=np.float32)
    for r, n in enumerate(lengths):
        kv = stock_run(enc, {"input_ids": rng.integers(0, cfg.vocab_size, (1, n)), "position_ids": np.arange(n)[None],
                             **empty_past(enc, 1)})
        caches.append({name: host(kv[f"present_{name}"]) for i in range(L) for name in (f"key_{i}", f"value_{i}")})
        feeds = {"canvas_ids": canvas[r:r + 1], "position_ids": np.arange(n, n + C)[None], "temperature": temps[r],
                 "uniforms": u[r:r + 1], "sc_embeds": np.zeros((1, C, H), np.float32),
                 **{f"past_{k}": v for k, v in caches[-1].items()}}
        alone.append({k: host(v) for k, v in stock_run(den, feeds).items()})
    past = {}
    for name in caches[0]:
        P = max(c[name].shape[2] for c in caches)
        past[f"past_{name}"] = np.concatenate([np.pad(c[name], [(0, 0), (0, 0), (P - c[name].shape[2], 0), (0, 0)])
                                               for c in caches])
    pos = np.stack([np.arange(n, n + C) for n in lengths])
    batch = stock_run(den, {"canvas_ids": canvas, "position_ids": pos, "temperature": temps, "uniforms": u,
                            "sc_embeds": value(np.zeros((len(lengths), C, H), np.float32), types["sc_embeds"]),
                            **{k: value(v, types[k]) for k, v in past.items()}})
    got = {k: host(v) for k, v in batch.items()}
    for r in range(len(lengths)):
        for name in ("argmax_ids", "sampled_ids"):
            assert (got[name][r] == alone[r][name][0]).mean() >= 0.9, (r, name)
        np.testing.assert_allclose(got["entropy"][r], alone[r]["entropy"][0], rtol=1e-2 if "bf16" in case else 1e-6)


def test_bf16_cpu_graphs_take_no_weights_as_inputs(exports):
    """A stock caller feeds only the contract's inputs: the bf16 weights are initializers (listed as
    graph inputs only as overridable defaults, which ORT does not ask for)."""
    out = exports(("tiny", "bf16", "explicit"))
    graphs = open_export(out, "cpu").format("onnx")["cpu_graphs"]
    for key, g in graphs.items():
        m = onnx.load(str(out / g["file"]), load_external_data=False)
        inits = {t.name for t in m.graph.initializer}
        assert set(g["weights"]) <= inits, key
        sess = ort.InferenceSession(str(out / g["file"]), providers=["CPUExecutionProvider"])
        assert {i.name for i in sess.get_inputs()} == {i["name"] for i in g["inputs"]}, key
        assert not g["weights_as_inputs"]


@pytest.mark.parametrize("case", [("tiny", "fp32", "explicit"), ("tiny", "bf16", "explicit")],
                         ids=["fp32", "bf16"])
def test_loops_have_a_condition_and_slices_in_range_starts(case, exports):
    out = exports(case)
    for f in sorted({g["file"] for graphs in graph_sets(out).values() for g in graphs.values()}):
        m = onnx.load(str(out / f), load_external_data=False)
        consts = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer
                  if t.data_location != onnx.TensorProto.EXTERNAL}
        for n in m.graph.node:
            if n.op_type == "Loop":
                assert len(n.input) >= 2 and n.input[1], f"{f}: Loop {n.name} without cond"
            if n.op_type == "Slice" and n.input[1] in consts:
                assert (consts[n.input[1]] >= 0).all(), f"{f}: Slice {n.name} starts {consts[n.input[1]]}"


@pytest.mark.parametrize("form", ["sparse", "unrolled"])
def test_reference_evaluator_runs_the_cpu_denoise_step(exports, form):
    """ONNX's reference evaluator (a second, independent runtime) computes the CPU's denoise step as
    onnxruntime does, with the experts in a Loop (without an explicit Loop cond it would run zero
    times) and unrolled (each expert's weights a slice of the stacked tensor in weights.bin)."""
    from onnx.reference import ReferenceEvaluator

    out = exports(("tiny", "fp32", "explicit", form))
    entry = open_export(out, "cpu").format("onnx")
    graphs = entry.get("cpu_graphs", entry["graphs"])  # one form for both devices: one set of graphs
    assert graphs["denoise_step"]["moe"] == form
    enc = ort.InferenceSession(str(out / graphs["encoder"]["file"]), providers=["CPUExecutionProvider"])
    den_path = str(out / graphs["denoise_step"]["file"])
    den = ort.InferenceSession(den_path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    cfg = OnnxBackend(open_export(out, "cpu"), device="cpu", threads=THREADS).config
    T, C = 6, cfg.canvas_length
    kv = stock_run(enc, {"input_ids": rng.integers(0, cfg.vocab_size, (1, T)), "position_ids": np.arange(T)[None],
                         **empty_past(enc, 1)})
    feeds = {"canvas_ids": rng.integers(0, cfg.vocab_size, (1, C)), "position_ids": np.arange(T, T + C)[None],
             "temperature": np.float32(0.8), "uniforms": rng.random((1, C), dtype=np.float32),
             "sc_embeds": np.zeros((1, C, cfg.hidden_size), np.float32),
             **{f"past_{n}": host(kv[f"present_{n}"]) for i in range(cfg.num_layers)
                for n in (f"key_{i}", f"value_{i}")}}
    want = {k: host(v) for k, v in stock_run(den, feeds).items()}
    ref = ReferenceEvaluator(onnx.load(den_path))
    got = dict(zip(ref.output_names, ref.run(None, feeds)))
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["next_sc_embeds"], want["next_sc_embeds"], rtol=1e-4, atol=1e-4)
    assert (got["argmax_ids"] == want["argmax_ids"]).mean() > 0.95


@pytest.mark.parametrize("bits", [4, 8])
def test_stock_session_runs_the_quantized_step_graph(bits, checkpoints, tmp_path):
    """Quantized exports have one graph, step.onnx, for both roles (docs/GRAPH_CONTRACT.md): a stock
    session opened by path encodes (denoise=false: the cache out, empty sampler outputs) and denoises
    (denoise=true) exactly as dgport's backend does with the same options (accuracy level 0, the
    same thread count)."""
    out = tmp_path / f"q{bits}"
    export(checkpoints["long-context"], out, ExportOptions(quantize=bits, group_size=32, with_logits=True,
                                                           validate=False))
    g = open_export(out, "cpu").format("onnx")["graphs"]
    assert set(g) == {"step"}
    onnx.checker.check_model(str(out / g["step"]["file"]), full_check=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    step = ort.InferenceSession(str(out / g["step"]["file"]), so, providers=["CPUExecutionProvider"])
    be = OnnxBackend(open_export(out, "cpu"), device="cpu", threads=THREADS, accuracy_level=0)
    cfg = be.config
    H, C = cfg.hidden_size, cfg.canvas_length
    rng = np.random.default_rng(5)
    T = 2 * cfg.sliding_window + 3
    ids, pos = rng.integers(0, cfg.vocab_size, (1, T)), np.arange(T)[None]
    enc = stock_run(step, {"input_ids": ids, "position_ids": pos, "sc_embeds": np.zeros((1, T, H), np.float32),
                           "temperature": np.float32(1), "uniforms": np.zeros((1, T), np.float32),
                           "denoise": np.bool_(False), **empty_past(step, 1)})
    assert host(enc["argmax_ids"]).shape == (1, 0) and host(enc["next_sc_embeds"]).shape == (1, 0, H)
    be.encode(ids, pos)
    past = {f"past_{n}": enc[f"present_{n}"] for i in range(cfg.num_layers) for n in (f"key_{i}", f"value_{i}")}
    for i in range(cfg.num_layers):
        for j, name in enumerate((f"present_key_{i}", f"present_value_{i}")):
            np.testing.assert_array_equal(be.cache_numpy(i)[j], host(enc[name]), err_msg=name)
    canvas, cpos = rng.integers(0, cfg.vocab_size, (1, C)), np.arange(T, T + C)[None]
    u = rng.random((1, C), dtype=np.float32)
    den = stock_run(step, {"input_ids": canvas, "position_ids": cpos, "sc_embeds": np.zeros((1, C, H), np.float32),
                           "temperature": np.float32(0.8), "uniforms": u, "denoise": np.bool_(True), **past})
    ours = be.denoise(canvas, cpos, np.float32(0.8), u)
    np.testing.assert_array_equal(ours.argmax, host(den["argmax_ids"]))
    np.testing.assert_array_equal(ours.sampled, host(den["sampled_ids"]))
    np.testing.assert_array_equal(ours.entropy, host(den["entropy"]))
    np.testing.assert_array_equal(be.last_logits, host(den["logits"]))
    np.testing.assert_array_equal(be.sc_numpy(), host(den["next_sc_embeds"]))
    assert be.cache_len == T  # denoising leaves the cache alone


def test_stock_sessions_run_images(checkpoints, tmp_path):
    """docs/GRAPH_CONTRACT.md#images from the files alone: transformers' own image processor with the
    manifest's settings, vision.onnx by path, then encoder.onnx fed `image_embeds`; the soft tokens and
    the cache equal dgport's, and the image changes the cache (an encoder that ignored it would not)."""
    import json

    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    out = tmp_path / "vision"
    export(checkpoints["vision"], out, ExportOptions(validate=False))
    manifest = json.loads((out / "dgport.json").read_text())
    entry, vision = manifest["formats"]["onnx"], manifest["vision"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.add_session_config_entry("session.disable_prepacking", "1")
    tower = ort.InferenceSession(str(out / entry["vision_graph"]["file"]), so, providers=["CPUExecutionProvider"])
    enc = ort.InferenceSession(str(out / entry["graphs"]["encoder"]["file"]), so, providers=["CPUExecutionProvider"])
    image = vision["image"]
    proc = Gemma4ImageProcessorPil(patch_size=image["patch_size"], pooling_kernel_size=image["pooling_kernel_size"],
                                   max_soft_tokens=image["max_soft_tokens"])
    rng = np.random.default_rng(3)
    feats = proc([rng.integers(0, 256, (45, 77, 3), dtype=np.uint8)], return_tensors="np")
    pv, pos = feats["pixel_values"].astype(np.float32), feats["image_position_ids"].astype(np.int64)
    soft = tower.run(["soft_tokens"], {"pixel_values": pv, "pixel_position_ids": pos})[0]
    n = int((pos[0, :, 0] >= 0).sum()) // image["pooling_kernel_size"] ** 2
    text = [t for t in rng.integers(0, manifest["config"]["vocab_size"], 6).tolist() if t != vision["image_token_id"]]
    ids = np.array([[manifest["config"]["bos_token_id"], vision["boi_token_id"]] + [vision["image_token_id"]] * n
                    + [vision["eoi_token_id"]] + text])
    positions = np.arange(ids.shape[1])[None]
    feeds = {"input_ids": ids, "position_ids": positions, **{k: v.numpy() for k, v in empty_past(enc, 1).items()}}
    names = [o.name for o in enc.get_outputs()]
    with_image = dict(zip(names, enc.run(names, {**feeds, "image_embeds": soft[0, :n]})))
    without = dict(zip(names, enc.run(names, feeds)))

    be = OnnxBackend(open_export(out, "cpu"), device="cpu", threads=THREADS)
    np.testing.assert_array_equal(be.encode_images(pv, pos), soft)
    be.encode(ids, positions, image_embeds=soft[0, :n])
    L = manifest["config"]["num_layers"]
    for i in range(L):
        for j, name in enumerate((f"present_key_{i}", f"present_value_{i}")):
            np.testing.assert_array_equal(be.cache_numpy(i)[j], with_image[name], err_msg=name)
    assert not np.allclose(with_image[f"present_key_{L - 1}"], without[f"present_key_{L - 1}"])


# ------------------------------------------------------------------ onnxruntime versions for fused attention
def test_ort_version_parsing():
    assert ort_version("1.23.1") == (1, 23, 1)
    assert ort_version("1.24.0.dev20250101") == (1, 24, 0)
    assert ort_version("1.22.0+cu12") == (1, 22, 0)
    assert ort_version("1.20") == (1, 20, 0)
    check_fused_attention("1.23.1")
    check_fused_attention("2.0.0")


@pytest.mark.parametrize("version,match", [
    ("1.23.0", r"onnxruntime 1\.23\.0's Attention kernel is wrong for grouped-query attention; needs onnxruntime "
               r">= 1\.23\.1: pip install -U onnxruntime"),
    ("1.22.1", r"needs onnxruntime >= 1\.23\.1 \(installed 1\.22\.1\): pip install -U onnxruntime"),
    ("1.20.0", r"needs onnxruntime >= 1\.23\.1 \(installed 1\.20\.0\)"),
])
def test_fused_attention_refused_on_old_onnxruntime(version, match, exports, monkeypatch):
    out = exports(("tiny", "fp32", "fused"))
    monkeypatch.setattr(ort, "__version__", version)
    with pytest.raises(BackendUnavailable, match=match):
        OnnxBackend(open_export(out, "cpu"), device="cpu", threads=THREADS)


def test_explicit_attention_needs_no_version_check(exports, monkeypatch):
    out = exports(("tiny", "fp32", "explicit"))
    monkeypatch.setattr(ort, "__version__", "1.23.0")
    OnnxBackend(open_export(out, "cpu"), device="cpu", threads=THREADS)
