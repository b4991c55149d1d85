"""Untrusted files (issue "Hardening, second pass"): nothing outside the model is read, every file
read into memory has a size cap, a malformed file is one line naming it, disk-full exports leave
nothing behind, and a restored mtime cannot hide an edited file (chat templates: test_template_budget)."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import socket
from pathlib import Path

import numpy as np
import pytest

from dgport.cli import main
from dgport.errors import CheckpointError, DgportError, ExportError
from dgport.exporters.checkpoint import read_checkpoint
from dgport.exporters.export import ExportOptions, export
from dgport.manifest import MANIFEST, open_export
from dgport.tokenizer import ChatTokenizer
from hardening_support import one_line

FAST = ExportOptions(validate=False)
EMBED = "model.decoder.embed_tokens.weight"
DOWN = "model.decoder.layers.0.experts.down_proj"


@contextlib.contextmanager
def deadline(seconds: int = 60):
    """A safety net only (the checks count work): a read that blocks (a FIFO) fails the test."""
    def expired(signum, frame):
        raise AssertionError(f"still running after {seconds} s: blocked or unbounded")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture()
def ckpt(checkpoints, tmp_path):
    return Path(shutil.copytree(checkpoints["tiny"], tmp_path / "ckpt"))


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _cli(*args) -> tuple[int, list[str]]:
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, [line for line in err.getvalue().splitlines() if line.strip()]


# ------------------------------------------------------------------------ 1. only files inside the model

CHECKPOINT_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]


def _add_optional_files(ckpt: Path) -> None:
    from models.fixtures import CHAT_TEMPLATE

    (ckpt / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (ckpt / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<bos>"}))


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_checkpoint_file_linking_outside_is_refused(ckpt, tmp_path, name):
    """A symlink whose target leaves the checkpoint folder is refused before a byte is read, by the
    reader, the exporter and the tokenizer alike; nothing is written."""
    _add_optional_files(ckpt)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(ckpt / name, outside / name)
    (ckpt / name).symlink_to(outside / name)
    with pytest.raises(DgportError) as e:
        export(ckpt, tmp_path / "exp", FAST)
    msg = one_line(e)
    assert str(ckpt / name) in msg and "outside the model folder" in msg, msg
    assert not (tmp_path / "exp").exists() and _leftovers(tmp_path, "exp") == []
    if name.startswith(("tokenizer", "chat_template")):
        with pytest.raises(DgportError, match="outside the model folder"):
            ChatTokenizer(ckpt)


def test_links_inside_the_folder_are_followed(ckpt, tmp_path):
    (ckpt / "real").mkdir()
    shutil.move(ckpt / "config.json", ckpt / "real" / "config.json")
    (ckpt / "config.json").symlink_to("real/config.json")
    assert read_checkpoint(ckpt).config.num_layers == 4


def test_shard_linking_outside_is_refused(ckpt, tmp_path):
    shard = "model-00001-of-00001.safetensors"
    raw = (ckpt / "model.safetensors").read_bytes()
    names = [n for n in json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")]) if n != "__metadata__"]
    (tmp_path / shard).write_bytes(raw)
    (ckpt / "model.safetensors").unlink()
    (ckpt / shard).symlink_to(tmp_path / shard)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    with pytest.raises(CheckpointError, match="outside the model folder") as e:
        read_checkpoint(ckpt)
    assert shard in one_line(e)


@pytest.mark.parametrize("kind", ["fifo", "socket"])
@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors"])
def test_fifo_or_socket_is_refused_without_blocking(ckpt, tmp_path, kind, name):
    (ckpt / name).unlink()
    if kind == "fifo":
        os.mkfifo(ckpt / name)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(ckpt / name))
    with deadline():
        with pytest.raises(DgportError) as e:
            read_checkpoint(ckpt) if name != "tokenizer.json" else ChatTokenizer(ckpt)
    msg = one_line(e)
    assert str(ckpt / name) in msg and "not a regular file" in msg, msg


def test_device_behind_a_link_is_refused(ckpt):
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to("/dev/zero")
    with deadline():
        with pytest.raises(CheckpointError, match="config.json: .*(outside the model folder|not a regular file)"):
            read_checkpoint(ckpt)


@pytest.mark.parametrize("name,size,cap", [
    ("config.json", (1 << 20) + 1, "1 MiB"),
    ("generation_config.json", (1 << 20) + 1, "1 MiB"),
    ("tokenizer_config.json", (16 << 20) + 1, "16 MiB"),
    ("chat_template.jinja", (1 << 20) + 1, "1 MiB"),
    ("tokenizer.json", (64 << 20) + 1, "64 MiB"),
])
def test_oversized_files_are_refused_before_reading(ckpt, name, size, cap):
    """Sparse files: the size (fstat) is refused, nothing is read into memory."""
    with open(ckpt / name, "r+b" if (ckpt / name).exists() else "wb") as f:
        f.truncate(size)
    with pytest.raises(DgportError) as e:
        ChatTokenizer(ckpt) if name.startswith(("tokenizer", "chat")) else read_checkpoint(ckpt)
    msg = one_line(e)
    assert str(ckpt / name) in msg and f"over the {cap} cap" in msg, msg


def test_oversized_manifest_is_refused(checkpoints, tmp_path):
    out = tmp_path / "exp"
    export(checkpoints["tiny"], out, FAST)
    with open(out / MANIFEST, "r+b") as f:
        f.truncate((64 << 20) + 1)
    with pytest.raises(ExportError, match=r"dgport.json: .*over the 64 MiB cap"):
        open_export(out, "cpu")


def _hub_repo(hf_home: Path, src: Path, commit: str = "ab" * 20) -> Path:
    """HF_HOME/hub/models--t--m laid out as huggingface_hub does, snapshot files linked to blobs."""
    import hashlib

    repo = hf_home / "hub" / "models--t--m"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return repo


@pytest.fixture()
def hub_env(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("DGPORT_CACHE_DIR", str(tmp_path / "dgport-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_hub_snapshot_reads_blobs_but_not_links_leaving_the_repo(hub_env, checkpoints):
    from dgport.resolve import resolve_checkpoint

    repo = _hub_repo(hub_env / "hf", checkpoints["tiny"])
    snap = resolve_checkpoint("t/m")
    assert read_checkpoint(snap).config.num_layers == 4  # links into ../../blobs are inside the repo
    outside = hub_env / "elsewhere.json"
    shutil.copy(snap / "config.json", outside)
    (snap / "config.json").unlink()
    (snap / "config.json").symlink_to(outside)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(snap)
    msg = one_line(e)
    assert "outside the model folder" in msg and str(repo) in msg, msg


@pytest.mark.parametrize("ref", ["../../../outside", "../../blobs", "main\n../x", "ab" * 19])
def test_hub_ref_that_is_not_a_commit_hash_is_refused(hub_env, checkpoints, ref):
    """refs/main is text from the cache: used as a path component only when it is a commit hash."""
    from dgport.resolve import resolve_checkpoint

    repo = _hub_repo(hub_env / "hf", checkpoints["tiny"])
    shutil.copytree(checkpoints["tiny"], hub_env / "outside")  # what ../../../outside would reach
    (repo / "refs" / "main").write_text(ref)
    with pytest.raises(DgportError) as e:
        resolve_checkpoint("t/m")
    msg = one_line(e)
    assert str(repo / "refs" / "main") in msg and "not a commit hash" in msg, msg


def test_hub_ref_fifo_does_not_block(hub_env, checkpoints):
    from dgport.resolve import resolve_checkpoint

    repo = _hub_repo(hub_env / "hf", checkpoints["tiny"])
    (repo / "refs" / "main").unlink()
    os.mkfifo(repo / "refs" / "main")
    with deadline():
        with pytest.raises(DgportError, match="refs/main: not a regular file"):
            resolve_checkpoint("t/m")


def test_hub_snapshot_folder_linking_outside_is_refused(hub_env, checkpoints):
    from dgport.resolve import resolve_checkpoint

    repo = _hub_repo(hub_env / "hf", checkpoints["tiny"])
    elsewhere = Path(shutil.copytree(checkpoints["tiny"], hub_env / "elsewhere"))
    snap = repo / "snapshots" / ("ab" * 20)
    shutil.rmtree(snap)
    snap.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(DgportError, match="outside the model folder|outside the Hugging Face cache folder"):
        read_checkpoint(resolve_checkpoint("t/m"))


# ------------------------------------------------------------------------ 3. every bad byte: one line

def _rewrite_header(path: Path, change) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header = change(header) or header
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def _set(name, key, value):
    return lambda h: h[name].__setitem__(key, value)


def _drop(name, key):
    def drop(h):
        del h[name][key]
    return drop


HEADERS = [
    ("not an object", lambda h: [h], "header is not a JSON object"),
    ("entry not an object", lambda h: h.__setitem__(EMBED, [1]), f"tensor {EMBED}: not an object"),
    ("missing dtype", _drop(EMBED, "dtype"), f"tensor {EMBED}: no dtype"),
    ("missing shape", _drop(EMBED, "shape"), f"tensor {EMBED}: no shape"),
    ("missing offsets", _drop(EMBED, "data_offsets"), f"tensor {EMBED}: no data_offsets"),
    ("dtype a list", _set(EMBED, "dtype", ["F32"]), f"tensor {EMBED}: dtype ['F32'] is not one of"),
    ("negative shape", _set(EMBED, "shape", [-512, -64]), f"tensor {EMBED}: shape [-512, -64] is not"),
    ("offsets not ints", _set(EMBED, "data_offsets", [0.0, 131072.0]), f"tensor {EMBED}: data_offsets"),
    ("offsets reversed", _set(EMBED, "data_offsets", [131072, 0]), f"tensor {EMBED}: data_offsets [131072, 0] "
                                                                   "are reversed"),
    ("offsets past the end", _set(EMBED, "data_offsets", [0, 10**12]), f"tensor {EMBED}: runs past the end"),
    ("overlap", _set(DOWN, "data_offsets", [0, 32768]), "overlap"),
    ("span vs shape", _set(EMBED, "shape", [512, 32]), f"tensor {EMBED}: 131072 bytes hold 512x32 F32"),
    ("float weight as int", _set(EMBED, "dtype", "I32"), f"tensor {EMBED} is stored as I32"),
    ("float weight as bool", lambda h: h[EMBED].update(dtype="BOOL", shape=[512, 256]),
     f"tensor {EMBED} is stored as BOOL"),
]


@pytest.mark.parametrize("change,message", [c[1:] for c in HEADERS], ids=[c[0] for c in HEADERS])
def test_malformed_safetensors_header_is_one_line(ckpt, change, message):
    _rewrite_header(ckpt / "model.safetensors", change)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(ckpt)
    msg = one_line(e)
    assert str(ckpt / "model.safetensors") in msg and message in msg, msg


@pytest.mark.parametrize("length,size,message", [
    (10_000_000, None, "header length 10000000 is larger than the file"),
    (100_000_001, 100_000_020, "header length 100000001 is over the 100000000-byte cap"),
])
def test_absurd_safetensors_header_length(ckpt, tmp_path, length, size, message):
    path = ckpt / "model.safetensors"
    with open(path, "r+b") as f:
        f.write(length.to_bytes(8, "little"))
        if size:
            f.truncate(size)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(ckpt)
    assert message in one_line(e) and str(path) in str(e.value)
    code, lines = _cli("export", ckpt, tmp_path / "exp", "--no-validate")
    assert code == 1 and len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("content,message", [
    (b'{"a": "\xff\xfe"}', "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_bad_json_bytes_are_one_line(ckpt, name, content, message):
    (ckpt / name).write_bytes(content)
    with pytest.raises(DgportError) as e:
        ChatTokenizer(ckpt) if name.startswith("tokenizer") else read_checkpoint(ckpt)
    msg = one_line(e)
    assert str(ckpt / name) in msg and message in msg, msg


def _poke(path: Path, name: str, index: int, value: float) -> None:
    """Set element `index` (flat) of float32 tensor `name` in a safetensors file, in place."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    start = json.loads(raw[8:8 + n])[name]["data_offsets"][0]
    with open(path, "r+b") as f:
        f.seek(8 + n + start + 4 * index)
        f.write(np.float32(value).tobytes())


