"""Whether this CPU's onnxruntime computes a quantized export's products exactly with int8 activations.

A quantized export's weights reach onnxruntime as `DequantizeLinear(axis=0, block_size)` -> `MatMul`
(exporters/onnx_quant.py), which it fuses into `MatMulNBits`; at accuracy level 4 (dgport's default)
MLAS rounds each block of activations to int8 and sums integer products. On x86 CPUs without VNNI the
int8 dot product is `vpmaddubsw`: u8 x s8 products added in pairs into saturating 16-bit lanes, which
overflow when both factors reach the ends of their ranges (8-bit weight integer 255 against activation
127, twice: 64,770). The export's quantizer gives such integers (an all-positive group has zero point
0). onnxruntime 1.32's AVX2 kernels keep one product per lane (even and odd weight bytes masked apart;
tests/test_quant_non_vnni.py runs them on an emulated AVX2 CPU), but each ISA has its own kernels and
not all of them have been read or run. So before a quantized export runs at accuracy level 4 on the
CPU, `int8_products_exact` runs the worst case once per process (a few milliseconds) and the backend
falls back to fp32 activations, with a warning, where the answer is not the exact one."""
from __future__ import annotations

import functools
import warnings

import numpy as np

BLOCKS, N, ROWS = 4, 17, 5  # odd N and rows: MLAS's 4-column and 2-row tiles and their 1-wide remainders
TOLERANCE = 1e-5  # relative to the largest output: fp32 rounding of the scales; a saturated pair is ~1e-1


