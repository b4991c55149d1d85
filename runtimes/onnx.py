"""ONNX Runtime backend (CPU and CUDA execution providers) behind dgport's Backend protocol.

Imports only numpy and onnxruntime (never torch or transformers).

- Weights: `weights.bin` is memory-mapped once; one OrtValue per tensor is made once (zero-copy on
  CPU, one host-to-device copy on CUDA, handed over as a DLPack view) and given to both sessions
  with `SessionOptions.add_initializer`, which uses a supplied OrtValue in place when it already
  lives on the planned device, so encoder and denoiser share one copy. Prepacking is disabled so no
  session keeps a private repacked copy. Quantized exports are one graph (`step`, both roles, one
  session): their 4/8-bit weights are left to onnxruntime, which packs each once for MatMulNBits
  (prepacking on) and frees the original. Every graph also loads by path alone in a stock session
  (docs/GRAPH_CONTRACT.md): its weights are standard external-data initializers in weights.bin.
- KV cache: per layer an OrtValue on the backend's device. The encoder graph takes the cache and
  returns the updated one (sliding layers trimmed to the last `sliding_window - 1` positions, as
  transformers' DynamicSlidingWindowLayer); the backend swaps OrtValues, nothing is copied to the host.
- Denoise: IO binding; argmax/entropy/sampled ([B, C]) come back to the host, `next_sc_embeds`
  stays on the device and is bound as the next step's `sc_embeds`; `logits` (parity exports only)
  stays on the device unless `last_logits` is read.
- Rows (batched generation, the RowBackend protocol): runtimes/onnx_rows.py, apart from the
  single-row state above.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from dgport import safe_files
from dgport.backend import StepOutput, image_embeds_input, no_vision_error
from dgport.config import TextConfig
from dgport.errors import BackendUnavailable, DgportError, ExportError

from .int8_check import int8_level
from .onnx_rows import RowsMixin

BF16 = 16  # onnx.TensorProto.BFLOAT16 (onnx itself is not a runtime dependency)
ONNX_TYPE = {"fp32": 1, "fp16": 10, "bf16": BF16, "uint8": 2, "int8": 3}
NP_TYPE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16,  # bf16 travels as raw uint16 bits
           "uint8": np.uint8, "int8": np.int8}
# quantized exports' 4-bit weights are left to onnxruntime to read from weights.bin (an OrtValue of a 4-bit
# type cannot be made from numpy); it repacks them for MatMulNBits once (one step graph) and frees them
LOADED_BY_ORT = ("uint4",)

CUDA_FIX = ("install the CUDA build of ONNX Runtime: pip uninstall -y onnxruntime && pip install 'dgport[cuda]' "
            "(onnxruntime-gpu; both packages provide the same module, never install both)")


# ONNX `Attention` (opset 23): onnxruntime < 1.23 has no kernel for it; 1.23.0's CPU kernel is wrong when
# query heads differ from KV heads (grouped-query attention, as in the real model); 1.23.1 fixed it
FUSED_ATTENTION_MIN = (1, 23, 1)
FUSED_ATTENTION_BROKEN = {(1, 23, 0)}


def ort_version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) of an onnxruntime version string ("1.23.1", "1.24.0.dev20250101", "1.22.0+cu12")."""
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def check_fused_attention(version: str) -> None:
    """Refuses onnxruntime versions that cannot run (or run wrongly) exports with `--attention fused`."""
    v = ort_version(version)
    need = ".".join(map(str, FUSED_ATTENTION_MIN))
    if v in FUSED_ATTENTION_BROKEN:
        raise BackendUnavailable(f"this export uses --attention fused, and onnxruntime {version}'s Attention kernel is "
                                 f"wrong for grouped-query attention; needs onnxruntime >= {need}: "
                                 "pip install -U onnxruntime (or onnxruntime-gpu)")
    if v < FUSED_ATTENTION_MIN:
        raise BackendUnavailable(f"this export uses --attention fused (ONNX Attention, opset 23), which needs "
                                 f"onnxruntime >= {need} (installed {version}): pip install -U onnxruntime "
                                 "(or onnxruntime-gpu), or export with --attention explicit")


