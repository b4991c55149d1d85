"""The export manifest `dgport.json`: what an export folder holds, and the checks `run` makes
before trusting it.

The manifest is untrusted input. `read_manifest` checks it against the schema (manifest_schema.py: types, ranges,
required keys; one line naming the key path), checks that it was not edited since `dgport export`
wrote it (`manifest_sha256`, a digest of everything else in it: an edited canvas length, window or
weight offset would otherwise run silently wrong), and that every artifact is a relative path to a
regular file inside the export. `verify` then checks each artifact's size and sha256. Every file the
runtime reads (graphs, weights, tokenizer, chat template) is an artifact; the generation defaults
live in the manifest itself."""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, safe_files
from . import schema as S
from .config import GenerationDefaults, TextConfig
from .errors import ExportError
from .manifest_schema import (FORMAT_VERSION, MANIFEST, TOKENIZER_READS, _check_top,  # noqa: F401
                              manifest_digest, validate_manifest)
from .vision_config import VisionInfo

# dgport's cache of exports is keyed by this too: raised when the graphs gain something a cached export
# of the same format version lacks, so it is exported again (r1: the vocabulary-constraint inputs)
CACHE_REVISION = "r3"  # r2: the vision graph and the encoders' image_embeds input; r3: the CPU's unrolled experts
BACKEND_FORMAT = {"cpu": "onnx", "cuda": "onnx", "mlx": "mlx"}
MAX_MANIFEST_BYTES = safe_files.CAPS[MANIFEST]  # 64 MiB; a real export's manifest is ~1 MB (an entry per tensor)



def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def artifact_entries(folder: Path, files) -> dict[str, dict]:
    """{relative path: {size, sha256}} for files inside `folder`."""
    return {rel: {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)} for rel in files}


def write_manifest(folder: Path, *, source: dict, config: TextConfig, generation: GenerationDefaults,
                   tokenizer_files: list[str], formats: dict[str, dict], vision=None) -> dict:
    """Write dgport.json. Each format entry lists its `files` (relative paths); their sizes and
    checksums are recorded under `artifacts` with the tokenizer files'. `vision` (a VisionInfo): the
    export takes images (every format wrote its vision weights)."""
    files = list(dict.fromkeys(list(tokenizer_files) + [f for entry in formats.values() for f in entry["files"]]))
    manifest = {
        "format_version": FORMAT_VERSION,
        "dgport_version": __version__,
        "source": source,
        "config": config.to_dict(),
        "generation": generation.to_dict(),
        "tokenizer_files": list(tokenizer_files),
        "formats": formats,
        "artifacts": artifact_entries(folder, files),
    }
    if vision is not None:
        manifest["vision"] = vision.to_dict()
    manifest = json.loads(json.dumps(manifest))  # the digest is over what a reader will parse
    manifest["manifest_sha256"] = manifest_digest(manifest)
    validate_manifest(manifest)  # a writer bug is caught here, not by the first `run`
    with safe_files.writing(folder / MANIFEST):
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


# ----------------------------------------------------------------------------------------- export

@dataclass
class Export:
    path: Path
    manifest: dict
    _config: TextConfig | None = field(default=None, repr=False)
    _generation: GenerationDefaults | None = field(default=None, repr=False)

    @property
    def config(self) -> TextConfig:
        if self._config is None:
            self._config = TextConfig.from_dict(self.manifest["config"])
        return self._config

    @property
    def generation(self) -> GenerationDefaults:
        if self._generation is None:
            self._generation = GenerationDefaults.from_dict(self.manifest["generation"])
        return self._generation

    @property
    def vision(self) -> VisionInfo | None:
        """The vision tower and image settings (None: the export takes no images)."""
        v = self.manifest.get("vision")
        return None if v is None else VisionInfo.from_dict(v, self.config.vocab_size)

    @property
    def formats(self) -> list[str]:
        return list(self.manifest["formats"])

    @property
    def tokenizer_files(self) -> list[str]:
        return list(self.manifest["tokenizer_files"])

    def format(self, name: str) -> dict:
        return self.manifest["formats"][name]

    def file(self, rel: str) -> Path:
        return self.path / rel

    def check_paths(self) -> None:
        """Every artifact a regular file inside the export (no symlink, device or folder), and no
        file the tokenizer would read left unlisted (an added chat_template.jinja)."""
        root = self.path.resolve()
        for rel in self.manifest["artifacts"]:
            p = self.path / rel
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                raise ExportError(f"{p}: missing; the export is partial. Export again with `dgport export`") from None
            except OSError as e:
                raise ExportError(f"{p}: cannot read it ({e.strerror}); export again") from None
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
                kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                raise ExportError(f"{p}: {kind}; every file of an export must be a regular file inside it. "
                                  "Export again")
            try:
                p.resolve().relative_to(root)
            except ValueError:
                raise ExportError(f"{p}: lies outside the export folder {self.path} (through a linked folder); "
                                  "export again") from None
        for name in TOKENIZER_READS:
            if name not in self.manifest["tokenizer_files"] and os.path.lexists(self.path / name):
                raise ExportError(f"{self.path / name}: not listed in {MANIFEST}, so not checked; a file was added "
                                  "to the export. Remove it or export again")

    def verify(self, checksums: bool = True, use_cache: bool = True) -> None:
        """Every artifact present with its recorded size (and sha256 when `checksums`; with
        `use_cache`, files hashed before and unchanged since are trusted)."""
        self.check_paths()
        root = Path(os.path.realpath(self.path))
        for rel, meta in self.manifest["artifacts"].items():
            p = self.path / rel
            st = safe_files.check(p, root, ExportError, "export again")
            if st.st_size != meta["size"]:
                raise ExportError(f"{p}: size {st.st_size} != {meta['size']} recorded in {MANIFEST}; "
                                  "the file is truncated or was changed. Export again")
            if checksums and not (use_cache and _verified_before(p, st, meta["sha256"])):
                digest, hashed = safe_files.sha256(p, root, ExportError, "export again")
                if digest != meta["sha256"]:
                    raise ExportError(f"{p}: sha256 does not match {MANIFEST}; the file was changed or "
                                      "corrupted. Export again")
                if hashed is not None:  # unchanged while it was read: that version is the one verified
                    _remember_verified(p, hashed, meta["sha256"])