@pytest.mark.parametrize("fmt,value", [("onnx", math.nan), ("onnx", -math.inf), ("mlx", math.nan)])
def test_non_finite_weight_is_refused_at_export(ckpt, tmp_path, fmt, value):
    if fmt == "mlx":
        pytest.importorskip("mlx.core")
    _poke(ckpt / "model.safetensors", DOWN, 77, value)
    with pytest.raises(CheckpointError) as e:
        export(ckpt, tmp_path / "exp", ExportOptions(formats=(fmt,), validate=False))
    msg = one_line(e)
    assert DOWN in msg and "NaN or infinite" in msg and "model.safetensors" in msg, msg
    assert not (tmp_path / "exp").exists() and _leftovers(tmp_path, "exp") == []


@pytest.mark.parametrize("fmt", ["onnx", "mlx"])
def test_infinite_quantization_scale_is_refused(ckpt, tmp_path, fmt):
    """Finite weights whose group range overflows float32 would be stored with an infinite scale."""
    if fmt == "mlx":
        pytest.importorskip("mlx.core")
    name = "model.decoder.layers.0.self_attn.o_proj.weight"
    _poke(ckpt / "model.safetensors", name, 0, 3e38)
    _poke(ckpt / "model.safetensors", name, 1, -3e38)
    with pytest.raises(ExportError) as e, np.errstate(all="ignore"):
        export(ckpt, tmp_path / "exp", ExportOptions(formats=(fmt,), quantize=8, group_size=32, validate=False))
    msg = one_line(e)
    assert "tensor layers.0." in msg and "scale" in msg and "not finite" in msg, msg
    assert not (tmp_path / "exp").exists() and _leftovers(tmp_path, "exp") == []


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _patch_writes(monkeypatch, target: str) -> str:
    """Make one writer fail as a full disk does; returns the file name the error must name."""
    if target == "weights.bin":
        from dgport.exporters.onnx_builder import WeightStore
        monkeypatch.setattr(WeightStore, "_write", _enospc)
    elif target == "encoder.onnx":
        import onnx
        monkeypatch.setattr(onnx, "save", _enospc)
    elif target == "mlx/globals.safetensors":
        mx = pytest.importorskip("mlx.core")
        monkeypatch.setattr(mx, "save_safetensors", _enospc)
    else:  # dgport.json, tokenizer.json: written with Path.write_text / write_bytes
        for method in ("write_text", "write_bytes"):
            real = getattr(Path, method)
            monkeypatch.setattr(Path, method, lambda self, *a, _real=real, **k:
                                _enospc() if self.name == target else _real(self, *a, **k))
    return target


