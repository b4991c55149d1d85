"""The MLX backend: `runtimes/mlx_model.py` behind the Backend protocol (Metal on Apple silicon,
CPU with `mlx[cpu]` on Linux).

The KV cache, the logits and the self-conditioning signal stay MLX arrays on the device; per
denoising step the host sends the canvas, positions, the temperature and one uniform per
position, and gets back argmax, entropy and the sampled ids. The encoder and the denoise step are
`mx.compile`d (their shapes are static per canvas). Nothing here imports torch or transformers.

Images (exports with `mlx/vision.safetensors`): `encode_images` runs the vision tower
(runtimes/mlx_vision.py) one image at a time, and `encode`/`encode_row` take the soft tokens as
`image_embeds` for the image placeholder tokens (a separate compiled encoder; text-only calls run the
same compiled function as before).

Rows (the RowBackend protocol, batched generation): each row owns a cache, its length and its
self-conditioning signal, apart from the single-row state. `denoise_rows` stacks the rows' caches
along the batch axis, left-padded with zeros to the longest per layer, and keeps that stack and
the batch's next signal while the same rows step again with unchanged caches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dgport import safe_files
from dgport.backend import StepOutput, image_embeds_input, no_vision_error, row_encode_inputs, row_step_inputs
from dgport.config import TextConfig
from dgport.errors import BackendUnavailable, DgportError, ExportError

try:
    import mlx.core as mx
except ImportError as e:  # pragma: no cover - depends on the install
    raise BackendUnavailable(
        "backend 'mlx' needs MLX: pip install mlx (macOS, Apple silicon) or 'mlx[cpu]' (Linux)") from e

from .mlx_model import DiffusionGemma, build
from .mlx_vision import PREFIX as VISION_PREFIX, Vision, build_vision, image_inputs

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


def load_model(folder: Path, entry: dict, config: TextConfig, vision=None) -> tuple[DiffusionGemma, Vision | None]:
    """The text model, and the vision tower when the entry has its weights and `vision` (a VisionConfig)
    is given (else None). The tower's weights are read on its first use (encode_images)."""
    if entry.get("layout") != LAYOUT:
        raise ExportError(f"{folder}: MLX weights in layout {entry.get('layout')!r}, this dgport reads {LAYOUT!r}; "
                          "export again with this dgport")
    dtype = DTYPES[entry["dtype"]]
    q = entry.get("quantization")
    weights = load_weights(folder, entry)
    tower = {k: weights.pop(k) for k in [k for k in weights if k.startswith(VISION_PREFIX)]}
    try:
        model = build(config, weights, dtype, q["bits"] if q else None)
        tower = build_vision(vision, tower, dtype) if tower and vision is not None else None
    except ValueError as e:
        first = str(e).splitlines()[0]
        raise ExportError(f"{folder}: the MLX weights do not match the manifest's config ({first}); "
                          "export again") from e
    # mx.load is lazy: left unevaluated, every mx.compile trace (one per new input shape: each
    # prompt length, each cache length, each batch of rows) would read the weights into a copy of
    # its own. Read them once, here.
    mx.eval(model.parameters())
    return model, tower



@dataclass
class _Row:
    cache: list  # per layer (keys, values) [1, kv, L, d]
    length: int = 0  # positions encoded
    sc: mx.array | None = None  # [1, C, H]: the next step's self-conditioning signal, once it has one


@dataclass
class _Batch:
    """The last denoise_rows call's stacked state, reused while the same rows step again."""
    rows: tuple
    lengths: tuple  # each row's cache length when the stack was built
    cache: list  # per layer (keys, values) [b, kv, P, d], left-padded
    padded: bool  # some row is padded in some layer (the step masks)
    sc: mx.array | None = None  # [b, C, H]: the batch's next signal, row i's at index i


