"""`dgport export`: one checkpoint to one export folder holding one or more formats.

The folder is written under a temporary name beside OUT and renamed into place only when every
format is written, the manifest records every file's size and sha256, and (when torch is
importable) the graphs have been validated against the source model.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from dgport.errors import DgportError, ExportError
from dgport.manifest import MANIFEST, write_manifest
from dgport.progress import Progress

from .checkpoint import read_checkpoint
from .validation import validate_export

FORMAT_MODULES = {"onnx": "dgport.exporters.onnx_export", "mlx": "dgport.exporters.mlx_export"}
DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class ExportOptions:
    formats: tuple[str, ...] = ("onnx",)
    dtype: str = "fp32"
    quantize: int | None = None
    group_size: int = 64
    with_logits: bool = False
    encoder_moe: str = "sparse"  # ONNX experts per graph: "sparse" (per-expert loop) or "dense" (all experts)
    denoise_moe: str = "auto"  # "auto": both forms, each device runs its faster one (onnx_export.moe_forms)
    attention: str = "explicit"  # ONNX: "explicit" (MatMul/Softmax/MatMul) or "fused" (ONNX Attention, opset 23)
    force: bool = False
    validate: bool = True


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
        if "mlx" not in opts.formats:
            raise DgportError("--quantize applies to the mlx format; add --format mlx")
    if opts.encoder_moe not in ("sparse", "dense"):
        raise DgportError(f"--encoder-moe {opts.encoder_moe!r}: choose sparse or dense")
    if opts.denoise_moe not in ("auto", "sparse", "dense"):
        raise DgportError(f"--denoise-moe {opts.denoise_moe!r}: choose auto, sparse or dense")
    if opts.attention not in ("explicit", "fused"):
        raise DgportError(f"--attention {opts.attention!r}: choose explicit or fused")
    if opts.group_size not in (32, 64, 128):
        raise DgportError(f"--group-size {opts.group_size}: choose 32, 64 or 128")


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is a file; choose a folder path for the export")
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out}: exists and is not empty; choose another folder or pass --force to replace it")


def export(src, out, opts: ExportOptions, progress: Progress | None = None) -> ExportSummary:
    progress = progress or Progress()
    check_options(opts)
    out = Path(out)
    _prepare_out(out, opts.force)
    started = time.perf_counter()
    with progress.step("reading checkpoint"):
        ckpt = read_checkpoint(src)
    modules = {fmt: importlib.import_module(FORMAT_MODULES[fmt]) for fmt in opts.formats}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tok_files = []
        for f in ckpt.tokenizer_files:
            shutil.copy2(f, tmp / f.name)
            tok_files.append(f.name)
        formats = {fmt: mod.export(ckpt, tmp, opts, progress) for fmt, mod in modules.items()}
        manifest = write_manifest(
            tmp, source={"path": str(Path(src).resolve()), "fingerprint": ckpt.fingerprint()},
            config=ckpt.config, generation=ckpt.generation, tokenizer_files=tok_files, formats=formats,
        )
        validation = {}
        if opts.validate and importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
            for fmt, mod in modules.items():
                for label, open_candidate in mod.validation_backends(ckpt, tmp, formats[fmt]):
                    name = fmt if label is None else f"{fmt} {label}"
                    with progress.step(f"validating {name} against the source model"):
                        candidate = open_candidate()
                        validation[name] = validate_export(candidate, ckpt, fmt, opts.dtype, opts.quantize,
                                                           mod.VALIDATION_METRIC)
                        del candidate
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {rel: meta["size"] for rel, meta in manifest["artifacts"].items()}
    files[MANIFEST] = (out / MANIFEST).stat().st_size
    return ExportSummary(out, files, time.perf_counter() - started, validation)
