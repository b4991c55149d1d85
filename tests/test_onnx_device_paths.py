"""The parts of the ONNX backend that exist for device (CUDA) memory, run through the CPU EP: weights
placed as device tensors and shared between sessions, and bf16 values read back to the host."""
from __future__ import annotations

import ctypes

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import dgport
from dgport.runtimes.onnx import BF16, device_initializer
from onnx_support import THREADS, onnx_exports  # noqa: F401


def _gather_session(weight_type: int, so) -> ort.InferenceSession:
    """y = float(W[rows]) with W a zero initializer that a session option may replace. W only meets a
    graph input, so ORT cannot constant-fold it with the model's own data before replacing it."""
    w = helper.make_tensor("W", weight_type, (3, 2), np.zeros(6, np.float32 if weight_type == 1 else np.uint16).tobytes(),
                           raw=True)
    nodes = [helper.make_node("Gather", ["W", "rows"], ["g"], axis=0),
             helper.make_node("Cast", ["g"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("rows", TensorProto.INT64, (3,))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, (3, 2))], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("onnx_type", [1, BF16])
def test_device_weights_are_shared_initializers(onnx_type):
    w = np.arange(6, dtype=np.float32).reshape(3, 2) - 2.5  # exact in bf16
    arr = (w.view(np.uint32) >> 16).astype(np.uint16) if onnx_type == BF16 else w
    # a tensor made by ORT's allocator (what the CUDA path makes) owns its buffer: add_initializer refuses it
    owner = ort.OrtValue.ortvalue_from_shape_and_type([3, 2], onnx_type, "cpu", 0)
    owner.update_inplace(arr)
    with pytest.raises(Exception, match="owned by the user"):
        ort.SessionOptions().add_initializer("W", owner)
    value = device_initializer(ort, arr, onnx_type, ("cpu", 0))
    for _ in range(2):  # two sessions, one tensor
        so = ort.SessionOptions()
        so.add_initializer("W", value)
        y = _gather_session(onnx_type, so).run(None, {"rows": np.array([2, 0, 1])})[0]
        np.testing.assert_array_equal(y, w[[2, 0, 1]])


def test_bf16_cache_reads_back_exactly(onnx_exports):
    gen = dgport.load(onnx_exports[("eos", "bf16")], backend="cpu", threads=THREADS)
    gen.generate([2, 105, 300], seed=0, max_new_tokens=16)
    backend = gen.backend
    k, _ = backend.cache_numpy(0)
    value = backend._kv[0][0]  # numpy has no bf16: read its bits straight from (CPU) memory
    n = int(np.prod(value.shape()))
    raw = np.ctypeslib.as_array((ctypes.c_uint16 * n).from_address(value.data_ptr())).reshape(value.shape())
    assert k.dtype == np.float32 and k.shape == tuple(backend._kv[0][0].shape())
    np.testing.assert_array_equal(k, (raw.astype(np.uint32) << 16).view(np.float32))
    assert backend.sc_numpy().shape[-1] == backend.config.hidden_size


@pytest.mark.slow
def test_cuda_check_harness_runs_with_the_cpu_as_candidate(tmp_path):
    """bench/cuda_check.py is what a GPU session runs; here its CPU-vs-CPU run must pass every check."""
    import json

    from bench import cuda_check

    report = tmp_path / "report.json"
    assert cuda_check.main(["--candidate", "cpu", "--presets", "tiny", "--no-real-slice", "--sudoku-puzzles", "1",
                            "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert [r["check"] for r in rows] == ["fp32 tokens", "fp32 parity"] * 3 + ["bf16 parity"] * 2 + [
        "bf16 tokens", "int4 tokens", "int4 placement", "int8 tokens", "int8 placement"]
    assert all(r["ok"] for r in rows)
    assert all(r["identical_runs"] == "2/2" and r["state_on_device"] for r in rows if r["check"] == "fp32 tokens")
    assert all(max(r["max_rel_err"].values()) <= 1e-5 for r in rows if r["check"] == "fp32 parity")
    for bits in (4, 8):  # every quantized op ran on the candidate's provider (here the CPU's)
        placed = next(r for r in rows if r["check"] == f"int{bits} placement")["ops_by_provider"]
        assert placed.get("MatMulNBits@CPUExecutionProvider", 0) > 0 and placed.get("Loop@CPUExecutionProvider", 0) >= 1
        assert next(r for r in rows if r["check"] == f"int{bits} tokens")["agreement"] == 1.0
