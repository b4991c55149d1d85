"""The embedded default model: the Sudoku DiffusionGemma shipped in models/sudoku, exported on
first use into the user's cache folder (one export per checkpoint fingerprint and format)."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import DgportError
from .manifest import BACKEND_FORMAT, FORMAT_VERSION, MANIFEST


def default_checkpoint() -> Path:
    """models/sudoku, installed as the package data of dgport.models.sudoku."""
    from .models import sudoku

    folder = Path(sudoku.__file__).resolve().parent
    if not (folder / "config.json").exists():
        raise DgportError(f"{folder}: the shipped Sudoku model is missing from this installation; "
                          "pass an EXPORT folder")
    return folder


def ensure_default_export(backend: str) -> Path:
    from .exporters.checkpoint import read_checkpoint

    if backend == "torch":
        return default_checkpoint()
    ckpt = read_checkpoint(default_checkpoint())
    fmt = BACKEND_FORMAT[backend]
    cache = Path(os.environ.get("DGPORT_CACHE_DIR", Path.home() / ".cache" / "dgport"))
    out = cache / "exports" / f"sudoku-{ckpt.fingerprint()[:12]}-{fmt}-v{FORMAT_VERSION}"
    if not (out / MANIFEST).exists():
        from .exporters.export import ExportOptions, export
        from .progress import RichProgress

        try:
            with RichProgress() as progress:
                progress.log(f"first run: exporting the shipped Sudoku model to {out}")
                export(ckpt.path, out, ExportOptions(formats=(fmt,), validate=False, force=True), progress)
        except ImportError as e:
            raise DgportError(f"exporting the default model needs the export tools ({e.name} is missing): "
                              "pip install 'dgport[export]'") from e
    return out
