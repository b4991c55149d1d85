"""Exports dgport writes into its own cache folder (the shipped model, and checkpoints given where an
export is wanted): made once, reused while they verify, made again when found damaged. Processes
that need the same one at once take turns: one exports while the others wait, then reuse it."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from .errors import DgportError
from .manifest import BACKEND_FORMAT, MANIFEST

EXTRA_FOR = {"onnx": "cpu", "mlx": "mlx"}  # the extra that brings what exporting a format needs


def cached_export_problem(out: Path, backend: str) -> str | None:
    """None when the cached export opens and verifies for `backend`; otherwise what is wrong."""
    from .manifest import open_export

    if not (out / MANIFEST).exists():
        return "missing"
    try:
        open_export(out, backend)
    except (DgportError, KeyError, TypeError, ValueError, AttributeError) as e:  # a damaged manifest too
        return " ".join(str(e).split()) or e.__class__.__name__
    return None


@contextlib.contextmanager
def _turn(out: Path, console):
    """An exclusive lock on `.NAME.cache-lock` beside the cached export, waited for (another dgport
    process is exporting the same model); released when the process ends, however it ends."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the export's own lock still refuses a second writer
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.parent / f".{out.name}.cache-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"waiting for another dgport process that is exporting {out}", highlight=False,
                          markup=False, soft_wrap=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_cached_export(checkpoint: Path, out: Path, backend: str, *, what: str, dtype: str = "fp32",
                         quantize: int | None = None, console=None) -> Path:
    """`out` (in dgport's cache) holding `checkpoint` exported for `backend`, exporting it when it is
    missing or damaged. `what` names the model in the messages."""
    if cached_export_problem(out, backend) is None:
        return out
    from rich.console import Console

    from .exporters.export import ExportOptions, export
    from .progress import RichProgress

    console = console or Console(stderr=True)
    fmt = BACKEND_FORMAT[backend]
    try:
        with _turn(out, console):
            problem = cached_export_problem(out, backend)
            if problem is None:  # another process made it while this one waited
                return out
            if problem == "missing":
                console.print(f"first run: exporting {what} ({fmt}, {dtype}) to {out} (once; later runs reuse it)",
                              highlight=False, markup=False, soft_wrap=True)
            else:
                console.print(f"the cached export of {what} is damaged ({problem}); exporting it again to {out}",
                              highlight=False, markup=False, soft_wrap=True)
            damaged = None
            try:
                if out.exists():  # dgport's own cache folder: moved aside, then removed, whatever it holds
                    damaged = out.parent / f".{out.name}.damaged-{os.getpid()}"
                    out.rename(damaged)
                with RichProgress(console) as progress:
                    export(checkpoint, out, ExportOptions(formats=(fmt,), dtype=dtype, quantize=quantize,
                                                          validate=False), progress)
            finally:
                if damaged is not None:
                    shutil.rmtree(damaged, ignore_errors=True)
    except ImportError as e:
        raise DgportError(f"exporting {what} to {fmt} needs the {e.name} package, which is not installed: "
                          f"pip install 'dgport[{EXTRA_FOR[fmt]}]' (or give a folder written by `dgport export`)") from e
    except OSError as e:
        raise DgportError(f"cannot write the export to {out} ({e.strerror or e}); set DGPORT_CACHE_DIR (or "
                          "XDG_CACHE_HOME) to a writable folder, or export it yourself with `dgport export`") from e
    return out
