"""MODEL resolution: export folder as is, checkpoint folder exported once into the cache, Hub id from
the Hugging Face cache (laid out here as huggingface_hub lays it out; nothing is downloaded)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dgport.errors import DgportError
from dgport.manifest import MANIFEST
from dgport.resolve import hub_cache_dir, is_hub_id, resolve_checkpoint, resolve_model

pytest.importorskip("huggingface_hub")
ROOT = Path(__file__).resolve().parents[1]
SUDOKU = ROOT / "models" / "sudoku"
PUZZLE = ".741......3.67.5.22.53..47..1....8....842.163356..8.2....83..466...9.21.1..24.357"
FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def hub_layout(hf_home: Path, repo_id: str, src: Path = SUDOKU, commit: str = "0123456789abcdef" * 2 + "01234567"):
    """HF_HOME/hub/models--owner--name/{blobs/<sha256>, refs/main, snapshots/<commit>/<file> -> blobs}."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in FILES:
        data = (src / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return snap


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("DGPORT_CACHE_DIR", str(tmp_path / "dgport-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_hub_ids():
    assert is_hub_id("google/diffusiongemma-26B-A4B-it") and is_hub_id("a/b.c_d")
    for text in ("a/b/c", "/abs/path", "./x", "x", "a/..", "../b", "a/b-", "a /b"):
        assert not is_hub_id(text), text


def test_hub_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "h"))
    assert hub_cache_dir() == tmp_path / "h" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub_cache_dir() == tmp_path / "c"


def test_export_folder_is_used_as_is(env):
    from dgport.default_model import ensure_default_export

    export = ensure_default_export("cpu")
    assert resolve_model(export, "cpu") == export
    with pytest.raises(DgportError, match="torch"):
        resolve_model(export, "torch")


def test_checkpoint_folder_is_exported_once_and_reused(env, monkeypatch):
    out = resolve_model(SUDOKU, "cpu")
    assert (out / MANIFEST).exists() and out.is_relative_to(env / "dgport-cache")
    assert "-onnx-fp32-none-v" in out.name and out.name.startswith("sudoku-")
    stamp = (out / MANIFEST).stat().st_mtime_ns
    import dgport.exporters.export as exp

    monkeypatch.setattr(exp, "export", lambda *a, **k: pytest.fail("exported a second time"))
    assert resolve_model(SUDOKU, "cpu") == out and (out / MANIFEST).stat().st_mtime_ns == stamp
    assert resolve_model(SUDOKU, "torch") == SUDOKU


def test_hub_id_offline_from_the_hub_cache(env):
    import dgport

    snap = hub_layout(env / "hf", "google/sudoku-dg")
    assert resolve_checkpoint("google/sudoku-dg") == snap
    out = resolve_model("google/sudoku-dg", "cpu")
    assert out.name.startswith("sudoku-dg-") and (out / MANIFEST).exists()
    from_hub = dgport.load(out, backend="cpu").generate(PUZZLE, seed=0)
    direct = dgport.load(resolve_model(SUDOKU, "cpu"), backend="cpu").generate(PUZZLE, seed=0)
    assert from_hub.token_ids == direct.token_ids  # same checkpoint fingerprint: the same model


def test_hub_id_offline_and_missing_is_one_clear_line(env):
    with pytest.raises(DgportError, match="HF_HUB_OFFLINE") as e:
        resolve_model("google/diffusiongemma-26B-A4B-it", "cpu")
    assert "\n" not in str(e.value) and str(env / "hf" / "hub") in str(e.value)


def test_not_a_model(env, tmp_path):
    with pytest.raises(DgportError, match="not a Hugging Face Hub id"):
        resolve_model(tmp_path / "missing" / "deeper" / "x", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DgportError, match="neither a dgport export"):
        resolve_model(tmp_path / "empty", "cpu")


def test_serve_command_offline_without_the_model(env):
    pytest.importorskip("fastapi")
    r = subprocess.run([sys.executable, "-m", "dgport.serve", "google/not-here", "--port", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ})
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("dgport: error: google/not-here: not in the Hugging Face cache")
    assert len(r.stderr.strip().splitlines()) == 1


def test_cache_key_covers_the_template_and_a_damaged_export_is_redone(env):
    import json

    from dgport.manifest import open_export

    ck = env / "ckpt"
    ck.mkdir()
    for name in FILES:
        shutil.copy(SUDOKU / name, ck / name)
    first = resolve_model(ck, "cpu")
    cfg = json.loads((ck / "tokenizer_config.json").read_text())
    cfg["chat_template"] += " "
    (ck / "tokenizer_config.json").write_text(json.dumps(cfg))
    second = resolve_model(ck, "cpu")
    assert second != first  # same weights, another template: not the old export
    victim = max((p for p in second.rglob("*") if p.is_file() and p.name != MANIFEST), key=lambda p: p.stat().st_size)
    victim.write_bytes(b"")
    assert resolve_model(ck, "cpu") == second
    open_export(second, "cpu")  # exported again, whole