def _stamp_path(path: Path, st: os.stat_result, sha: str) -> Path:
    """The stamp of one verified version of a file. st_ctime_ns is in the key because a user can set
    a file's mtime back after editing it (`touch -d`, os.utime) but not its ctime: any write, and
    setting the mtime itself, moves the ctime to now."""
    from .default_model import cache_dir  # late: default_model imports this module

    key = f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{sha}"
    return cache_dir() / "verified" / hashlib.sha256(key.encode()).hexdigest()


def _verified_before(path: Path, st: os.stat_result, sha: str) -> bool:
    """Checksums of multi-GB weights cost seconds: a file is hashed once, then trusted while its
    path, device, inode, size, mtime and ctime stay the same."""
    return _stamp_path(path, st, sha).exists()


def _remember_verified(path: Path, st: os.stat_result, sha: str) -> None:
    try:
        stamp = _stamp_path(path, st, sha)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    except OSError:
        pass  # an unwritable cache only means hashing again next time


def _load(path) -> tuple[Path, dict]:
    """The folder and its parsed manifest, top level checked (version, formats map)."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such folder; create it with `dgport export CHECKPOINT {path}`")
    if not path.is_dir():
        raise ExportError(f"{path}: not a folder; give the folder `dgport export` wrote")
    mpath = path / MANIFEST
    if not os.path.lexists(mpath):
        if (path / "config.json").exists():
            raise ExportError(f"{path}: not a dgport export, no {MANIFEST} (it looks like a Hugging Face checkpoint): "
                              f"export it with `dgport export {path} OUT` and use OUT, or use --backend torch")
        raise ExportError(f"{path}: not a dgport export, no {MANIFEST}; give a folder written by "
                          "`dgport export CHECKPOINT OUT`")
    if not stat.S_ISREG(os.lstat(mpath).st_mode):
        raise ExportError(f"{mpath}: not a regular file; export again")
    data = safe_files.read_bytes(mpath, Path(os.path.realpath(path)), ExportError, "export again",
                                 cap=MAX_MANIFEST_BYTES)
    manifest = safe_files.parse_json(data, mpath, ExportError, "export again", constants=False)
    _checked(mpath, _check_top, manifest)
    return path, manifest


def _checked(mpath: Path, fn, *args):
    try:
        return fn(*args)
    except S.SchemaError as e:
        raise ExportError(f"{mpath}: {e}; export again") from None
    except ExportError as e:
        raise ExportError(f"{mpath}: {e}") from None


def _validated(path: Path, manifest: dict) -> Export:
    config, generation = _checked(path / MANIFEST, validate_manifest, manifest)
    return Export(path, manifest, config, generation)


def read_manifest(path) -> Export:
    """Open an export's manifest, schema-checked (the files themselves are checked by `verify`)."""
    return _validated(*_load(path))


def open_export(path, backend: str | None = None, checksums: bool = True) -> Export:
    """Open and verify an export; with `backend`, also require the format that backend runs."""
    path, manifest = _load(path)
    if backend is not None:
        fmt = BACKEND_FORMAT[backend]
        if fmt not in manifest["formats"]:
            raise ExportError(
                f"{path}: has no {fmt} weights (it holds: {', '.join(manifest['formats']) or 'none'}), which "
                f"--backend {backend} needs; export with `dgport export CHECKPOINT OUT --format {fmt}`")
    export = _validated(path, manifest)
    export.verify(checksums=checksums)
    return export
