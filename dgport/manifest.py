"""The export manifest `dgport.json`: what an export folder holds, and the checks `run` makes
before trusting it (format version, every artifact present with its size and sha256)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .config import GenerationDefaults, TextConfig
from .errors import ExportError

MANIFEST = "dgport.json"
FORMAT_VERSION = 2  # 2: per-graph expert form and weights_as_inputs; cpu_graphs whenever the CPU runs other graphs
BACKEND_FORMAT = {"cpu": "onnx", "cuda": "onnx", "mlx": "mlx"}


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
                   tokenizer_files: list[str], formats: dict[str, dict]) -> dict:
    """Write dgport.json. Each format entry lists its `files` (relative paths); their sizes and
    checksums are recorded under `artifacts` with the tokenizer files'."""
    files = list(tokenizer_files) + [f for entry in formats.values() for f in entry["files"]]
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
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


@dataclass
class Export:
    path: Path
    manifest: dict

    @property
    def config(self) -> TextConfig:
        return TextConfig.from_dict(self.manifest["config"])

    @property
    def generation(self) -> GenerationDefaults:
        return GenerationDefaults.from_dict(self.manifest["generation"])

    @property
    def formats(self) -> list[str]:
        return list(self.manifest["formats"])

    def format(self, name: str) -> dict:
        return self.manifest["formats"][name]

    def file(self, rel: str) -> Path:
        return self.path / rel

    def verify(self, checksums: bool = True, use_cache: bool = True) -> None:
        """Every artifact present with its recorded size (and sha256 when `checksums`; with
        `use_cache`, files hashed before and unchanged since are trusted)."""
        for rel, meta in self.manifest["artifacts"].items():
            p = self.path / rel
            if not p.exists():
                raise ExportError(f"{p}: missing; the export is partial. Export again with `dgport export`")
            if p.stat().st_size != meta["size"]:
                raise ExportError(f"{p}: size {p.stat().st_size} != {meta['size']} recorded in {MANIFEST}; "
                                  "the file is truncated or was changed. Export again")
            if checksums and not (use_cache and _verified_before(p, meta["sha256"])):
                if sha256_file(p) != meta["sha256"]:
                    raise ExportError(f"{p}: sha256 does not match {MANIFEST}; the file was changed or "
                                      "corrupted. Export again")
                _remember_verified(p, meta["sha256"])


def _stamp_path(path: Path, sha: str) -> Path:
    from .default_model import cache_dir  # late: default_model imports this module

    cache = cache_dir() / "verified"
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{sha}".encode()).hexdigest()
    return cache / key


def _verified_before(path: Path, sha: str) -> bool:
    """Checksums of multi-GB weights cost seconds: a file is hashed once, then trusted while its
    path, size, mtime and inode stay the same."""
    return _stamp_path(path, sha).exists()


def _remember_verified(path: Path, sha: str) -> None:
    try:
        stamp = _stamp_path(path, sha)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    except OSError:
        pass  # an unwritable cache only means hashing again next time


def read_manifest(path) -> Export:
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such folder; create it with `dgport export CHECKPOINT {path}`")
    if not path.is_dir():
        raise ExportError(f"{path}: not a folder; give the folder `dgport export` wrote")
    mpath = path / MANIFEST
    if not mpath.exists():
        hint = " (it looks like a Hugging Face checkpoint: export it first, or use --backend torch)" \
            if (path / "config.json").exists() else ""
        raise ExportError(f"{path}: not a dgport export, no {MANIFEST}{hint}; run `dgport export SRC {path}`")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{mpath}: not valid JSON ({e.msg}); export again") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(f"{mpath}: export format version {version}, this dgport reads version {FORMAT_VERSION}; "
                          "export again with this dgport")
    return Export(path, manifest)


def open_export(path, backend: str | None = None, checksums: bool = True) -> Export:
    """Open and verify an export; with `backend`, also require the format that backend runs."""
    export = read_manifest(path)
    if backend is not None:
        fmt = BACKEND_FORMAT[backend]
        if fmt not in export.formats:
            raise ExportError(
                f"{export.path}: has no {fmt} weights (it holds: {', '.join(export.formats) or 'none'}), which "
                f"--backend {backend} needs; export with `dgport export SRC OUT --format {fmt}`")
    export.verify(checksums=checksums)
    return export
