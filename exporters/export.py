"""`dgport export`: one checkpoint to one export folder holding one or more formats.

The folder is written under a temporary name beside OUT and renamed into place only when every
format is written, the manifest records every file's size and sha256, and (when torch is
importable) the graphs have been validated against the source model.

Nothing the user did not have dgport write is ever deleted: OUT may not be, hold or lie inside the
checkpoint; `--force` replaces only an earlier export; one export at a time writes a given OUT (a
lock file beside it), and the final rename fails rather than replace a folder that appeared
meanwhile. Partial folders of exports that were killed are removed by the next export to that OUT.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import shutil
import signal
import stat
import threading
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from dgport import safe_files
from dgport.errors import CheckpointError, DgportError, ExportError
from dgport.manifest import MANIFEST, write_manifest
from dgport.manifest_schema import MOE_FORMS
from dgport.progress import Progress

from .checkpoint import read_checkpoint
from .validation import validate_export

try:
    import fcntl
except ImportError:  # Windows: no lock; the final rename still refuses an existing OUT
    fcntl = None

FORMAT_MODULES = {"onnx": "dgport.exporters.onnx_export", "mlx": "dgport.exporters.mlx_export"}
DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class ExportOptions:
    formats: tuple[str, ...] = ("onnx",)
    dtype: str = "fp32"
    quantize: int | None = None
    group_size: int | None = None  # None: 64, or 32 where 64 does not divide (quantize.choose_group)
    with_logits: bool = False
    # ONNX experts per graph: "sparse" (a Loop over experts), "unrolled" (that loop written out, each
    # expert's weights read in place), "dense" (all experts) or "grouped" (one batched product per
    # projection over [experts, capacity, width]: exporters/onnx_grouped.py); "auto": each device its
    # faster form, a CPU twin where they differ (onnx_export.moe_forms)
    encoder_moe: str = "auto"
    denoise_moe: str = "auto"
    attention: str = "explicit"  # ONNX: "explicit" (MatMul/Softmax/MatMul) or "fused" (ONNX Attention, opset 23)
    force: bool = False
    validate: bool = True
    text_only: bool = False  # leave a checkpoint's vision tower out (no images at run time)


@dataclass
class ExportSummary:
    out: Path
    files: dict[str, int]  # relative path -> bytes
    seconds: float
    validation: dict[str, dict] = field(default_factory=dict)  # format -> {metric: max rel err}


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in formats if f not in FORMAT_MODULES]
    if not formats or bad:
        raise DgportError(f"--format {text!r}: choose onnx, mlx or onnx,mlx")
    return formats


def check_options(opts: ExportOptions) -> None:
    if opts.dtype not in DTYPES:
        raise DgportError(f"--dtype {opts.dtype!r}: choose one of {', '.join(DTYPES)}")
    if opts.quantize is not None:
        if opts.quantize not in (4, 8):
            raise DgportError(f"--quantize {opts.quantize}: choose int4 or int8 (4 or 8 bits)")
        if "onnx" in opts.formats and opts.dtype != "fp32":
            raise DgportError(f"--quantize with --dtype {opts.dtype}: quantized ONNX exports keep their unquantized "
                              "tensors in fp32 and compute in fp32 (onnxruntime's CPU EP has no bf16 kernels); "
                              "drop --dtype or pass --dtype fp32")
    forms = ("auto",) + MOE_FORMS
    for flag, form in (("--encoder-moe", opts.encoder_moe), ("--denoise-moe", opts.denoise_moe)):
        if form not in forms:
            raise DgportError(f"{flag} {form!r}: choose {', '.join(forms[:-1])} or {forms[-1]}")
    stacked = {opts.encoder_moe, opts.denoise_moe} & {"dense", "grouped"}
    if opts.quantize is not None and "onnx" in opts.formats and stacked:
        why = ("a dense stack of dequantized experts was 15x slower per step" if "dense" in stacked else
               "grouped experts are written for unquantized exports only; no stock batched 4/8-bit product "
               "beat MatMulNBits at the padding random routing sets, bench/RESULTS.md")
        raise DgportError(f"--encoder-moe/--denoise-moe {sorted(stacked)[0]} with --quantize: quantized ONNX exports "
                          "run each expert as its own constant 4/8-bit weight (the form onnxruntime fuses into "
                          f"MatMulNBits; {why}); drop the --*-moe flag")
    if opts.attention not in ("explicit", "fused"):
        raise DgportError(f"--attention {opts.attention!r}: choose explicit or fused")
    if opts.group_size is not None and opts.group_size not in (32, 64, 128):
        raise DgportError(f"--group-size {opts.group_size}: choose 32, 64 or 128")


def _manifest_of(folder: Path) -> dict | None:
    """The dgport.json dgport wrote in `folder` (JSON with its version keys), read safely (a regular
    file inside the folder, size-capped); None when there is none."""
    path = folder / MANIFEST
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        manifest = safe_files.read_json(path, Path(os.path.realpath(folder)), ExportError)
    except (OSError, DgportError):
        return None
    ok = isinstance(manifest, dict) and "format_version" in manifest and "dgport_version" in manifest
    return manifest if ok else None


def is_export(folder: Path) -> bool:
    """Whether `folder` holds a dgport.json that dgport wrote (JSON with its version keys)."""
    return _manifest_of(folder) is not None


def foreign_entry(folder: Path) -> Path | None:
    """The first file or folder in an export that its manifest does not list (a user's notes, a
    benchmark's CSV, a subfolder, a link), or None when it holds only what dgport wrote there."""
    manifest = _manifest_of(folder)
    artifacts = manifest.get("artifacts") if manifest else None
    listed = {MANIFEST} | {rel for rel in artifacts if isinstance(rel, str)} if isinstance(artifacts, dict) else {MANIFEST}
    dirs = {str(parent) for rel in listed for parent in Path(rel).parents if str(parent) != "."}

    def walk(d: Path, prefix: str):
        with os.scandir(d) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                rel = prefix + e.name
                if e.is_dir(follow_symlinks=False) and rel in dirs:
                    found = walk(Path(e.path), rel + "/")
                    if found is not None:
                        return found
                elif rel not in listed or not e.is_file(follow_symlinks=False):
                    return Path(e.path)
        return None

    return walk(folder, "")


def _refuse_foreign(out: Path) -> None:
    found = foreign_entry(out)
    if found is not None:
        raise ExportError(f"{found}: not written by dgport (its {MANIFEST} does not list it); --force replaces only "
                          f"what an earlier export wrote: move it out of {out}, or choose another OUT")


def _refuse_links_into(src: Path, out: Path) -> None:
    """A checkpoint file whose real path lies inside OUT (a link into the export being replaced)
    would lose its data when --force removes the earlier export: refused."""
    o = Path(os.path.realpath(out))
    with os.scandir(src) as entries:
        for e in entries:
            real = Path(os.path.realpath(e.path))
            if real == o or o in real.parents:
                raise ExportError(f"{Path(e.path)}: links to {real}, inside {out}, which --force would remove; choose "
                                  "another OUT, or copy the file into the checkpoint folder first")


def _same_file(path: Path, st: os.stat_result | None) -> bool:
    try:
        return st is not None and os.path.samestat(path.stat(), st)
    except OSError:
        return False


def _check_paths(src: Path, out: Path) -> None:
    """Refuse an OUT that is SRC, lies inside it or contains it. Resolved paths (through symlinks)
    and inode identity (bind mounts, case-insensitive file systems) both count."""
    s, o = src.resolve(), out.resolve()
    s_st = s.stat() if s.exists() else None
    o_st = o.stat() if o.exists() else None
    if o == s or _same_file(o, s_st):
        raise ExportError(f"{out}: is the checkpoint folder SRC itself; choose another folder for the export")
    if s in o.parents or any(_same_file(p, s_st) for p in o.parents):
        raise ExportError(f"{out}: lies inside the checkpoint folder {src}; choose a folder outside the checkpoint")
    if o in s.parents or any(_same_file(p, o_st) for p in s.parents):
        raise ExportError(f"{out}: contains the checkpoint folder {src}; choose a folder outside it")


def _prepare_out(out: Path, force: bool) -> bool:
    """Check OUT may be written; True when it holds an earlier export that --force replaces."""
    if out.is_symlink():
        raise ExportError(f"{out}: is a symbolic link; give the real folder path for the export")
    if not out.exists():
        return False
    if not out.is_dir():
        raise ExportError(f"{out}: exists and is a file; choose a folder path for the export")
    if not any(out.iterdir()):
        return False
    if not force:
        raise ExportError(f"{out}: exists and is not empty; choose another folder or pass --force to replace it")
    if not is_export(out):
        raise ExportError(f"{out}: is not a dgport export (no {MANIFEST} written by dgport); --force replaces only an "
                          "earlier export, so choose another folder or empty this one yourself")
    _refuse_foreign(out)
    return True


_LOCK_TAG = b"dgport export lock\n"


@contextlib.contextmanager
def _out_lock(out: Path):
    """Hold an exclusive flock on `.OUT.lock` beside OUT for the whole export; fail at once if
    another export holds it. The kernel drops the lock when its process dies, however it dies."""
    if fcntl is None:
        yield
        return
    path = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ExportError(f"{path}: cannot create the export's lock file ({e.strerror}); "
                              "choose a folder you can write") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ExportError(f"{out}: another dgport export is writing this folder now; "
                              "wait for it to finish or choose another folder") from None
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
    try:
        head = os.pread(fd, len(_LOCK_TAG), 0)
        if head and head != _LOCK_TAG:
            raise ExportError(f"{path}: exists and was not written by dgport; move it away and export again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, _LOCK_TAG + f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield
    finally:
        os.unlink(path)  # still holding the lock: an export that opened the old file sees it gone and retries
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there; keep everything
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except (OverflowError, ValueError):
        return False  # not a possible process id
    return True


def _clean_stale(out: Path, progress: Progress) -> None:
    """Remove `.OUT.partial-PID` / `.OUT.old-PID` folders left by exports to OUT whose process is
    gone (killed; SIGKILL runs no cleanup). Only exactly those names; called under OUT's lock. An
    `.old` one with OUT missing is an interrupted --force replacement: the earlier export goes back."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-([0-9]+)")
    for p in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if not m or p.is_symlink() or not p.is_dir():
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _pid_alive(pid):  # our own pid's is stale: we have not made ours yet
            continue
        if m.group(1) == "old":
            if not is_export(p) or foreign_entry(p) is not None:
                continue
            if not out.exists() and not out.is_symlink():
                p.rename(out)
                progress.log(f"restored {out} from {p.name}, left by an interrupted --force export")
                continue
        shutil.rmtree(p)
        progress.log(f"removed {p}, left by an export (process {pid}) that did not finish")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt like Ctrl-C, so the export's cleanup runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _move_into_place(tmp: Path, out: Path, replace: bool) -> None:
    """tmp -> OUT. os.rename fails when OUT is meanwhile a non-empty folder or a file, so a folder
    that appeared during the export is never replaced; with `replace` the earlier export (checked
    again now) is moved aside first, and removed only after the new one is in place."""
    appeared = (f"{out}: was created by someone else during the export; it was left as it is and this "
                "export's files were removed; choose another folder")
    if not replace:
        try:
            tmp.rename(out)
        except OSError as e:
            raise ExportError(appeared) from e
        return
    if out.is_symlink() or not is_export(out):
        raise ExportError(appeared)
    _refuse_foreign(out)  # a file added to the earlier export meanwhile is kept, with the export
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old)


def export(src, out, opts: ExportOptions, progress: Progress | None = None) -> ExportSummary:
    progress = progress or Progress()
    check_options(opts)
    out = Path(out)
    _check_paths(Path(src), out)
    _prepare_out(out, opts.force)  # fail fast; checked again under the lock
    started = time.perf_counter()
    with progress.step("reading checkpoint"):
        ckpt = read_checkpoint(src, vision=not opts.text_only)
    if out.exists():
        _refuse_links_into(Path(src), out)
    if opts.quantize:  # before anything is written: one group size for every format, or the tensor it fails
        from .quantize import check, choose_group

        group, why = choose_group(ckpt.config, opts.quantize, opts.group_size)
        if why:
            progress.log(why)
        opts = dataclasses.replace(opts, group_size=group)
        if "onnx" in opts.formats:
            check(ckpt.config, opts.quantize, group)  # and 4-bit packing's even output widths
    modules = {fmt: importlib.import_module(FORMAT_MODULES[fmt]) for fmt in opts.formats}
    out.parent.mkdir(parents=True, exist_ok=True)
    with _sigterm_as_interrupt(), _out_lock(out):
        _clean_stale(out, progress)
        replace = _prepare_out(out, opts.force)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        if tmp.exists() or tmp.is_symlink():
            raise ExportError(f"{tmp}: exists and was not written by dgport; move it away and export again")
        tmp.mkdir()
        try:
            manifest, validation = _write(src, ckpt, tmp, modules, opts, progress)
            _move_into_place(tmp, out, replace)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, safe_files.WriteFailed):  # named as the file it was to become
                rel = e.path.relative_to(tmp) if tmp in e.path.parents else e.path.name
                kept = "; the earlier export is kept" if replace else ""
                raise ExportError(f"{out / rel}: could not be written ({e.reason}); free some space on that disk or "
                                  f"choose another OUT; nothing was left behind (the partial export was removed"
                                  f"{kept})") from None
            raise
    files = {rel: meta["size"] for rel, meta in manifest["artifacts"].items()}
    files[MANIFEST] = (out / MANIFEST).stat().st_size
    return ExportSummary(out, files, time.perf_counter() - started, validation)


def _has_vision(entry: dict) -> bool:
    """Whether a format entry holds vision weights (ONNX: a vision graph; MLX: `vision: true`)."""
    return "vision_graph" in entry or entry.get("vision") is True


def _write(src, ckpt, tmp: Path, modules: dict, opts: ExportOptions, progress: Progress) -> tuple[dict, dict]:
    """Every format, the tokenizer files and the manifest into `tmp`; then the validation."""
    tok_files = []
    for f in ckpt.tokenizer_files:  # read as checked files of the checkpoint (no link out, size-capped)
        data = safe_files.read_bytes(f, ckpt.root or Path(src), CheckpointError)
        with safe_files.writing(tmp / f.name):
            (tmp / f.name).write_bytes(data)
        tok_files.append(f.name)
    formats = {fmt: mod.export(ckpt, tmp, opts, progress) for fmt, mod in modules.items()}
    manifest = write_manifest(
        tmp, source={"path": str(Path(src).resolve()), "fingerprint": ckpt.fingerprint()},
        config=ckpt.config, generation=ckpt.generation, tokenizer_files=tok_files, formats=formats,
        vision=ckpt.vision if ckpt.vision is not None and all(map(_has_vision, formats.values())) else None,
    )
    validation = {}
    ckpt.close()  # the written weights' pages leave this process's memory before the models are loaded
    if opts.validate and importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        for fmt, mod in modules.items():
            for label, open_candidate in mod.validation_backends(ckpt, tmp, formats[fmt]):
                name = fmt if label is None else f"{fmt} {label}"
                with progress.step(f"validating {name} against the source model"):
                    # the opener, not an opened backend: validation keeps one model in memory at a time
                    validation[name] = validate_export(open_candidate, ckpt, fmt, opts.dtype, opts.quantize,
                                                       mod.VALIDATION_METRIC,
                                                       images="vision" in manifest and _has_vision(formats[fmt]))
            if hasattr(mod, "extra_validation"):  # e.g. quantized ONNX against its own dequantized weights
                validation.update(mod.extra_validation(ckpt, tmp, formats[fmt], opts, progress))
    return manifest, validation
