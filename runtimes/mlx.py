"""The MLX backend: `runtimes/mlx_model.py` behind the Backend protocol (Metal on Apple silicon,
CPU with `mlx[cpu]` on Linux).

The KV cache, the logits and the self-conditioning signal stay MLX arrays on the device; per
denoising step the host sends the canvas, positions, the temperature and one uniform per
position, and gets back argmax, entropy and the sampled ids. The encoder and the denoise step are
`mx.compile`d (their shapes are static per canvas). Nothing here imports torch or transformers.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dgport import safe_files
from dgport.backend import StepOutput
from dgport.config import TextConfig
from dgport.errors import BackendUnavailable, ExportError

try:
    import mlx.core as mx
except ImportError as e:  # pragma: no cover - depends on the install
    raise BackendUnavailable(
        "backend 'mlx' needs MLX: pip install mlx (macOS, Apple silicon) or 'mlx[cpu]' (Linux)") from e

from .mlx_model import DiffusionGemma, build

LAYOUT = "dgport-mlx/1"  # the weight layout exporters/mlx_export.py writes
DTYPES = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}


def load_weights(folder: Path, entry: dict) -> dict:
    """Every MLX weight file of an export entry, merged into one flat dict (lazily loaded)."""
    weights = {}
    root = Path(os.path.realpath(folder))
    for rel in entry["files"]:
        path = Path(folder) / rel
        if not path.name.endswith(".safetensors"):
            continue
        safe_files.check(path, root, ExportError, "export again")  # MLX opens it by path
        try:
            weights.update(mx.load(str(path)))
        except Exception as e:  # mlx raises RuntimeError/ValueError with its own wording
            raise ExportError(f"{path}: cannot read the MLX weights ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                              "the file is damaged or incomplete. Export again with `dgport export CHECKPOINT OUT --format mlx`") from e
    return weights


def load_model(folder: Path, entry: dict, config: TextConfig) -> DiffusionGemma:
    if entry.get("layout") != LAYOUT:
        raise ExportError(f"{folder}: MLX weights in layout {entry.get('layout')!r}, this dgport reads {LAYOUT!r}; "
                          "export again with this dgport")
    dtype = DTYPES[entry["dtype"]]
    q = entry.get("quantization")
    weights = load_weights(folder, entry)
    try:
        return build(config, weights, dtype, q["bits"] if q else None)
    except ValueError as e:
        first = str(e).splitlines()[0]
        raise ExportError(f"{folder}: the MLX weights do not match the manifest's config ({first}); "
                          "export again") from e



class MlxBackend:
    """Backend protocol over MLX. Options: keep_logits (store the last step's fp32 logits as
    `last_logits`, numpy; tests and validation), compile (default True)."""

    def __init__(self, export=None, *, folder=None, entry=None, config: TextConfig | None = None,
                 keep_logits: bool = False, compile: bool = True):
        if export is not None:
            folder, entry, config = export.path, export.format("mlx"), export.config
        if folder is None or entry is None or config is None:
            raise TypeError("MlxBackend needs an Export, or folder=, entry= and config=")
        self.config: TextConfig = config
        self.entry = entry
        self.model = load_model(Path(folder), entry, config)
        self.dtype = self.model._dtype
        self.keep_logits = keep_logits
        step = self.model.denoise_step_with_logits if keep_logits else self.model.denoise_step
        self._encode = mx.compile(self.model.encode) if compile else self.model.encode
        self._step = mx.compile(step) if compile else step
        self.last_logits = None
        self.reset()

    @property
    def cache_len(self) -> int:
        return self._cache_len

    def reset(self) -> None:
        self.cache = None
        self._cache_len = 0
        self._sc = None
        self.last_logits = None

    def encode(self, ids: np.ndarray, positions: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if self.cache is None or self.cache[0][0].shape[0] != ids.shape[0]:
            self.cache = self.model.empty_cache(ids.shape[0])
        self.cache = self._encode(mx.array(ids.astype(np.int32)), mx.array(np.asarray(positions, np.int32)),
                                  self.cache)
        mx.eval(self.cache)
        self._cache_len += ids.shape[1]

    def new_canvas(self) -> None:
        self._sc = None

    def cache_numpy(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(K, V) of one layer as float32 numpy arrays (copies; for tests and validation)."""
        return tuple(np.array(t.astype(mx.float32)) for t in self.cache[layer])

    def denoise(self, canvas, positions, temperature, uniforms) -> StepOutput:
        canvas = np.asarray(canvas, dtype=np.int64)
        B, C = canvas.shape
        if self.cache is None:
            raise RuntimeError("denoise before encode: encode the prompt first")
        sc = self._sc if self._sc is not None else mx.zeros((B, C, self.config.hidden_size), self.dtype)
        out = self._step(mx.array(canvas.astype(np.int32)), mx.array(np.asarray(positions, np.int32)), sc,
                         mx.array(np.float32(temperature)), mx.array(np.asarray(uniforms, np.float32)), self.cache)
        mx.eval(out)
        argmax, entropy, sampled, self._sc = out[:4]
        if self.keep_logits:
            self.last_logits = np.array(out[4])
        return StepOutput(np.array(argmax).astype(np.int64), np.array(entropy).astype(np.float32),
                          np.array(sampled).astype(np.int64))
