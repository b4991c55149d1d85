"""End to end: dgport.load(export, backend='cpu') generates the same tokens as the torch reference,
bf16 exports run, the real 26B-A4B layer geometry exports, and bad inputs fail cleanly."""
from __future__ import annotations

import os
import shutil

import pytest

import dgport
from conftest import ALL_PRESETS, BIG_MEMORY, mem_available_gb
from dgport.errors import DgportError, ExportError
from dgport.exporters.export import ExportOptions, export
from backend_checks import assert_generates_like_torch, assert_keep_cache_like_torch
from onnx_support import THREADS, onnx_exports  # noqa: F401


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_generate_token_identical_to_torch(preset, onnx_exports, torch_gens):
    ort_gen = dgport.load(onnx_exports[(preset, "fp32")], backend="cpu", threads=THREADS)
    assert_generates_like_torch(ort_gen, torch_gens[preset], preset)


def test_swapped_moe_forms_generate_like_torch(checkpoints, torch_gens, tmp_path):
    """Default exports run the encoder's experts sparse and the denoise step's dense; the other two
    forms (dense encoder, sparse denoise step) pass the driver's gate and give the same tokens."""
    out = tmp_path / "swapped"
    summary = export(checkpoints["long-context"], out,
                     ExportOptions(encoder_moe="dense", denoise_moe="sparse", with_logits=True))
    moe = dgport.manifest.open_export(out, "cpu").format("onnx")["moe"]
    assert moe == {dev: {"encoder": "dense", "denoise_step": "sparse"} for dev in ("cpu", "cuda")}
    assert {"encoder_kv", "step_logits"} <= set(summary.validation["onnx"])
    gen = dgport.load(out, backend="cpu", threads=THREADS)
    assert_generates_like_torch(gen, torch_gens["long-context"], "long-context")


def test_keep_cache_continues_like_torch(onnx_exports, torch_gens):
    gen = dgport.load(onnx_exports[("long-context", "fp32")], backend="cpu", threads=THREADS)
    assert_keep_cache_like_torch(gen, torch_gens["long-context"])


def test_prompt_encoded_in_chunks_equals_one_call(onnx_exports, torch_gens):
    """The loop encodes long prompts in chunks (dgport.loop.ENCODE_CHUNK) to bound attention memory:
    chunks smaller than the sliding window (8) and not dividing the 28-token prompt give the cache
    and the tokens of one encode call, on ONNX Runtime and on the torch reference."""
    import numpy as np

    from dgport.exporters.validation import rel_err
    from dgport.loop import encode_chunked
    from dgport.timing import TimedBackend

    prompt = [2] + list(range(130, 157))
    ids, pos = np.array([prompt]), np.arange(len(prompt))[None]
    gen = dgport.load(onnx_exports[("long-context", "fp32")], backend="cpu", threads=THREADS)
    for g in (gen, torch_gens["long-context"]):
        b = g.backend
        b.reset()
        b.encode(ids, pos)
        whole = [b.cache_numpy(i) for i in range(b.config.num_layers)]
        b.reset()
        timed = TimedBackend(b)
        encode_chunked(timed, ids, pos, chunk=5)
        assert len(timed.timings.encode_s) == 6 and b.cache_len == len(prompt)  # ceil(28 / 5) calls
        for i, (k, v) in enumerate(whole):
            ck, cv = b.cache_numpy(i)
            assert ck.shape == k.shape  # sliding layers trimmed alike
            assert max(rel_err(ck, k), rel_err(cv, v)) <= 1e-5, i  # fp32 rounding: other matmul shapes
        one = g.generate(prompt, seed=3, encode_chunk=len(prompt))
        assert g.generate(prompt, seed=3, encode_chunk=5).token_ids == one.token_ids
    with pytest.raises(DgportError, match="encode_chunk must be a positive"):
        gen.generate(prompt, seed=3, encode_chunk=0)


# --------------------------------------------------------------------------- bad input

def test_out_not_empty_without_force(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="exists and is not empty.*--force"):
        export(checkpoints["tiny"], out, ExportOptions())
    assert (out / "keep.txt").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_unknown_dtype_or_moe_form(checkpoints, tmp_path):
    with pytest.raises(DgportError, match="--denoise-moe 'fast': choose auto, sparse, unrolled, dense or grouped"):
        export(checkpoints["tiny"], tmp_path / "o", ExportOptions(denoise_moe="fast"))
    with pytest.raises(DgportError, match="--dtype 'int3': choose one of fp32, fp16, bf16"):
        export(checkpoints["tiny"], tmp_path / "o", ExportOptions(dtype="int3"))
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))


@pytest.fixture()
def copied_export(onnx_exports, tmp_path):
    dst = tmp_path / "exp"
    shutil.copytree(onnx_exports[("tiny", "fp32")], dst)
    return dst


def test_missing_manifest(copied_export):
    (copied_export / "dgport.json").unlink()
    with pytest.raises(ExportError, match="not a dgport export, no dgport.json"):
        dgport.load(copied_export, backend="cpu")


