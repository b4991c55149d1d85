"""Quantized exports on x86 CPUs without VNNI (issue 31, item 2): int8 activations never give a
silently wrong product.

u8 x s8 products summed in pairs into saturating 16-bit lanes (vpmaddubsw, the int8 dot product of x86
CPUs without VNNI) overflow when both factors reach the ends of their ranges. runtimes/int8_check.py
runs that worst case through the export's own node pattern before a quantized export computes with
int8 activations, and the backend falls back to fp32 activations where the answer is not exact. Here:
the worst case is one (saturated pairs would be 37-49 % off; the export's quantizer gives such integers),
onnxruntime is exact on it natively and under `qemu-x86_64 -cpu Haswell` (AVX2 without AVX-512 or VNNI:
MLAS picks its non-VNNI kernels from CPUID), and the backend takes the fallback when the check fails.
qemu-user comes from the README's test command (tests/install-tools.sh)."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from dgport.runtimes import int8_check
from dgport.runtimes.int8_check import int8_activations, int8_reference, worst_case

CASES = int8_check.CHECKS
FEATURES = ("import numpy as np, json; f = np._core._multiarray_umath.__cpu_features__; "
            "print(json.dumps({k: bool(f.get(k)) for k in ('AVX2', 'AVX512F', 'AVX512VNNI', 'AVXVNNI')}))")
ERRORS = ("import json, tempfile, onnx; from dgport.ort_env import onnxruntime; "
          "from dgport.runtimes.int8_check import worst_case_error; d = tempfile.mkdtemp(); out = []\n"
          f"for bits, group in {CASES!r}:\n"
          "    e = worst_case_error(onnxruntime(), bits, group, d + '/fused.onnx')\n"
          "    out.append([bits, group, e, [n.op_type for n in onnx.load(d + '/fused.onnx').graph.node]])\n"
          "print(json.dumps(out))")

x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                         reason="x86 only: other CPUs have no vpmaddubsw")


def _qemu() -> list[str]:
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.fail("qemu-x86_64 is needed to run onnxruntime on an emulated CPU without VNNI: run "
                    "`bash tests/install-tools.sh` (the README's test command does), or apt-get install qemu-user")
    return [qemu, "-cpu", "Haswell"]


def _child(prefix: list[str], code: str):
    proc = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pairs_saturated(q, zp, scale, a, group: int) -> np.ndarray:
    """What vpmaddubsw would give: u8 weight integers x s8 activations added in pairs into saturating
    16-bit lanes, then the zero points' share subtracted exactly."""
    ints, step = int8_activations(a, group)  # [rows, K], [rows, K/group, 1]
    prod = ints[:, :, None] * q.astype(np.float64)[None]  # [rows, K, N]
    pairs = np.clip(prod[:, 0::2] + prod[:, 1::2], -32768, 32767)
    per_block = pairs.reshape(len(a), -1, group // 2, q.shape[1]).sum(2) \
        - ints.reshape(len(a), -1, group).sum(-1)[..., None] * zp[None].astype(np.float64)
    return (per_block * step * scale[None]).sum(1)


def test_the_worst_case_is_one():
    for bits, group in CASES:
        q, zp, scale, a = worst_case(bits, group)
        exact = int8_reference(q, zp, scale, a, group)
        err = np.abs(_pairs_saturated(q, zp, scale, a, group) - exact).max() / np.abs(exact).max()
        if bits == 8:
            assert err > 0.1, (group, err)
        else:  # 4-bit integers (at most 15 x 127 twice) cannot reach 2^15: the pairs are exact
            assert err < 1e-12, (group, err)


def test_the_exports_quantizer_gives_the_worst_cases_integers():
    from dgport.exporters.quantize import GROUP_SIZES, quantize

    assert {group for _, group in CASES} == set(GROUP_SIZES)  # a check for every group size an export may have

    w = np.array([[255 / 256] * 32, [-255 / 256] * 32], np.float32)  # an all-positive and an all-negative group
    q, scale, zp = quantize(w, 8, 32)
    assert (q[0] == 255).all() and zp[0, 0] == 0 and (q[1] == 0).all() and zp[1, 0] == 255


@x86
def test_the_emulated_cpu_has_avx2_without_vnni():
    flags = _child(_qemu(), FEATURES)
    assert flags == {"AVX2": True, "AVX512F": False, "AVX512VNNI": False, "AVXVNNI": False}


@x86
@pytest.mark.parametrize("cpu", ["native", "haswell"])
def test_onnxruntime_sums_the_worst_case_exactly(cpu):
    for bits, group, err, ops in _child([] if cpu == "native" else _qemu(), ERRORS):
        assert "MatMulNBits" in ops and not {"DequantizeLinear", "MatMul"} & set(ops), (bits, group, ops)  # fused
        assert err < int8_check.TOLERANCE, (cpu, bits, group, err)


@pytest.fixture(scope="module")
def q8(checkpoints, tmp_path_factory):
    from dgport.exporters.export import ExportOptions, export

    out = tmp_path_factory.mktemp("nonvnni") / "q8"
    export(checkpoints["tiny"], out, ExportOptions(quantize=8, group_size=32, validate=False, text_only=True))
    return out


def test_the_backend_falls_back_to_fp32_activations_where_the_check_fails(q8, monkeypatch):
    from dgport.manifest import read_manifest
    from dgport.runtimes.onnx import OnnxBackend

    out = q8
    monkeypatch.delenv("DGPORT_ORT_ACCURACY_LEVEL", raising=False)
    asked = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the check passes on this CPU: no warning
        assert OnnxBackend(read_manifest(out), threads=1).accuracy_level == 4

    def wrong(bits, group):
        asked.append((bits, group))
        return bits != 8

    monkeypatch.setattr(int8_check, "int8_products_exact", wrong)
    with pytest.warns(RuntimeWarning, match="fp32 activations"):
        backend = OnnxBackend(read_manifest(out), threads=1)
    assert backend.accuracy_level == 0 and (8, 32) in asked
    assert OnnxBackend(read_manifest(out), threads=1, accuracy_level=0).accuracy_level == 0  # asked for: no check
    assert len(asked) == 1


@pytest.mark.parametrize("where,value,message", [
    (("roles", "experts", "bits"), 5, "roles.experts.bits: 5 is not 4 or 8"),
    (("roles", "experts", "bits"), "8", "roles.experts.bits: '8' is a string"),
    (("group_size",), 4096, "group_size: 4096 is out of range"),
    (("roles", "experts"), 8, "roles.experts: 8 is an integer, expected an object"),
])
def test_the_checks_inputs_come_from_a_checked_manifest(q8, tmp_path, where, value, message):
    """The check reads the manifest's bits and group size: a hand-made value is refused where it enters."""
    from dgport.errors import DgportError
    from dgport.manifest import MANIFEST, manifest_digest, read_manifest
    from hardening_support import edit_json, one_line

    out = tmp_path / "q8"
    shutil.copytree(q8, out)

    def change(m):
        node = m["formats"]["onnx"]["quantization"]
        for key in where[:-1]:
            node = node[key]
        node[where[-1]] = value
        m["manifest_sha256"] = manifest_digest(m)
    edit_json(out / MANIFEST, change)
    with pytest.raises(DgportError) as e:
        read_manifest(out)
    assert f"formats.onnx.quantization.{message}" in one_line(e)
