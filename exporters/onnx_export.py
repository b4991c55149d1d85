"""ONNX export: `encoder.onnx` + `denoise_step.onnx` sharing one external-data file `weights.bin`.

The graphs are built from the config and the weights (exporters/onnx_graph.py), not traced: the
two-graph contract (a causal encoder that extends a KV cache and a bidirectional denoiser that
reads it, samples in-graph and returns the next self-conditioning input) has no counterpart among
optimum's export tasks, and Gemma-4-style mixed 256/512 head sizes, K=V global layers and the
all-layer MoE are simpler to state directly than to coax through a tracer.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from dgport.progress import Progress

from .validation import rel_err
from .onnx_graph import (ONNX_DTYPE, OPSET, WEIGHTS_FILE, WeightStore, build_denoise, build_encoder, io_spec)

ENCODER, DENOISE = "encoder.onnx", "denoise_step.onnx"
CPU_ENCODER, CPU_DENOISE = "encoder.fp32compute.onnx", "denoise_step.fp32compute.onnx"


def _save(b, path: Path) -> None:
    onnx.save(b.model(), str(path))
    onnx.checker.check_model(str(path))  # resolves weights.bin next to it


def export(ckpt, out_dir, opts, progress: Progress | None = None) -> dict:
    progress = progress or Progress()
    out_dir = Path(out_dir)
    cfg = ckpt.config
    md = ONNX_DTYPE[opts.dtype]
    sparse = opts.encoder_moe == "sparse"
    sparse_den = opts.denoise_moe == "sparse"
    store = WeightStore(ckpt, out_dir, opts.dtype)
    graphs, files = {}, []
    try:
        with progress.step(f"onnx: encoder graph + {opts.dtype} weights"):
            enc = build_encoder(cfg, store, md, progress=progress, sparse_moe=sparse)
        with progress.step("onnx: denoise_step graph"):
            den = build_denoise(cfg, store, md, opts.with_logits, progress=progress, sparse_moe=sparse_den)
    finally:
        store.close()
    with progress.step("onnx: writing graphs"):
        for key, b, fname in (("encoder", enc, ENCODER), ("denoise_step", den, DENOISE)):
            _save(b, out_dir / fname)
            graphs[key] = {"file": fname, "weights": list(b.weights), **io_spec(b)}
            files.append(fname)
        cpu_graphs = None
        if opts.dtype == "bf16":  # the CPU EP has no bf16 kernels: fp32-compute variants, same weights file
            store_ro = _ReadOnlyStore(store)
            cpu_graphs = {}
            builds = (("encoder", lambda: build_encoder(cfg, store_ro, md, emulate=True, sparse_moe=sparse), CPU_ENCODER),
                      ("denoise_step", lambda: build_denoise(cfg, store_ro, md, opts.with_logits, emulate=True,
                                                             sparse_moe=sparse_den), CPU_DENOISE))
            for key, build, fname in builds:
                b = build()
                _save(b, out_dir / fname)
                cpu_graphs[key] = {"file": fname, "weights": list(b.weights), **io_spec(b)}
                files.append(fname)
    files.append(WEIGHTS_FILE)
    entry = {
        "files": files,
        "dtype": opts.dtype,
        "with_logits": bool(opts.with_logits),
        "opset": OPSET,
        "builder": "dgport onnx_graph: built from config + weights with onnx.helper (no tracing)",
        # experts per graph: "sparse" = a Loop over experts, each on the tokens routed to it (the
        # reference's loop); "dense" = every expert on every token, zero weight for unrouted ones
        "moe": {"encoder": opts.encoder_moe, "denoise_step": opts.denoise_moe},
        "kv_layout": "[batch, kv_heads, seq, head_dim]; encoder returns the updated cache per layer "
                     "(past + new; sliding layers trimmed to the last sliding_window - 1 positions)",
        "weights": {"file": WEIGHTS_FILE, "tensors": store.index},
        "graphs": graphs,
    }
    if cpu_graphs:
        entry["cpu_graphs"] = cpu_graphs
        entry["cpu_note"] = ("onnxruntime's CPU EP has no bf16 kernels: on CPU the fp32-compute graphs run with "
                             "fp32 copies of the bf16 weights made once at load (bf16 rounding kept at the "
                             "reference's casts; K/V and sc_embeds stay bf16)")
    return entry


class _ReadOnlyStore:
    """The WeightStore after writing: graphs built on it may only reference stored weights."""

    def __init__(self, store: WeightStore):
        self.index, self.proto, self.dtype = store.index, store.proto, store.dtype

    def get(self, name, make, dtype=None):
        if name not in self.index:
            raise RuntimeError(f"weight {name} was not written by the native graphs")
        return name

    def raw(self, name):  # pragma: no cover - never reached when every weight is already stored
        raise RuntimeError(name)


# ----------------------------------------------------------------------------------- validation

VALIDATION_METRIC = rel_err  # norm-wise: see exporters/validation.py


def validation_backend(ckpt, out_dir, entry):
    """The export opened on ONNX Runtime's CPU EP, for the driver's comparison with the source model."""
    from dgport.manifest import read_manifest
    from dgport.runtimes.onnx import OnnxBackend

    return OnnxBackend(read_manifest(out_dir), device="cpu")