def test_tampered_artifact(copied_export):
    p = copied_export / "weights.bin"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    os.utime(p, ns=(1, 1))  # new mtime: no cached verification applies
    with pytest.raises(ExportError, match="weights.bin: sha256 does not match dgport.json"):
        dgport.load(copied_export, backend="cpu")


def test_mlx_backend_of_onnx_only_export(copied_export):
    with pytest.raises(ExportError, match="has no mlx weights.*--format mlx"):
        dgport.load(copied_export, backend="mlx")


def test_cuda_without_onnxruntime_gpu(copied_export):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(dgport.errors.BackendUnavailable, match=r"pip install 'dgport\[cuda\]'") as e:
        dgport.load(copied_export, backend="cuda")
    assert "uninstall" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- real 26B-A4B geometry

REAL_SLICE = r"""
import json, resource, sys
import dgport
from dgport.exporters import validation
from dgport.exporters.export import ExportOptions, export
from models.fixtures import build_fixture
root = __import__("pathlib").Path(sys.argv[1])
ckpt = build_fixture("real-slice", root / "ckpt")
validation.HALF_TOLERANCE = 0.0  # always run the fp32 comparison (the gate's fallback)
summary = export(ckpt, root / "onnx", ExportOptions(dtype="bf16"))
gen = dgport.load(root / "onnx", backend="cpu", threads=2)
cfg = gen.config
res = gen.generate([2, 105, 300, 301, 106], seed=0)
print(json.dumps({"validation": summary.validation["onnx"], "tokens": len(res.token_ids[0]),
                  "steps": res.steps_per_canvas, "canvas": cfg.canvas_length,
                  "geometry": [cfg.hidden_size, cfg.num_heads, list(cfg.head_dims), list(cfg.kv_heads),
                               cfg.num_experts, cfg.top_k_experts, cfg.moe_intermediate_size, cfg.intermediate_size],
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


@pytest.mark.slow
@BIG_MEMORY
@pytest.mark.skipif(mem_available_gb() < 12, reason="the real-geometry slice peaks at ~10 GB RSS (transformers "
                    "loading its 3.1 GB of bf16 weights as the 6.2 GB fp32 reference; one model at a time)")
def test_real_geometry_slice_exports_validates_and_runs(tmp_path):
    """Real 26B-A4B layer geometry (models.fixtures LARGE_PRESETS['real-slice']): one sliding and one
    full layer, bf16 weights, reduced vocabulary/canvas, in its own process (its memory is its own).
    The driver validates it before the folder appears; the assertion measures what the graph computes
    against transformers in fp32 (the more precise reference), never against transformers' own bf16
    run, which is further from fp32 than the graph is (measured 0.0238 vs 0.0069 for the cache on one
    x86 CPU). Forcing the gate onto its fallback makes the driver measure exactly that."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", REAL_SLICE, str(tmp_path)], capture_output=True, text=True,
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nreal-slice: {out}")
    report = out["validation"]
    for key in ("encoder_kv", "step_entropy"):
        # bf16 rounding of 2816-wide layers against fp32: measured ~0.007; a wrong graph is off by far more
        assert 0 < report[f"{key}_vs_fp32"] <= 2e-2, (key, report)
    assert out["geometry"] == [2816, 16, [256, 512], [8, 2], 128, 8, 704, 2112]
    assert out["tokens"] == out["canvas"] and out["steps"]
    # one model in memory at a time (was 17-21 GB with the checkpoint, export, bf16 and fp32 models together)
    assert out["peak_rss_gb"] < 11.5, out["peak_rss_gb"]


@pytest.mark.slow
def test_fused_attention_export_generates_like_torch(checkpoints, torch_gens, tmp_path):
    """--attention fused: one ONNX Attention node per layer (opset 23); the driver validates it and it
    generates the reference's tokens (prompt past the sliding window, several canvases)."""
    out = tmp_path / "fused"
    summary = export(checkpoints["long-context"], out, ExportOptions(attention="fused", with_logits=True))
    entry = dgport.manifest.open_export(out, "cpu").format("onnx")
    assert (entry["attention"], entry["opset"]) == ("fused", 23)
    errs = summary.validation["onnx"]
    own = {k: v for k, v in errs.items() if "_vs_" not in k}
    if max(own.values()) > 1e-5:
        # two fp32 implementations that round differently: measured against float64, as the gate does
        # (onnxruntime 1.32's Attention kernel: step logits 1.1e-5 from transformers fp32, 8.4e-6 from
        # float64, where transformers' own fp32 run is 9.1e-6 from float64)
        own = {k: errs[f"{k}_vs_fp64"] for k in own}
    assert max(own.values()) <= 1e-5, errs
    gen = dgport.load(out, backend="cpu", threads=THREADS)
    assert_generates_like_torch(gen, torch_gens["long-context"], "long-context")