@pytest.mark.parametrize("target", ["weights.bin", "encoder.onnx", MANIFEST, "tokenizer.json",
                                    "mlx/globals.safetensors"])
@pytest.mark.parametrize("force", [False, True])
def test_disk_full_names_the_file_and_leaves_nothing(ckpt, tmp_path, monkeypatch, target, force):
    out = tmp_path / "exp"
    fmt = "mlx" if target.startswith("mlx/") else "onnx"
    opts = ExportOptions(formats=(fmt,), validate=False, force=force)
    before = None
    if force:
        export(ckpt, out, FAST)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    name = _patch_writes(monkeypatch, target)
    with pytest.raises(ExportError) as e:
        export(ckpt, out, opts)
    msg = one_line(e)
    assert name in msg and "No space left on device" in msg and "nothing was left" in msg, msg
    assert _leftovers(tmp_path, "exp") == []
    if force:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export is intact
    else:
        assert not out.exists()


def test_mlx_short_write_is_caught(ckpt, tmp_path, monkeypatch):
    """MLX reports nothing when a write fails (a full disk leaves a short file): checked after writing."""
    mx = pytest.importorskip("mlx.core")
    real = mx.save_safetensors

    def short(path, arrays, metadata=None):
        real(path, arrays, metadata=metadata)
        if path.endswith("layer-001.safetensors"):
            os.truncate(path, os.path.getsize(path) // 2)

    monkeypatch.setattr(mx, "save_safetensors", short)
    with pytest.raises(ExportError) as e:
        export(ckpt, tmp_path / "exp", ExportOptions(formats=("mlx",), validate=False))
    msg = one_line(e)
    assert "mlx/layer-001.safetensors: could not be written" in msg and "incomplete" in msg, msg
    assert not (tmp_path / "exp").exists() and _leftovers(tmp_path, "exp") == []


# ------------------------------------------------------------------------ 5. verified-before stamps

def test_edit_with_restored_mtime_is_detected(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("DGPORT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "exp"
    export(checkpoints["tiny"], out, FAST)
    open_export(out, "cpu")  # hashed once, stamped
    open_export(out, "cpu")  # trusted from the stamp
    victim = out / "weights.bin"
    st = os.stat(victim)
    with open(victim, "r+b") as f:  # same size, same inode, other bytes
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # `touch -d` puts the mtime back
    assert os.stat(victim).st_mtime_ns == st.st_mtime_ns and os.stat(victim).st_ino == st.st_ino
    with pytest.raises(ExportError, match="weights.bin: sha256 does not match"):
        open_export(out, "cpu")
