"""Nothing lost, never unpickle: what `dgport export` may replace or remove, the atomic final step,
concurrent exports, killed exports, and the torch reference reading only safetensors."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dgport.exporters.export as export_mod
from dgport.cli import main
from dgport.errors import CheckpointError, ExportError
from dgport.exporters.checkpoint import read_checkpoint
from dgport.exporters.export import ExportOptions, export, is_export
from dgport.manifest import MANIFEST

FAST = ExportOptions(validate=False)
FORCE = ExportOptions(validate=False, force=True)
REPO = Path(__file__).resolve().parents[1]
EMBED = "model.decoder.embed_tokens.weight"


def _snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under folder (to prove nothing changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.fixture()
def ckpt(checkpoints, tmp_path):
    """A private copy of the tiny checkpoint (a broken refusal must not damage the session's)."""
    return Path(shutil.copytree(checkpoints["tiny"], tmp_path / "ckpt"))


def _cli(*args) -> tuple[int, list[str]]:
    """Run the CLI in this process; (exit code, stderr's `dgport: error:` lines)."""
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, [line for line in err.getvalue().splitlines() if line.startswith("dgport: error:")]


# --------------------------------------------------------------------------- OUT vs SRC

def test_out_equal_to_src_is_refused_with_force(ckpt, tmp_path):
    before = _snapshot(ckpt)
    with pytest.raises(ExportError, match="is the checkpoint folder SRC itself"):
        export(ckpt, ckpt, FORCE)
    (tmp_path / "link").symlink_to(ckpt, target_is_directory=True)
    with pytest.raises(ExportError, match="is the checkpoint folder SRC itself"):
        export(tmp_path / "link", ckpt, FORCE)  # SRC given through a symlink
    code, errors = _cli("export", ckpt, ckpt, "--force", "--no-validate")
    assert code == 1 and len(errors) == 1 and "is the checkpoint folder SRC itself" in errors[0]
    assert _snapshot(ckpt) == before and _leftovers(tmp_path, "ckpt") == []


def test_out_containing_src_is_refused(ckpt, tmp_path):
    (tmp_path / "notes.txt").write_text("the user's other files")
    before = _snapshot(tmp_path)
    with pytest.raises(ExportError, match="contains the checkpoint folder"):
        export(ckpt, tmp_path, FORCE)
    with pytest.raises(ExportError, match="contains the checkpoint folder"):
        export(ckpt, tmp_path.parent, FORCE)
    assert _snapshot(tmp_path) == before


def test_out_inside_src_is_refused(ckpt):
    before = _snapshot(ckpt)
    for out in (ckpt / "exp", ckpt / "a" / "b"):
        with pytest.raises(ExportError, match="lies inside the checkpoint folder"):
            export(ckpt, out, FAST)
    assert _snapshot(ckpt) == before and sorted(p.name for p in ckpt.iterdir()) == sorted(before)


# --------------------------------------------------------------------------- what --force replaces

@pytest.mark.parametrize("content", [None, "{}", "not json", '{"format_version": 2}'])
def test_force_refuses_a_folder_that_is_not_an_export(ckpt, tmp_path, content):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    if content is not None:
        (out / MANIFEST).write_text(content)
    before = _snapshot(out)
    with pytest.raises(ExportError, match=r"is not a dgport export \(no dgport\.json written by dgport\)"):
        export(ckpt, out, FORCE)
    code, errors = _cli("export", ckpt, out, "--force", "--no-validate")
    assert code == 1 and len(errors) == 1 and "--force replaces only an earlier export" in errors[0]
    assert _snapshot(out) == before and _leftovers(tmp_path, "mine") == []


def test_force_replaces_an_earlier_export_and_empty_folder_is_written(ckpt, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()  # empty: written into without --force
    export(ckpt, out, FAST)
    assert is_export(out)
    first = json.loads((out / MANIFEST).read_text())
    with pytest.raises(ExportError, match="exists and is not empty.*--force"):
        export(ckpt, out, FAST)
    export(ckpt, out, ExportOptions(validate=False, force=True, with_logits=True))
    second = json.loads((out / MANIFEST).read_text())
    assert first["formats"] != second["formats"]  # the new export replaced the old one
    assert _leftovers(tmp_path, "exp") == []  # no .exp.old-*, .exp.partial-*, .exp.lock


def test_symlink_out_is_refused(ckpt, tmp_path):
    export(ckpt, tmp_path / "real", FAST)
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    with pytest.raises(ExportError, match="is a symbolic link"):
        export(ckpt, tmp_path / "link", FORCE)
    assert is_export(tmp_path / "real")


def _tree(folder: Path) -> list[str]:
    """Every entry under folder (files, folders, links), relative."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("extra", ["notes.txt", "bench/results.csv", "runs/", "weights.bin.bak", "link.txt"])
def test_force_refuses_an_export_holding_files_it_does_not_list(ckpt, tmp_path, extra):
    """--force removes an earlier export whole: not when it holds something its manifest does not list."""
    out = tmp_path / "exp"
    export(ckpt, out, FAST)
    target = out / extra.rstrip("/")
    if extra.endswith("/"):
        target.mkdir()
    elif extra == "link.txt":
        (tmp_path / "elsewhere.txt").write_text("the user's")
        target.symlink_to(tmp_path / "elsewhere.txt")
    else:
        target.parent.mkdir(exist_ok=True)
        target.write_text("the user's own file")
    before, entries = _snapshot(out), _tree(out)
    with pytest.raises(ExportError, match="not written by dgport") as e:
        export(ckpt, out, FORCE)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(out / extra.split("/")[0])) and "move it out of" in msg, msg
    code, errors = _cli("export", ckpt, out, "--force", "--no-validate")
    assert code == 1 and len(errors) == 1 and "not written by dgport" in errors[0]
    assert _snapshot(out) == before and _tree(out) == entries and _leftovers(tmp_path, "exp") == []


def test_force_refuses_a_file_added_inside_an_export_subfolder(ckpt, tmp_path):
    pytest.importorskip("mlx.core")
    out = tmp_path / "exp"
    export(ckpt, out, ExportOptions(formats=("onnx", "mlx"), validate=False))
    (out / "mlx" / "notes.md").write_text("mine")
    with pytest.raises(ExportError, match=r"mlx/notes\.md: not written by dgport"):
        export(ckpt, out, FORCE)
    assert (out / "mlx" / "notes.md").read_text() == "mine"
    (out / "mlx" / "notes.md").unlink()
    export(ckpt, out, FORCE)  # only what dgport wrote: replaced
    assert not (out / "mlx").exists()


def test_force_refuses_a_file_added_while_the_export_runs(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    export(ckpt, out, FAST)
    real_write = export_mod._write

    def write_then_user_adds_a_file(*args):
        result = real_write(*args)
        (out / "notes.txt").write_text("written meanwhile")
        return result

    monkeypatch.setattr(export_mod, "_write", write_then_user_adds_a_file)
    with pytest.raises(ExportError, match="notes.txt: not written by dgport"):
        export(ckpt, out, FORCE)
    assert (out / "notes.txt").read_text() == "written meanwhile" and is_export(out)
    assert _leftovers(tmp_path, "exp") == []


@pytest.mark.parametrize("layout", ["hub", "folder"])
def test_force_never_removes_an_export_the_checkpoint_links_into(ckpt, tmp_path, layout):
    """A checkpoint file linked into OUT (here tokenizer.json -> OUT/tokenizer.json): replacing OUT would
    delete what the checkpoint reads. In a Hub cache snapshot links may point anywhere in the repo's
    folder, so OUT inside it is refused by this rule; elsewhere the link itself is refused."""
    if layout == "hub":
        src = tmp_path / "models--a--b" / "snapshots" / ("cd" * 20)
        shutil.copytree(ckpt, src)
        out = tmp_path / "models--a--b" / "exp"
    else:
        src, out = ckpt, tmp_path / "exp"
    export(src, out, FAST)
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(os.path.relpath(out / "tokenizer.json", src))
    before = _snapshot(out)
    with pytest.raises(ExportError if layout == "hub" else CheckpointError,
                       match="which --force would remove" if layout == "hub" else "outside the model folder") as e:
        export(src, out, FORCE)
    assert "\n" not in str(e.value) and str(src / "tokenizer.json") in str(e.value)
    assert _snapshot(out) == before and _leftovers(out.parent, "exp") == []


def test_force_never_removes_an_export_holding_the_checkpoint(ckpt, tmp_path):
    out = tmp_path / "exp"
    export(ckpt, out, FAST)
    shutil.copytree(ckpt, out / "ckpt")
    (tmp_path / "link").symlink_to(out / "ckpt", target_is_directory=True)
    before = _snapshot(out)
    with pytest.raises(ExportError, match="contains the checkpoint folder"):
        export(tmp_path / "link", out, FORCE)
    assert _snapshot(out) == before


def test_force_with_a_fifo_manifest_does_not_block(ckpt, tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    os.mkfifo(out / MANIFEST)

    def expired(signum, frame):
        raise AssertionError("blocked reading a FIFO")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    try:
        with pytest.raises(ExportError, match="is not a dgport export"):
            export(ckpt, out, FORCE)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]


# --------------------------------------------------------------------------- concurrent exports

def test_out_appearing_during_export_is_not_replaced(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    real_write = export_mod._write

    def write_then_someone_creates_out(*args):
        result = real_write(*args)
        out.mkdir()
        (out / "theirs.txt").write_text("written by another program meanwhile")
        return result

    monkeypatch.setattr(export_mod, "_write", write_then_someone_creates_out)
    with pytest.raises(ExportError, match="was created by someone else during the export") as e:
        export(ckpt, out, FAST)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"] and _leftovers(tmp_path, "exp") == []


def test_forced_out_replaced_by_user_files_during_export_is_kept(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    export(ckpt, out, FAST)
    real_write = export_mod._write

    def write_then_user_replaces_out(*args):
        result = real_write(*args)
        shutil.rmtree(out)
        out.mkdir()
        (out / "theirs.txt").write_text("x")
        return result

    monkeypatch.setattr(export_mod, "_write", write_then_user_replaces_out)
    with pytest.raises(ExportError, match="was created by someone else"):
        export(ckpt, out, FORCE)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"] and _leftovers(tmp_path, "exp") == []


def test_second_export_to_same_out_fails_while_first_runs(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    real_write = export_mod._write
    inner = {}

    def write_and_start_another(*args):
        try:
            export(ckpt, out, FORCE)
        except ExportError as e:
            inner["error"] = str(e)
        return real_write(*args)

    monkeypatch.setattr(export_mod, "_write", write_and_start_another)
    export(ckpt, out, FAST)
    assert "another dgport export is writing this folder now" in inner["error"]
    assert is_export(out) and _leftovers(tmp_path, "exp") == []


def test_two_processes_export_to_one_new_out(ckpt, tmp_path):
    """Real concurrency: exactly one succeeds; the other ends with one error line, nothing left."""
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "dgport.cli", "export", str(ckpt), str(out), "--no-validate"]
    env = {**os.environ, "COLUMNS": "200"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    err = next(err for code, err in results if code == 1)
    assert len([line for line in err.splitlines() if line.startswith("dgport: error:")]) == 1
    assert "Traceback" not in err
    assert is_export(out) and _leftovers(tmp_path, "exp") == []


# --------------------------------------------------------------------------- killed exports

def test_lock_file_of_a_killed_export_is_reused_and_a_foreign_one_kept(ckpt, tmp_path):
    (tmp_path / ".exp.lock").write_bytes(b"dgport export lock\n99999999\n")  # SIGKILL leaves it; the flock went
    export(ckpt, tmp_path / "exp", FAST)
    assert is_export(tmp_path / "exp") and _leftovers(tmp_path, "exp") == []
    (tmp_path / ".other.lock").write_text("the user's own file")
    with pytest.raises(ExportError, match=r"\.other\.lock: exists and was not written by dgport"):
        export(ckpt, tmp_path / "other", FAST)
    assert (tmp_path / ".other.lock").read_text() == "the user's own file" and not (tmp_path / "other").exists()


def test_stale_partials_of_dead_exports_are_removed(ckpt, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / ".exp.partial-99999999"
        live = tmp_path / f".exp.partial-{sleeper.pid}"
        others = [tmp_path / ".exp.partial-9x", tmp_path / ".other.partial-99999999", tmp_path / ".exp.partial-"]
        for d in [dead, live, *others]:
            d.mkdir()
            (d / "graph.onnx").write_bytes(b"x" * 100)
        export(ckpt, tmp_path / "exp", FAST)
        assert not dead.exists()
        assert live.exists() and all(d.exists() for d in others)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_interrupted_force_replacement_is_restored_or_removed(ckpt, tmp_path):
    out = tmp_path / "exp"
    export(ckpt, tmp_path / "earlier", FAST)
    before = _snapshot(tmp_path / "earlier")
    # killed between moving the earlier export aside and moving the new one in: OUT is missing
    (tmp_path / "earlier").rename(tmp_path / ".exp.old-99999999")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export(ckpt, out, FAST)
    assert _snapshot(out) == before and _leftovers(tmp_path, "exp") == []
    # killed after the new one was in place: the earlier export's copy is removed
    shutil.copytree(out, tmp_path / ".exp.old-99999999")
    export(ckpt, out, FORCE)
    assert is_export(out) and _leftovers(tmp_path, "exp") == []


def test_sigterm_removes_the_partial_folder(ckpt, tmp_path):
    out = tmp_path / "exp"
    script = textwrap.dedent(f"""
        import sys, time
        import dgport.exporters.export as E
        from dgport.cli import main
        real = E._write
        def slow(*args):
            result = real(*args)
            print("written", flush=True)
            time.sleep(60)
            return result
        E._write = slow
        sys.exit(main(["export", {str(ckpt)!r}, {str(out)!r}, "--no-validate"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
        partial = tmp_path / f".exp.partial-{proc.pid}"
        assert (partial / MANIFEST).exists()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    err = proc.stderr.read()
    assert code == 130 and "Traceback" not in err, err  # the CLI's Ctrl-C exit
    assert not out.exists() and _leftovers(tmp_path, "exp") == []


def test_sigterm_handler_is_restored(ckpt, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    export(ckpt, tmp_path / "exp", FAST)
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------- never unpickle

def _different_bin(folder: Path) -> None:
    """A pytorch_model.bin (pickle) with the same names and shapes but other random weights."""
    import torch
    from safetensors.torch import load_file

    sd = {}
    for f in folder.glob("*.safetensors"):
        sd.update(load_file(f))
    torch.manual_seed(1)
    torch.save({k: torch.randn(v.shape).to(v.dtype) for k, v in sd.items()}, folder / "pytorch_model.bin")


@pytest.fixture()
def no_unpickling(monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called: a pickle was read")

    monkeypatch.setattr(torch, "load", refuse)


def _safetensors_embed(folder: Path):
    from safetensors.numpy import load_file

    for f in sorted(folder.glob("*.safetensors")):
        t = load_file(f)
        if EMBED in t:
            return t[EMBED]
    raise AssertionError("no embedding")


def test_torch_backend_and_validation_read_safetensors_beside_a_bin(ckpt, tmp_path, no_unpickling):
    import numpy as np

    from dgport.runtimes.torch_ref import TorchRefBackend

    _different_bin(ckpt)
    ref = TorchRefBackend(ckpt)
    np.testing.assert_array_equal(ref.model.state_dict()[EMBED].numpy(), _safetensors_embed(ckpt))
    summary = export(ckpt, tmp_path / "exp", ExportOptions())  # validated against the safetensors weights
    assert summary.validation


def test_sharded_safetensors_are_read_beside_a_bin(ckpt, no_unpickling):
    import numpy as np

    from dgport.runtimes.torch_ref import TorchRefBackend

    weights = ckpt / "model.safetensors"
    names = json.loads(weights.read_bytes()[8:8 + int.from_bytes(weights.read_bytes()[:8], "little")])
    shard = "model-00001-of-00001.safetensors"
    weights.rename(ckpt / shard)
    index = {"metadata": {}, "weight_map": {n: shard for n in names if n != "__metadata__"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    _different_bin(ckpt)
    ref = TorchRefBackend(ckpt)
    np.testing.assert_array_equal(ref.model.state_dict()[EMBED].numpy(), _safetensors_embed(ckpt))
    np.testing.assert_array_equal(read_checkpoint(ckpt).tensor(EMBED), _safetensors_embed(ckpt))


def test_safetensors_transformers_cannot_find_is_refused_not_unpickled(ckpt, tmp_path, no_unpickling):
    (ckpt / "model.safetensors").rename(ckpt / "weights.safetensors")
    _different_bin(ckpt)
    from dgport.runtimes.torch_ref import TorchRefBackend

    with pytest.raises(CheckpointError, match="reads only model.safetensors") as e:
        TorchRefBackend(ckpt)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="reads only model.safetensors"):
        export(ckpt, tmp_path / "exp", ExportOptions())
    assert not (tmp_path / "exp").exists() and _leftovers(tmp_path, "exp") == []
    export(ckpt, tmp_path / "exp", FAST)  # dgport itself reads weights.safetensors


def test_only_a_bin_is_refused(ckpt, tmp_path, no_unpickling):
    from dgport.runtimes.torch_ref import TorchRefBackend

    _different_bin(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="only pickle weights.*never unpickles") as e:
        TorchRefBackend(ckpt)
    assert "\n" not in str(e.value)
    code, errors = _cli("export", ckpt, tmp_path / "exp")
    assert code == 1 and len(errors) == 1 and "never unpickles" in errors[0]


def test_stray_safetensors_beside_model_safetensors_are_ignored(ckpt):
    """dgport reads the file transformers reads, not whichever *.safetensors sorts last."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    t = load_file(ckpt / "model.safetensors")
    save_file({EMBED: np.ones_like(t[EMBED])}, ckpt / "zz-extra.safetensors")
    np.testing.assert_array_equal(read_checkpoint(ckpt).tensor(EMBED), t[EMBED])


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/x.safetensors", "pytorch_model.bin"])
def test_index_naming_files_outside_or_pickles_is_refused(ckpt, shard):
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
    index = {"weight_map": {EMBED: "model-00001-of-00001.safetensors", "x": shard}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="is not a .safetensors file in the checkpoint folder"):
        read_checkpoint(ckpt)