class MlxBackend:
    """Backend protocol (and RowBackend) over MLX. Options: keep_logits (store the last step's fp32
    logits as `last_logits`, numpy; tests and validation), compile (default True). Without an Export,
    `vision` is the checkpoint's VisionInfo (None: no images)."""

    def __init__(self, export=None, *, folder=None, entry=None, config: TextConfig | None = None,
                 vision=None, keep_logits: bool = False, compile: bool = True):
        if export is not None:
            folder, entry, config = export.path, export.format("mlx"), export.config
            vision = export.vision
        if folder is None or entry is None or config is None:
            raise TypeError("MlxBackend needs an Export, or folder=, entry= and config=")
        self.config: TextConfig = config
        self.entry = entry
        self.path = Path(folder)
        vision = vision if entry.get("vision") is True else None
        self.model, self.tower = load_model(self.path, entry, config, None if vision is None else vision.config)
        # the VisionInfo (image settings, token ids) the loop reads; None: this backend takes no images
        self.vision = vision if self.tower is not None else None
        self._tower_loaded = False
        self.dtype = self.model._dtype
        self.keep_logits = keep_logits
        step = self.model.denoise_step_with_logits if keep_logits else self.model.denoise_step
        rows_step = self.model.denoise_rows_step_with_logits if keep_logits else self.model.denoise_rows_step
        self._encode = mx.compile(self.model.encode) if compile else self.model.encode
        m = self.model
        self._encode_images = mx.compile(m.encode_images) if compile else m.encode_images
        self._tower_fn = None if self.tower is None else mx.compile(self.tower) if compile else self.tower
        self._step = mx.compile(step) if compile else step
        self._rows_step = mx.compile(rows_step) if compile else rows_step
        self._step_masked = mx.compile(m.denoise_step_masked) if compile else m.denoise_step_masked
        self._rows_step_masked = mx.compile(m.denoise_rows_step_masked) if compile else m.denoise_rows_step_masked
        self._masks = None  # the vocabulary constraints' token-mask table [K, V] (on the device)
        self.last_logits = None
        self._rows: dict[int, _Row] = {}
        self._next_row = 0
        self._batch: _Batch | None = None
        self.reset()

    @property
    def cache_len(self) -> int:
        return self._cache_len

    def reset(self) -> None:
        self.cache = None
        self._cache_len = 0
        self._sc = None
        self.last_logits = None

    # -- images ------------------------------------------------------------------------------
    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    def encode_images(self, pixel_values, positions) -> np.ndarray:
        """Soft tokens float32 [N, P / k**2, text_hidden] of images patched by dgport.images.preprocess
        (pixel_values float32 [N, P, 3 * patch**2], positions int64 [N, P, 2]); computed in float32,
        rounded to the export dtype."""
        if self.vision is None:
            raise no_vision_error(self.path)
        cfg = self.vision.config
        pv = np.ascontiguousarray(pixel_values, dtype=np.float32)
        pos = np.asarray(positions)
        k2 = cfg.pooling_kernel_size ** 2
        if (pv.ndim != 3 or pv.shape[2] != 3 * cfg.patch_size ** 2 or pos.shape != (*pv.shape[:2], 2)
                or pv.shape[1] % k2 or pv.shape[1] == 0):
            raise DgportError(f"encode_images takes pixel_values [N, P, {3 * cfg.patch_size ** 2}] and positions "
                              f"[N, P, 2] with P a positive multiple of {k2} (got {pv.shape} and {pos.shape})")
        if not self._tower_loaded:  # read the tower's weights once, before any compiled trace
            mx.eval(self.tower.parameters())
            self._tower_loaded = True
        pos = pos.astype(np.int32)
        out = []
        for i in range(pv.shape[0]):  # one image at a time: attention over P patches is P**2 per head
            y = self._tower_fn(mx.array(pv[i:i + 1]), mx.array(pos[i:i + 1]))
            mx.eval(y)
            out.append(np.array(y))
        return np.concatenate(out) if out else np.zeros((0, pv.shape[1] // k2, cfg.text_hidden_size), np.float32)

    def _run_encode(self, ids: np.ndarray, positions: np.ndarray, cache: list, image_embeds) -> list:
        args = (mx.array(ids.astype(np.int32)), mx.array(np.asarray(positions, np.int32)), cache)
        soft = image_embeds_input(ids, image_embeds, self.vision, self.config.hidden_size)
        if soft is None:
            return self._encode(*args)  # text only: the compiled encoder as without images
        v = self.vision
        index, blocks = image_inputs(ids, v.image_token_id, soft.shape[0], v.bidirectional)
        return self._encode_images(*args, mx.array(soft), mx.array(index), mx.array(blocks))

    def encode(self, ids: np.ndarray, positions: np.ndarray, image_embeds=None) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if self.cache is None or self.cache[0][0].shape[0] != ids.shape[0]:
            self.cache = self.model.empty_cache(ids.shape[0])
        self.cache = self._run_encode(ids, positions, self.cache, image_embeds)
        mx.eval(self.cache)
        self._cache_len += ids.shape[1]

    def new_canvas(self) -> None:
        self._sc = None

    def cache_numpy(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(K, V) of one layer as float32 numpy arrays (copies; for tests and validation)."""
        return tuple(np.array(t.astype(mx.float32)) for t in self.cache[layer])

    def set_token_masks(self, masks) -> None:
        """The vocabulary constraints' table, bool [K, V] (None: none), moved to the device once."""
        if masks is None:
            self._masks = None
            return
        from dgport.vocab_constraints import check_masks

        self._masks = mx.array(check_masks(masks, self.config.vocab_size))

    def _classes(self, classes, shape):
        from dgport.vocab_constraints import check_classes

        return mx.array(check_classes(classes, shape, None if self._masks is None else self._masks.shape[0])
                        .astype(np.int32))

    def denoise(self, canvas, positions, temperature, uniforms, classes=None) -> StepOutput:
        canvas = np.asarray(canvas, dtype=np.int64)
        B, C = canvas.shape
        if self.cache is None:
            raise RuntimeError("denoise before encode: encode the prompt first")
        sc = self._sc if self._sc is not None else mx.zeros((B, C, self.config.hidden_size), self.dtype)
        args = (mx.array(canvas.astype(np.int32)), mx.array(np.asarray(positions, np.int32)), sc,
                mx.array(np.float32(temperature)), mx.array(np.asarray(uniforms, np.float32)), self.cache)
        if classes is None:
            out = self._step(*args)
        else:
            out = self._step_masked(*args, self._masks, self._classes(classes, canvas.shape))
        result, self._sc = self._outputs(out)
        return result

    # -- rows (RowBackend) -----------------------------------------------------------------
    def _row(self, row) -> _Row:
        try:
            return self._rows[row]
        except (KeyError, TypeError):
            raise DgportError(f"no MLX row {row!r} (open one with open_row; closed rows are forgotten)") from None

    def open_row(self, copy_of: int | None = None) -> int:
        if copy_of is None:
            new = _Row(self.model.empty_cache(1))
        else:
            src = self._row(copy_of)
            # mx.arrays are immutable (encode returns new ones): sharing them is a copy
            new = _Row(list(src.cache), src.length)
        rid = self._next_row
        self._next_row += 1
        self._rows[rid] = new
        return rid

    def close_row(self, row: int) -> None:
        self._row(row)
        del self._rows[row]
        if self._batch is not None and row in self._batch.rows:
            self._flush_batch_sc()
            self._batch = None  # its stack holds the closed row's cache

    def row_cache_len(self, row: int) -> int:
        return self._row(row).length

    def encode_row(self, row: int, ids: np.ndarray, positions: np.ndarray, image_embeds=None) -> None:
        r = self._row(row)
        ids, positions = row_encode_inputs(ids, positions)
        r.cache = self._run_encode(ids, positions, r.cache, image_embeds)
        mx.eval(r.cache)
        r.length += ids.shape[1]

    def _flush_batch_sc(self) -> None:
        """Hand the last batch's next signal to its rows (before the batch is replaced)."""
        b = self._batch
        if b is None or b.sc is None:
            return
        for i, rid in enumerate(b.rows):
            if rid in self._rows:
                self._rows[rid].sc = b.sc[i:i + 1]
        b.sc = None

    def _stack(self, rows: tuple) -> _Batch:
        """The rows' caches stacked along the batch axis, each left-padded with zeros to the longest."""
        cache, padded = [], False
        for i in range(self.config.num_layers):
            parts = [self._rows[r].cache[i] for r in rows]
            P = max(k.shape[2] for k, _ in parts)
            ks, vs = [], []
            for k, v in parts:
                if k.shape[2] < P:
                    padded = True
                    pad = [(0, 0), (0, 0), (P - k.shape[2], 0), (0, 0)]
                    k, v = mx.pad(k, pad), mx.pad(v, pad)
                ks.append(k)
                vs.append(v)
            cache.append((mx.concatenate(ks, axis=0), mx.concatenate(vs, axis=0)) if len(rows) > 1 else (ks[0], vs[0]))
        mx.eval(cache)
        return _Batch(rows, tuple(self._rows[r].length for r in rows), cache, padded)

    def denoise_rows(self, rows, canvas, positions, temperatures, uniforms, fresh, classes=None) -> StepOutput:
        lengths = tuple(self._row(r).length for r in rows)
        rows, canvas, positions, temperatures, uniforms, fresh = row_step_inputs(
            rows, lengths, canvas, positions, temperatures, uniforms, fresh)
        b = len(rows)
        C = canvas.shape[1]
        batch = self._batch
        if batch is None or batch.rows != rows or batch.lengths != lengths:
            self._flush_batch_sc()
            batch = self._batch = self._stack(rows)
        if batch.sc is not None and not fresh.any():
            sc = batch.sc  # the same rows again: the last step's signal as is
        else:
            self._flush_batch_sc()
            zeros = None
            parts = []
            for r, f in zip(rows, fresh):
                s = self._rows[r].sc
                if f or s is None:
                    s = zeros = zeros if zeros is not None else mx.zeros((1, C, self.config.hidden_size), self.dtype)
                elif s.shape[1] != C:
                    raise DgportError(f"row {r}'s self-conditioning signal is for a canvas of {s.shape[1]} "
                                      f"positions, this canvas has {C}: start its canvas with fresh=True")
                parts.append(s)
            sc = mx.concatenate(parts, axis=0) if b > 1 else parts[0]
        args = (mx.array(canvas.astype(np.int32)), mx.array(positions.astype(np.int32)), sc,
                mx.array(temperatures.reshape(b, 1, 1)), mx.array(uniforms), batch.cache)
        if classes is None:
            out = (self._rows_step if batch.padded else self._step)(*args)
        else:
            step = self._rows_step_masked if batch.padded else self._step_masked
            out = step(*args, self._masks, self._classes(classes, canvas.shape))
        result, batch.sc = self._outputs(out)
        return result

    def _outputs(self, out) -> tuple[StepOutput, "mx.array"]:
        """A compiled step's outputs: the host's StepOutput, and the next self-conditioning signal
        (kept on the device); the logits too with keep_logits."""
        mx.eval(out)
        argmax, entropy, sampled, next_sc = out[:4]
        if self.keep_logits:
            self.last_logits = np.array(out[4])
        return StepOutput(np.array(argmax).astype(np.int64), np.array(entropy).astype(np.float32),
                          np.array(sampled).astype(np.int64)), next_sc
