"""The embedded default model: the Sudoku DiffusionGemma shipped in models/sudoku, exported on
first use into dgport's cache folder (one export per shipped-files digest and format), and exported
again when that cached copy is found damaged."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import DgportError
from .manifest import BACKEND_FORMAT, CACHE_REVISION, FORMAT_VERSION

# What an export is made from: a change to any of them must not reuse an older cached export.
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json")


def cache_dir() -> Path:
    """dgport's cache folder: $DGPORT_CACHE_DIR, else $XDG_CACHE_HOME/dgport, else ~/.cache/dgport
    (the XDG base-directory rule: a relative XDG_CACHE_HOME is ignored)."""
    own = os.environ.get("DGPORT_CACHE_DIR")
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "dgport"
    return Path.home() / ".cache" / "dgport"


def default_checkpoint() -> Path:
    """models/sudoku, installed as the package data of dgport.models.sudoku."""
    from .models import sudoku

    folder = Path(sudoku.__file__).resolve().parent
    if not (folder / "config.json").exists():
        raise DgportError(f"{folder}: the shipped Sudoku model is missing from this installation; "
                          "pass an EXPORT folder")
    return folder


def _shipped_digest(folder: Path) -> str:
    from . import safe_files

    h = hashlib.sha256()
    root = safe_files.model_root(folder)
    for name in SHIPPED_FILES:
        p = folder / name
        h.update(name.encode() + b"\0")
        if os.path.lexists(p):
            safe_files.hash_into(h, p, root, DgportError, "reinstall dgport")
        h.update(b"\0")
    return h.hexdigest()[:12]


def default_export_path(backend: str) -> Path:
    fmt = BACKEND_FORMAT[backend]
    return cache_dir() / "exports" / f"sudoku-{_shipped_digest(default_checkpoint())}-{fmt}-v{FORMAT_VERSION}{CACHE_REVISION}"


def ensure_default_export(backend: str, console=None) -> Path:
    """The folder of the shipped model for `backend` ('torch': the checkpoint itself), exported into
    the cache when it is missing or damaged (dgport wrote that folder, so it may replace it)."""
    from .cache_export import ensure_cached_export

    if backend == "torch":
        return default_checkpoint()
    return ensure_cached_export(default_checkpoint(), default_export_path(backend), backend,
                                what="the shipped Sudoku model", console=console)
