"""End to end on MLX: dgport.load(export, backend='mlx') generates the same tokens as the torch
reference and as ONNX Runtime (CPU) on the same `--format onnx,mlx` export; a 4-bit export runs
and stays close to fp32; bad inputs fail with one-line DgportErrors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import mlx.core as mx  # noqa: E402  (the dev extra installs mlx[cpu]; a missing mlx must fail, not skip)

import dgport  # noqa: E402
from conftest import ALL_PRESETS  # noqa: E402
from dgport.errors import DgportError, ExportError  # noqa: E402
from dgport.exporters.export import ExportOptions, export  # noqa: E402
from dgport.manifest import MANIFEST, read_manifest  # noqa: E402
from dgport.runtimes.mlx import MlxBackend  # noqa: E402
from backend_checks import (  # noqa: E402
    PROMPTS, SEEDS, argmax_agreement, assert_generates_like_torch, assert_keep_cache_like_torch,
)


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    """(preset, kind) -> export folder; kind: 'fp32' (mlx), 'q4' (mlx, 4-bit, the default group), 'both'
    (--format onnx,mlx, fp32; on long-context the driver validates both formats against HF)."""
    root = tmp_path_factory.mktemp("mlx-e2e")
    opts = {"fp32": ExportOptions(formats=("mlx",), validate=False),
            "q4": ExportOptions(formats=("mlx",), quantize=4, validate=False),
            "both": ExportOptions(formats=("onnx", "mlx"))}

    class Lazy(dict):
        def __missing__(self, key):
            name, kind = key
            out = root / f"{name}-{kind}"
            o = opts[kind]
            if kind == "both" and name != "long-context":
                o = ExportOptions(formats=o.formats, validate=False)
            summary = export(checkpoints[name], out, o)
            if o.validate:
                assert {k.split()[0] for k in summary.validation} == set(o.formats), summary.validation
            self[key] = out
            return out

    return Lazy()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_generate_token_identical_to_torch(preset, exports, torch_gens):
    gen = dgport.load(exports[(preset, "fp32")], backend="mlx")
    assert_generates_like_torch(gen, torch_gens[preset], preset)


def test_keep_cache_continues_like_torch(exports, torch_gens):
    gen = dgport.load(exports[("long-context", "fp32")], backend="mlx")
    assert_keep_cache_like_torch(gen, torch_gens["long-context"])


@pytest.mark.slow
@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_mlx_equals_onnx_cpu_on_one_export(preset, exports):
    """Same prompts and seeds as the torch test above, so equal here means all three agree."""
    out = exports[(preset, "both")]
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["formats"]) == {"onnx", "mlx"}
    ort = dgport.load(out, backend="cpu", threads=2)
    gen = dgport.load(out, backend="mlx")
    for prompt in PROMPTS[preset]:
        for seed in SEEDS:
            a, b = gen.generate(prompt, seed=seed), ort.generate(prompt, seed=seed)
            assert a.token_ids == b.token_ids, (prompt, seed)
            assert a.steps_per_canvas == b.steps_per_canvas


# -- 4-bit ---------------------------------------------------------------------------------
# Thresholds from measurement (2026-11-23, these fixtures, fp32 activations + 4-bit weights):
# teacher-forced argmax agreement (same cache, same canvas) was 0.91 (confident) and 0.995 (eos),
# minimum over 12 steps 0.81 / 0.94; generation token agreement averaged 0.36 over 6 runs while
# unrelated fp32 streams (different seeds) agree at ~0.06. 'tiny' and 'long-context' are left out
# of the gates: their near-uniform, chaotic random models put argmax at chance (0.04-0.15) for
# any perturbation, including HF's own bf16 vs fp32 (measured), so they only print.
ARGMAX_AGREEMENT_MIN = 0.80
TOKEN_AGREEMENT_MIN = 0.15


@pytest.mark.slow
def test_4bit_export_runs_and_agrees_with_fp32(exports):
    report, gated_tokens, gated_argmax = {}, [], []
    for preset in ALL_PRESETS:
        q_export = read_manifest(exports[(preset, "q4")])
        quant = q_export.format("mlx")["quantization"]
        # fixture widths 96 (intermediate) and 32 (experts) are not multiples of 64: one group of 32 for all
        assert quant["bits"] == 4 and quant["group_size"] == 32 and "group_size_fallbacks" not in quant
        w = mx.load(str(q_export.file("mlx/layer-000.safetensors")))
        assert w["layers.0.experts.gate_up_proj.weight"].dtype == mx.uint32  # packed for gather_qmm
        assert "layers.0.router.proj.scales" not in w  # router kept in full precision
        fp, q4 = dgport.load(exports[(preset, "fp32")], backend="mlx"), dgport.load(q_export.path, backend="mlx")
        same = total = 0
        for prompt in PROMPTS[preset]:
            for seed in SEEDS:
                a, b = fp.generate(prompt, seed=seed).token_ids[0], q4.generate(prompt, seed=seed).token_ids[0]
                assert b and all(0 <= t < fp.config.vocab_size for t in b)
                n = min(len(a), len(b))
                same += int(np.sum(np.array(a[:n]) == np.array(b[:n])))
                total += max(len(a), len(b))
        tokens = same / total
        argmax = argmax_agreement(MlxBackend(read_manifest(exports[(preset, "fp32")])), MlxBackend(q_export), 5)
        report[preset] = {"token_agreement": round(tokens, 3), "teacher_forced_argmax_agreement": round(argmax, 3)}
        if preset in ("confident", "eos"):
            gated_tokens.append(tokens)
            gated_argmax.append(argmax)
    print(f"\n4-bit (group 32) vs fp32 agreement: {report}")
    assert min(gated_argmax) >= ARGMAX_AGREEMENT_MIN, report
    assert np.mean(gated_tokens) >= TOKEN_AGREEMENT_MIN, report


# -- bad input -----------------------------------------------------------------------------
def _one_line(err: Exception) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, msg
    return msg


def test_quantize_3_is_refused(checkpoints, tmp_path):
    with pytest.raises(DgportError) as e:
        export(checkpoints["tiny"], tmp_path / "q3", ExportOptions(formats=("mlx",), quantize=3))
    assert "--quantize 3" in _one_line(e.value) and "4 or 8" in str(e.value)
    assert not (tmp_path / "q3").exists()


def test_mlx_backend_on_an_export_without_mlx_weights(exports, tmp_path):
    out = tmp_path / "onnx-only"
    shutil.copytree(exports[("tiny", "fp32")], out)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["formats"] = {"onnx": {"files": []}}  # what an ONNX-only export's manifest holds
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ExportError) as e:
        dgport.load(out, backend="mlx")
    msg = _one_line(e.value)
    assert "no mlx weights" in msg and "--format mlx" in msg


def test_truncated_mlx_weights(exports, tmp_path):
    out = tmp_path / "truncated"
    shutil.copytree(exports[("tiny", "fp32")], out)
    f = out / "mlx" / "layer-001.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError) as e:
        dgport.load(out, backend="mlx")
    msg = _one_line(e.value)
    assert "layer-001.safetensors" in msg and "truncated" in msg and "Export again" in msg
    # the loader's own check, without the manifest's size check in front of it
    with pytest.raises(ExportError) as e:
        MlxBackend(read_manifest(out))
    msg = _one_line(e.value)
    assert "layer-001.safetensors" in msg and "cannot read the MLX weights" in msg and "xport again" in msg


def test_garbled_mlx_weights_same_size(exports, tmp_path):
    out = tmp_path / "garbled"
    shutil.copytree(exports[("tiny", "fp32")], out)
    f = out / "mlx" / "globals.safetensors"
    data = bytearray(f.read_bytes())
    data[:16] = b"\xff" * 16  # header length and start of the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(ExportError) as e:
        dgport.load(out, backend="mlx")  # sha256 mismatch
    assert "globals.safetensors" in _one_line(e.value)
    with pytest.raises(ExportError) as e:
        MlxBackend(read_manifest(out))
    assert "cannot read the MLX weights" in _one_line(e.value)