def _ort():
    from dgport.ort_env import onnxruntime

    try:
        ort = onnxruntime()
    except ImportError as e:
        raise BackendUnavailable(
            "ONNX Runtime is not installed: pip install 'dgport[cpu]' (or 'dgport[cuda]' for NVIDIA GPUs)") from e
    return ort


class OnnxBackend(RowsMixin):
    def __init__(self, export, device: str = "cpu", threads: int | None = None, graph_set: str | None = None,
                 accuracy_level: int | None = None, profile_prefix: str | None = None, **session_options):
        """`graph_set`: the manifest's graph set to run ("graphs" or "cpu_graphs"); by default the
        device's own (the CPU EP runs `cpu_graphs` where the export has them). `accuracy_level`
        (quantized exports): onnxruntime's MatMulNBits compute type for the weights it fuses,
        4 = int8 activations (the default: integer dot products, 1.3x faster per step for int4 and
        10x for int8 on the CPU EP, bench/RESULTS.md; the Sudoku model's tokens agree with fp32
        as closely), 0 = fp32 activations (the dequantized weights' exact products: what
        the export's validation runs). Also $DGPORT_ORT_ACCURACY_LEVEL. `profile_prefix`: write
        onnxruntime's profile of each session there (`session.end_profiling()` returns the file)."""
        if device not in ("cpu", "cuda"):
            raise DgportError(f"device {device!r}: the ONNX backend runs on 'cpu' or 'cuda'")
        ort = _ort()
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(f"--backend cuda: this onnxruntime has no CUDAExecutionProvider; {CUDA_FIX}")
        if "onnx" not in export.formats:
            raise ExportError(f"{export.path}: has no onnx weights; export with `dgport export CHECKPOINT OUT --format onnx`")
        self.export = export
        self.entry = entry = export.format("onnx")
        self.config: TextConfig = export.config
        self.device = device
        self.dtype = entry["dtype"]
        self._ort = ort
        if entry.get("attention") == "fused":
            check_fused_attention(ort.__version__)
        self._dev = ("cuda", 0) if device == "cuda" else ("cpu", 0)
        if graph_set is None:
            graph_set = "cpu_graphs" if device == "cpu" and "cpu_graphs" in entry else "graphs"
        self.graphs = graphs = entry[graph_set]
        for g in graphs.values():
            if g["weights_as_inputs"]:  # written by an earlier dgport of the same format version
                raise ExportError(f"{export.path}: graph {g['file']} takes its weights as inputs, which this "
                                  "dgport no longer binds; export again with this dgport")
        self._quiet = device == "cpu" and self.dtype == "bf16" and graph_set == "cpu_graphs"
        if accuracy_level is None:
            text = os.environ.get("DGPORT_ORT_ACCURACY_LEVEL", "4")
            if text not in ("0", "1", "2", "3", "4"):
                raise DgportError(f"DGPORT_ORT_ACCURACY_LEVEL={text!r}: choose 0 (fp32 activations) .. 4 "
                                  "(int8 activations)")
            accuracy_level = int(text)
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise DgportError(f"accuracy_level {accuracy_level}: choose 0 (fp32), 1, 2, 3 or 4 (int8 activations)")
        self.quantization = entry.get("quantization")
        if self.quantization is not None and device == "cpu" and accuracy_level == 4:
            accuracy_level = int8_level(self.quantization)  # 0 where int8 sums are not exact here
        self.accuracy_level = accuracy_level
        self._profile_prefix = profile_prefix
        if self.quantization is not None and device == "cpu":
            fixed_mmap_threshold()
        self._root = Path(os.path.realpath(self.export.path))
        self._weights = self._load_weights(graphs)
        so_kw = dict(session_options)
        if threads is None:
            threads = int(os.environ.get("DGPORT_ORT_THREADS", "0"))
        # quantized exports: one graph ("step") does both, so each weight has one MatMulNBits kernel
        self._joint = "step" in graphs
        self._sessions = {key: self._session(g, threads, so_kw) for key, g in graphs.items()}
        if self._joint:
            self._sessions = {"encoder": self._sessions["step"], "denoise_step": self._sessions["step"]}
        self._enc_out = [o["name"] for o in graphs["step" if self._joint else "encoder"]["outputs"]]
        self._den_out = [o["name"] for o in graphs["step" if self._joint else "denoise_step"]["outputs"]]
        self.with_logits = "logits" in self._den_out
        den = graphs["step" if self._joint else "denoise_step"]
        self.constrainable = {"token_masks", "token_classes"} <= {i["name"] for i in den.get("optional_inputs", ())}
        self._masks = None  # the token-mask table on the device (vocabulary constraints), and its rows
        self._mask_rows = None
        self._zero_sc = None
        self._logits = None
        self._bf16_reader = None
        enc = graphs["step" if self._joint else "encoder"]
        takes_images = "image_embeds" in {i["name"] for i in enc.get("optional_inputs", ())}
        self.vision = export.vision if takes_images and "vision_graph" in entry else None
        self._vision_sess = None
        self._threads, self._so_kw = threads, so_kw
        self._init_rows(threads)
        self.reset()

    # ---------------------------------------------------------------- setup
    def _load_weights(self, graphs) -> dict:
        ort = self._ort
        meta = self.entry["weights"]
        path = self.export.file(meta["file"])
        with safe_files.open_binary(path, self._root, ExportError, "export again") as f:  # a regular file inside
            mm = np.memmap(f, dtype=np.uint8, mode="r")
        self._mm = mm
        needed = sorted({w for g in graphs.values() for w in g["weights"]})
        values = {}
        for name in needed:
            t = meta["tensors"][name]
            if t["dtype"] in LOADED_BY_ORT:
                continue
            raw = mm[t["offset"]:t["offset"] + t["nbytes"]]
            arr = raw.view(NP_TYPE[t["dtype"]]).reshape(t["shape"])
            if self.device == "cpu":
                values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr, ONNX_TYPE[t["dtype"]]) \
                    if t["dtype"] == "bf16" else ort.OrtValue.ortvalue_from_numpy(arr)
            else:
                values[name] = device_initializer(ort, arr, ONNX_TYPE[t["dtype"]], self._dev)
        return values

    def _session(self, g: dict, threads: int, extra: dict):
        ort = self._ort
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if self._profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = self._profile_prefix
        if self.quantization is None:
            so.add_session_config_entry("session.disable_prepacking", "1")
        else:  # MatMulNBits' packed 4-bit blocks are its fast path; without them it dequantizes every call
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(self.accuracy_level))
        if self._quiet or g.get("optional_inputs"):  # one warning per overridable initializer, by design
            so.log_severity_level = 3
        for k, v in extra.items():
            so.add_session_config_entry(str(k), str(v))
        for name in g["weights"]:
            if name in self._weights:
                so.add_initializer(name, self._weights[name])
        providers = self._providers()
        path = self.export.file(g["file"])
        safe_files.check(path, self._root, ExportError, "export again")  # onnxruntime opens it by path
        try:
            sess = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            if self.device == "cuda":
                raise BackendUnavailable(f"--backend cuda: could not start the CUDA execution provider ({e}); "
                                         f"check the GPU driver, or {CUDA_FIX}") from e
            raise ExportError(f"{path}: onnxruntime {ort.__version__} could not load it ({str(e).splitlines()[0]}); "
                              "export again with this dgport, or pip install -U onnxruntime") from e
        if self.device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
            raise BackendUnavailable(f"--backend cuda: no usable GPU for the CUDA execution provider; {CUDA_FIX}")
        return sess

    def _providers(self) -> list:
        # TF32 off: the CUDA EP enables it by default, which rounds fp32 MatMul inputs to 10 mantissa
        # bits and breaks fp32 exports' token identity with the CPU EP (bf16 exports are unaffected)
        return [("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "0"}), "CPUExecutionProvider"] \
            if self.device == "cuda" else ["CPUExecutionProvider"]

    def _empty(self, shape) -> "object":
        """A zero-filled OrtValue in the KV/sc dtype (CPU memory; ORT copies it where needed)."""
        ort = self._ort
        t = self.dtype
        arr = np.zeros(shape, NP_TYPE[t])
        v = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr, ONNX_TYPE[t]) if t == "bf16" else \
            ort.OrtValue.ortvalue_from_numpy(arr)
        if self.device == "cuda" and arr.size:
            dv = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), ONNX_TYPE[t], *self._dev)
            dv.update_inplace(arr)
            return dv
        return v

    # ---------------------------------------------------------------- protocol
    @property
    def cache_len(self) -> int:
        return self._cache_len

    def reset(self) -> None:
        self._kv = None
        self._batch = None
        self._cache_len = 0
        self._sc = None
        self._logits = None

    def new_canvas(self) -> None:
        self._sc = None

    def _init_cache(self, B: int) -> None:
        cfg = self.config
        self._kv = [[self._empty((B, cfg.kv_heads[i], 0, cfg.head_dims[i])) for _ in range(2)]
                    for i in range(cfg.num_layers)]
        self._batch = B

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    def encode_images(self, pixel_values: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The vision graph: patches [N, P, 3*patch**2] float32 and positions [N, P, 2] int64 -> soft
        tokens [N, P / k**2, H] float32 (export-dtype values). Its session opens on first use."""
        if self.vision is None:
            raise no_vision_error(self.export.path)
        pv = np.ascontiguousarray(pixel_values, dtype=np.float32)
        pos = np.ascontiguousarray(positions, dtype=np.int64)
        c = self.vision.config
        if pv.ndim != 3 or pv.shape[2] != 3 * c.patch_size ** 2 or pos.shape != (*pv.shape[:2], 2) \
                or pv.shape[1] % c.pooling_kernel_size ** 2:
            raise DgportError(f"encode_images: pixel_values [N, P, {3 * c.patch_size ** 2}] and positions [N, P, 2] "
                              f"(got {list(pv.shape)} and {list(pos.shape)})")
        if self._vision_sess is None:
            g = self.entry["vision_graph"]
            if g.get("attention") == "fused":  # one ONNX Attention node a layer (opset 23)
                check_fused_attention(self._ort.__version__)
            self._weights.update(self._load_weights({"vision": g}))
            self._vision_sess = self._session(g, self._threads, self._so_kw)
        return self._vision_sess.run(["soft_tokens"], {"pixel_values": pv, "pixel_position_ids": pos})[0]

    def _image_embeds(self, ids, image_embeds):
        return image_embeds_input(ids, image_embeds, self.vision, self.config.hidden_size) \
            if image_embeds is not None else None

    def encode(self, ids: np.ndarray, positions: np.ndarray, image_embeds=None) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        if ids.ndim != 2 or ids.shape != positions.shape:
            raise DgportError(f"encode: ids {ids.shape} and positions {positions.shape} must both be [B, T]")
        image_embeds = self._image_embeds(ids, image_embeds)
        if self._kv is None:
            self._init_cache(ids.shape[0])
        self._kv = self._encode_cache(self._kv, ids, positions, image_embeds)
        self._cache_len += ids.shape[1]

    def _encode_cache(self, kv: list, ids: np.ndarray, positions: np.ndarray, image_embeds=None) -> list:
        """The encoder (or the step graph in encoder mode) on a cache kv (per layer [K, V] OrtValues);
        returns the extended cache, on the device. `image_embeds`: checked float32 [S, H] or None."""
        sess = self._sessions["encoder"]
        io = sess.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("position_ids", positions)
        if image_embeds is not None:
            # an overridable initializer: bound as an OrtValue (bind_cpu_input finds only plain inputs)
            io.bind_ortvalue_input("image_embeds", self._ort.OrtValue.ortvalue_from_numpy(image_embeds, *self._dev))
        if self._joint:  # the step graph in encoder mode: the denoiser's inputs are read but unused
            B, T = ids.shape
            io.bind_ortvalue_input("sc_embeds", self._empty((B, T, self.config.hidden_size)))
            io.bind_cpu_input("temperature", np.ones((), np.float32))
            io.bind_cpu_input("uniforms", np.zeros((B, T), np.float32))
            io.bind_cpu_input("denoise", np.zeros((), np.bool_))
        for i, (k, v) in enumerate(kv):
            io.bind_ortvalue_input(f"past_key_{i}", k)
            io.bind_ortvalue_input(f"past_value_{i}", v)
        for name in self._enc_out:
            io.bind_output(name, *(self._dev if name.startswith("present_") else ("cpu", 0)))
        sess.run_with_iobinding(io)
        outs = dict(zip(self._enc_out, io.get_outputs()))
        return [[outs[f"present_key_{i}"], outs[f"present_value_{i}"]] for i in range(self.config.num_layers)]

    def set_token_masks(self, masks) -> None:
        """The vocabulary constraints' table, bool [K, V] (None: none), copied to the device once; each
        constrained step then names one row per position (`denoise(..., classes=)`)."""
        if masks is None:
            self._masks = self._mask_rows = None
            return
        from dgport.vocab_constraints import check_masks

        if not self.constrainable:
            raise ExportError(f"{self.export.path}: this export's denoise graph takes no token masks (vocabulary "
                              "constraints); export it again with this dgport")
        masks = check_masks(masks, self.config.vocab_size)
        v = self._ort.OrtValue.ortvalue_from_numpy(masks)
        if self.device == "cuda":
            dv = self._ort.OrtValue.ortvalue_from_shape_and_type(list(masks.shape), 9, *self._dev)  # 9: bool
            dv.update_inplace(masks)
            v = dv
        self._masks, self._mask_rows = v, masks.shape[0]

    def _constraint(self, classes, shape):
        """The constraint inputs of a step ({} without classes: the graph's defaults, unconstrained)."""
        if classes is None:
            return {}
        from dgport.vocab_constraints import check_classes

        # an OrtValue: IO binding finds an overridable initializer by name for OrtValues, not for numpy arrays
        cls = self._ort.OrtValue.ortvalue_from_numpy(check_classes(classes, shape, self._mask_rows))
        return {"token_masks": self._masks, "token_classes": cls}

    def denoise(self, canvas, positions, temperature, uniforms, classes=None) -> StepOutput:
        if self._kv is None:
            raise DgportError("denoise before encode: encode the prompt first")
        canvas = np.ascontiguousarray(canvas, dtype=np.int64)
        B, C = canvas.shape
        sc = self._sc
        if sc is None:
            sc = self._zeros_sc(B, C)
        outs = self._step(self._kv, canvas, positions, np.asarray(temperature, dtype=np.float32).reshape(()),
                          uniforms, sc, self._constraint(classes, canvas.shape))
        self._sc = outs["next_sc_embeds"]
        self._logits = outs.get("logits")
        return StepOutput(outs["argmax_ids"].numpy(), outs["entropy"].numpy(), outs["sampled_ids"].numpy())

    def _zeros_sc(self, B: int, C: int):
        """A zero self-conditioning signal [B, C, H] on the device (made once per shape)."""
        shape = (B, C, self.config.hidden_size)
        if self._zero_sc is None or tuple(self._zero_sc.shape()) != shape:
            self._zero_sc = self._empty(shape)
        return self._zero_sc

    def _step(self, kv: list, canvas: np.ndarray, positions, temperature: np.ndarray, uniforms, sc,
              constraint: dict | None = None) -> dict:
        """One denoise step (the denoise_step graph, or the step graph in denoiser mode) over the cache kv
        with the signal sc (OrtValues on the device) at `temperature` ([] or [B] float32): its outputs by
        name, the sampler's on the host, next_sc_embeds and logits on the device. `constraint`: the
        token_masks OrtValue and token_classes (_constraint); none: the graph's defaults."""
        sess = self._sessions["denoise_step"]
        io = sess.io_binding()
        io.bind_cpu_input("input_ids" if self._joint else "canvas_ids", canvas)
        if self._joint:  # the step graph in denoiser mode: its present_* outputs are dropped
            io.bind_cpu_input("denoise", np.ones((), np.bool_))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        io.bind_cpu_input("temperature", temperature)
        io.bind_cpu_input("uniforms", np.ascontiguousarray(uniforms, dtype=np.float32))
        io.bind_ortvalue_input("sc_embeds", sc)
        if constraint:
            io.bind_ortvalue_input("token_masks", constraint["token_masks"])
            io.bind_ortvalue_input("token_classes", constraint["token_classes"])
        for i, (k, v) in enumerate(kv):
            io.bind_ortvalue_input(f"past_key_{i}", k)
            io.bind_ortvalue_input(f"past_value_{i}", v)
        for name in self._den_out:
            host = name in ("argmax_ids", "entropy", "sampled_ids")
            io.bind_output(name, *(("cpu", 0) if host else self._dev))
        sess.run_with_iobinding(io)
        return dict(zip(self._den_out, io.get_outputs()))

    # ---------------------------------------------------------------- inspection (tests, validation)
    @property
    def last_logits(self) -> np.ndarray | None:
        """The last step's logits [B, C, V] fp32 (parity exports only; copied to the host on request)."""
        return None if self._logits is None else self._logits.numpy()

    def cache_numpy(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(K, V) of one layer as float32 numpy arrays (copies; for tests)."""
        return tuple(self._host_f32(v) for v in self._kv[layer])

    def sc_numpy(self) -> np.ndarray | None:
        return None if self._sc is None else self._host_f32(self._sc)

    def _host_f32(self, v) -> np.ndarray:
        """An OrtValue (on any device) as float32 numpy (copy). ORT's `.numpy()` has no bf16, so bf16
        values go through a one-node Cast session on this backend's execution provider."""
        if self.dtype != "bf16":
            return np.asarray(v.numpy(), dtype=np.float32)
        if 0 in v.shape():
            return np.zeros(v.shape(), np.float32)
        if self._bf16_reader is None:
            self._bf16_reader = _cast_session(self._ort, self._providers())
        io = self._bf16_reader.io_binding()
        io.bind_ortvalue_input("x", v)
        io.bind_output("y", "cpu", 0)
        self._bf16_reader.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()


MMAP_THRESHOLD = 1 << 16


def fixed_mmap_threshold() -> bool:
    """glibc only: serve allocations of 64 KiB and more with their own mmap, returned to the system
    when freed. onnxruntime reads a quantized export's 4/8-bit weights into memory, repacks each for
    MatMulNBits and frees the original; under glibc's default (a threshold that rises after the first
    large free) the originals land on the heap and their pages stay resident after the frees.
    Measured on the real-geometry slice, int4: peak RSS 1811 -> 1280 MB, step time unchanged
    (bench/RESULTS.md). Returns whether it was set (False off glibc)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: no mallopt
        return False
    M_MMAP_THRESHOLD = -3
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def device_initializer(ort, arr: np.ndarray, onnx_type: int, device: tuple):
    """`arr` copied once to `device`, as an OrtValue that `SessionOptions.add_initializer` accepts.

    add_initializer refuses OrtValues that own their buffer ("must be owned by the user"), and every
    device tensor made from Python owns its buffer. A DLPack view of that tensor does not own it (it
    only holds a reference), so sessions use the same device memory in place, one copy for both."""
    owner = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), onnx_type, *device)
    owner.update_inplace(np.ascontiguousarray(arr))
    from onnxruntime.capi import _pybind_state as C

    try:
        capsule = owner._ortvalue.to_dlpack()
    except AttributeError as e:
        raise BackendUnavailable(f"onnxruntime {ort.__version__} has no DLPack support, which sharing GPU weights "
                                 "between the two sessions needs; pip install -U 'dgport[cuda]'") from e
    try:
        return ort.OrtValue(C.OrtValue.from_dlpack(capsule))
    except TypeError:  # older onnxruntime: from_dlpack(capsule, is_bool_tensor)
        return ort.OrtValue(C.OrtValue.from_dlpack(capsule, False))


def _cast_session(ort, providers):
    """A session casting a bf16 tensor of any shape to float32 (built on demand; needs the onnx package,
    which tests and export validation have)."""
    try:
        from onnx import TensorProto, helper
    except ImportError as e:
        raise DgportError("reading bf16 tensors back to the host needs the onnx package: pip install onnx") from e
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "bf16_to_f32",
                              [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=providers)
