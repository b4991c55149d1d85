"""MLX model vs the transformers modules on the same inputs (fp32 exports, MLX CPU on Linux)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mlx.core as mx  # noqa: E402  (the dev extra installs mlx[cpu]; a missing mlx must fail, not skip)

from conftest import ALL_PRESETS  # noqa: E402
from dgport.exporters import mlx_export  # noqa: E402
from dgport.exporters.checkpoint import read_checkpoint  # noqa: E402
from dgport.exporters.export import ExportOptions, export  # noqa: E402
from dgport.exporters.validation import compare, max_abs_rel_err  # noqa: E402
from dgport.manifest import open_export  # noqa: E402
from dgport.runtimes.mlx import MlxBackend  # noqa: E402
from dgport.runtimes.mlx_model import rope_inv_freq  # noqa: E402
from dgport.runtimes.torch_ref import TorchRefBackend  # noqa: E402

GATE = 1e-4  # DESIGN.md: fp32 MLX vs HF, max relative error


def rel_err(a, b) -> float:
    assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
    return max_abs_rel_err(a, b)


@pytest.fixture(scope="module")
def mlx_exports(checkpoints, tmp_path_factory):
    """preset -> fp32 MLX export folder (the driver's own HF validation runs once, on 'tiny')."""
    root = tmp_path_factory.mktemp("mlx-parity")
    made = {}

    class Lazy(dict):
        def __missing__(self, name):
            out = root / name
            summary = export(checkpoints[name], out, ExportOptions(formats=("mlx",), validate=(name == "tiny")))
            made[name] = summary
            self[name] = out
            return out

    lazy = Lazy()
    lazy.summaries = made
    return lazy


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_encoder_kv_and_step_logits_match_hf(preset, mlx_exports, checkpoints, hf_models):
    mine = MlxBackend(open_export(mlx_exports[preset], "mlx"), keep_logits=True)
    ref = TorchRefBackend(checkpoints[preset], model=hf_models[preset])
    cfg = mine.config
    rng = np.random.default_rng(11)
    C, V = cfg.canvas_length, cfg.vocab_size
    errs = {"encoder_kv": 0.0, "step_logits": 0.0}
    pos = 0
    # a prompt past the sliding window, then two committed canvases (sliding trims across calls)
    for T in (2 * cfg.sliding_window + 3, C, C):
        ids = rng.integers(0, V, size=(1, T))
        positions = np.arange(pos, pos + T)[None]
        mine.encode(ids, positions)
        ref.encode(ids, positions)
        pos += T
        assert mine.cache_len == ref.cache_len == pos
        for i in range(cfg.num_layers):
            k, v = mine.cache_numpy(i)
            rk, rv = ref.cache_numpy(i)
            expected_len = min(pos, cfg.sliding_cache_len) if cfg.is_sliding(i) else pos
            assert k.shape == (1, cfg.kv_heads[i], expected_len, cfg.head_dims[i])
            errs["encoder_kv"] = max(errs["encoder_kv"], rel_err(k, rk), rel_err(v, rv))
        # three denoising steps: the 2nd and 3rd are self-conditioned on the previous one
        mine.new_canvas()
        ref.new_canvas()
        canvas = rng.integers(0, V, size=(1, C))
        cpos = np.arange(pos, pos + C)[None]
        for t in (0.8, 0.6, 0.45):
            u = rng.random((1, C), dtype=np.float32)
            a = mine.denoise(canvas, cpos, np.float32(t), u)
            r = ref.denoise(canvas, cpos, np.float32(t), u)
            errs["step_logits"] = max(errs["step_logits"], rel_err(mine.last_logits, ref.last_logits))
            np.testing.assert_array_equal(a.argmax, r.argmax)
            np.testing.assert_array_equal(a.sampled, r.sampled)
            np.testing.assert_allclose(a.entropy, r.entropy, rtol=1e-4, atol=1e-5)
            assert a.argmax.dtype == a.sampled.dtype == np.int64 and a.entropy.dtype == np.float32
            canvas = np.where(rng.random((1, C)) < 0.5, r.sampled, rng.integers(0, V, size=(1, C)))
    print(f"\n{preset}: max rel err vs HF fp32: {errs}")
    assert max(errs.values()) <= GATE, errs


def test_driver_validation_gates_the_export(mlx_exports):
    mlx_exports["tiny"]
    validation = mlx_exports.summaries["tiny"].validation["mlx"]
    print(f"\ndriver validation (tiny, fp32): {validation}")
    # the fixture's tiny tower is validated too (an image prompt: its soft tokens, then the encoder's image path)
    assert set(validation) == {"encoder_kv", "step_logits", "step_entropy", "vision_soft_tokens"}
    assert max(validation.values()) <= GATE


def test_validation_detects_a_wrong_layer_scalar(mlx_exports, checkpoints, tmp_path):
    """The encoder must use the encoder's layer scalars: swapping in the decoder's shows up."""
    import shutil

    out = tmp_path / "swapped"
    shutil.copytree(mlx_exports["tiny"], out)
    entry = open_export(out).format("mlx")
    f = out / "mlx" / "layer-000.safetensors"
    w = dict(mx.load(str(f)))
    w["layers.0.encoder_layer_scalar"] = w["layers.0.layer_scalar"]
    mx.save_safetensors(str(f), w)
    ckpt = read_checkpoint(checkpoints["tiny"])
    [(_, open_backend)] = mlx_export.validation_backends(ckpt, out, entry)
    errors = compare(open_backend(), TorchRefBackend(ckpt.path), ckpt.config,
                     metric=mlx_export.VALIDATION_METRIC)
    assert errors["encoder_kv"] > 1e-3, errors


def test_rope_frequencies_match_transformers(hf_models):
    from dgport.config import TextConfig

    for preset in ("tiny", "long-context"):
        model = hf_models[preset]
        cfg = TextConfig.from_hf(model.config.to_dict())
        rot = model.model.decoder.rotary_emb
        for i in range(cfg.num_layers):
            np.testing.assert_array_equal(rope_inv_freq(cfg, i), getattr(rot, f"{cfg.layer_types[i]}_inv_freq").numpy())


def test_weights_are_mlx_safetensors_with_stacked_experts(mlx_exports):
    export_ = open_export(mlx_exports["tiny"], "mlx")
    entry, cfg = export_.format("mlx"), export_.config
    assert entry["layout"] == "dgport-mlx/1" and entry["dtype"] == "fp32" and entry["quantization"] is None
    assert all(f.startswith("mlx/") for f in entry["files"])
    w = mx.load(str(export_.file(entry["files"][1])))
    E, H, M = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert w["layers.0.experts.gate_up_proj.weight"].shape == (E, 2 * M, H)
    assert w["layers.0.experts.down_proj.weight"].shape == (E, H, M)
    full = cfg.full_layers[0]
    wf = mx.load(str(export_.file(f"mlx/layer-{full:03d}.safetensors")))
    assert f"layers.{full}.self_attn.v_proj.weight" not in wf  # K = V on full layers
    g = mx.load(str(export_.file("mlx/globals.safetensors")))
    assert "lm_head.weight" not in g and g["embed_tokens.weight"].shape == (cfg.vocab_size, H)  # tied


def test_run_path_imports_neither_torch_nor_transformers(mlx_exports):
    code = textwrap.dedent(f"""
        import sys, json
        sys.modules["torch"] = None
        sys.modules["transformers"] = None
        import dgport
        gen = dgport.load({str(mlx_exports["tiny"])!r}, backend="mlx")
        out = gen.generate([2, 120, 121, 122], seed=0, max_new_tokens=16)
        print(json.dumps({{"n": len(out.token_ids[0]), "mods": sorted(m for m in sys.modules
                          if m.split(".")[0] in ("torch", "transformers") and sys.modules[m] is not None)}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"n": 16, "mods": []}
