"""The embedded default model: the Sudoku DiffusionGemma shipped in models/sudoku, exported on
first use into dgport's cache folder (one export per shipped-files digest and format), and exported
again when that cached copy is found damaged."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .errors import DgportError
from .manifest import BACKEND_FORMAT, FORMAT_VERSION, MANIFEST

# What an export is made from: a change to any of them must not reuse an older cached export.
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json")
EXTRA_FOR = {"onnx": "cpu", "mlx": "mlx"}


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
    h = hashlib.sha256()
    for name in SHIPPED_FILES:
        p = folder / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.exists() else b"") + b"\0")
    return h.hexdigest()[:12]


def default_export_path(backend: str) -> Path:
    fmt = BACKEND_FORMAT[backend]
    return cache_dir() / "exports" / f"sudoku-{_shipped_digest(default_checkpoint())}-{fmt}-v{FORMAT_VERSION}"


def _usable(out: Path, backend: str) -> str | None:
    """None when the cached export opens and verifies; otherwise what is wrong with it."""
    from .manifest import open_export

    if not (out / MANIFEST).exists():
        return "missing"
    try:
        open_export(out, backend)
    except (DgportError, KeyError, TypeError, ValueError, AttributeError) as e:  # a damaged manifest too
        return " ".join(str(e).split()) or e.__class__.__name__
    return None


def ensure_default_export(backend: str, console=None) -> Path:
    """The folder of the shipped model for `backend` ('torch': the checkpoint itself), exporting it
    into the cache when it is missing or damaged (dgport wrote that folder, so it may replace it)."""
    if backend == "torch":
        return default_checkpoint()
    out = default_export_path(backend)
    problem = _usable(out, backend)
    if problem is None:
        return out
    from rich.console import Console

    from .exporters.export import ExportOptions, export
    from .progress import RichProgress

    console = console or Console(stderr=True)
    if problem == "missing":
        console.print(f"first run: exporting the shipped Sudoku model to {out} (once; later runs reuse it)",
                      highlight=False, markup=False, soft_wrap=True)
    else:
        console.print(f"the cached export of the shipped Sudoku model is damaged ({problem}); exporting it "
                      f"again to {out}", highlight=False, markup=False, soft_wrap=True)
    fmt = BACKEND_FORMAT[backend]
    damaged = None
    try:
        if out.exists():  # dgport's own cache folder: moved aside, then removed, whatever it holds
            damaged = out.parent / f".{out.name}.damaged-{os.getpid()}"
            out.rename(damaged)
        with RichProgress(console) as progress:
            export(default_checkpoint(), out, ExportOptions(formats=(fmt,), validate=False, force=True), progress)
    except ImportError as e:
        raise DgportError(f"exporting the shipped model to {fmt} needs the {e.name} package, which is not "
                          f"installed: pip install 'dgport[{EXTRA_FOR[fmt]}]'") from e
    except OSError as e:
        raise DgportError(f"cannot write the default export to {out} ({e.strerror or e}); set DGPORT_CACHE_DIR "
                          "(or XDG_CACHE_HOME) to a writable folder, or pass an EXPORT folder") from e
    finally:
        if damaged is not None:
            shutil.rmtree(damaged, ignore_errors=True)
    return out