def worst_case(bits: int, group: int):
    """(weight integers q [K, N], zero points [K/group, N], scales [K/group, N], activations [ROWS, K]):
    columns of all-maximal integers over zero point 0 (+max steps), all-zero over the maximal zero
    point (-max steps), and mixed ones; rows at +1 everywhere (every pair at +127 after rounding), at
    -1, alternating signs, and two of ordinary values."""
    K, top = BLOCKS * group, (1 << bits) - 1
    rng = np.random.default_rng(bits * 1000 + group)
    q = rng.choice(np.array([0, top], np.uint8), size=(K, N))
    zp = rng.choice(np.array([0, top // 2 + 1, top], np.uint8), size=(BLOCKS, N))
    q[:, 0], zp[:, 0] = top, 0
    q[:, 1], zp[:, 1] = 0, top
    scale = np.exp2(rng.integers(-9, -5, size=(BLOCKS, N))).astype(np.float32)  # exact in bf16
    a = np.ones((ROWS, K), np.float32)
    a[1] = -1
    a[2, 1::2] = -1
    a[3:] = rng.standard_normal((ROWS - 3, K)) * 3
    return q, zp, scale, a


def int8_activations(a, group: int):
    """Activations [rows, K] as MLAS's QuantizeARow rounds them: each block of `group` along K to
    amax / 127 steps. Returns the integers [rows, K] and each block's step [rows, K/group, 1] (float64)."""
    blocks = a.reshape(len(a), -1, group).astype(np.float64)
    step = np.abs(blocks).max(-1, keepdims=True) / 127
    step[step == 0] = 1
    return np.rint(blocks / step).reshape(a.shape), step


def int8_reference(q, zp, scale, a, group: int) -> np.ndarray:
    """The exact answer of int8 activations times the dequantized weights, summed in float64."""
    ints, step = int8_activations(a, group)
    a8 = (ints.reshape(step.shape[0], -1, group) * step).reshape(a.shape)
    w = (q.astype(np.float64) - np.repeat(zp, group, axis=0)) * np.repeat(scale, group, axis=0)
    return a8 @ w


def check_model(bits: int, group: int) -> bytes:
    """The worst case as one self-checking graph, with no inputs to feed: the export's pattern for one
    weight [K, N] (bf16 scales cast to fp32, a blocked DequantizeLinear of uint4/uint8 integers, a MatMul)
    applied to the worst-case activations, and its output `relative_error`, the largest difference from
    the exact int8 answer relative to the largest output (a scalar). The activations are an overridable
    initializer (a graph input with a default), so onnxruntime cannot fold the product at load and runs
    the fused kernel. The same bytes serve Python (`worst_case_error`) and the JavaScript loop
    (web/int8_check/, written by `python -m dgport.runtimes.int8_check web/int8_check`)."""
    from onnx import TensorProto, helper

    q, zp, scale, a = worst_case(bits, group)
    exact = int8_reference(q, zp, scale, a, group).astype(np.float32)
    ints = TensorProto.UINT4 if bits == 4 else TensorProto.UINT8
    K = q.shape[0]
    nodes = [helper.make_node("Cast", ["scale"], ["scale32"], to=TensorProto.FLOAT),
             helper.make_node("DequantizeLinear", ["q", "scale32", "zp"], ["w"], axis=0, block_size=group),
             helper.make_node("MatMul", ["a", "w"], ["y"]),
             helper.make_node("Sub", ["y", "exact"], ["diff"]),
             helper.make_node("Abs", ["diff"], ["diff_abs"]),
             helper.make_node("ReduceMax", ["diff_abs"], ["worst"], keepdims=0),
             helper.make_node("Abs", ["exact"], ["exact_abs"]),
             helper.make_node("ReduceMax", ["exact_abs"], ["size"], keepdims=0),
             helper.make_node("Div", ["worst", "size"], ["relative_error"])]
    graph = helper.make_graph(
        nodes, "int8_worst_case", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [ROWS, K])],
        [helper.make_tensor_value_info("relative_error", TensorProto.FLOAT, [])],
        [helper.make_tensor("a", TensorProto.FLOAT, a.shape, a.ravel().tolist()),
         helper.make_tensor("exact", TensorProto.FLOAT, exact.shape, exact.ravel().tolist()),
         helper.make_tensor("q", ints, q.shape, q.ravel().tolist()),
         helper.make_tensor("scale", TensorProto.BFLOAT16, scale.shape, scale.ravel().tolist()),
         helper.make_tensor("zp", ints, zp.shape, zp.ravel().tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="dgport int8_check")
    model.ir_version = 10
    return model.SerializeToString()


def worst_case_error(ort, bits: int, group: int, optimized_path: str | None = None) -> float:
    """onnxruntime's relative error on the worst case at accuracy level 4 (check_model's output; exact
    int8 sums give ~1e-7). `optimized_path`: also write the fused graph there."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4")
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    sess = ort.InferenceSession(check_model(bits, group), so, providers=["CPUExecutionProvider"])
    return float(sess.run(None, {})[0])


@functools.cache
def int8_products_exact(bits: int, group: int) -> bool:
    """Once per process and (bits, group): does this CPU's onnxruntime give the exact int8 answer?"""
    from dgport.ort_env import onnxruntime

    return worst_case_error(onnxruntime(), bits, group) < TOLERANCE


def int8_level(quantization: dict) -> int:
    """The accuracy level for a quantized export's manifest entry on this CPU: 4 where onnxruntime sums
    its int8 products exactly for every bit width and its group size, else 0 (fp32 activations), with a
    warning: a slower step, never a silently wrong one."""
    bits = sorted({r["bits"] for r in quantization.get("roles", {}).values()} | {quantization["bits"]})
    if all(int8_products_exact(b, quantization["group_size"]) for b in bits):
        return 4
    warnings.warn("this CPU's onnxruntime does not sum int8 products exactly (the worst case of "
                  "dgport/runtimes/int8_check.py); computing with fp32 activations (accuracy level 0), ~2x slower",
                  RuntimeWarning, stacklevel=3)
    return 0


CHECKS = [(bits, group) for bits in (4, 8) for group in (32, 64, 128)]  # the export's bit widths and group sizes


def check_file(bits: int, group: int) -> str:
    return f"q{bits}_g{group}.onnx"


if __name__ == "__main__":  # writes the JavaScript loop's copies: python -m dgport.runtimes.int8_check web/int8_check
    import sys
    from pathlib import Path

    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    for bits, group in CHECKS:
        (folder / check_file(bits, group)).write_bytes(check_model(bits, group))
