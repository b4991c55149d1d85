"""ONNX export: `encoder.onnx` + `denoise_step.onnx` sharing one external-data file `weights.bin`.

The graphs are built from the config and the weights (exporters/onnx_graph.py, onnx_steps.py), not traced: the
two-graph contract (a causal encoder that extends a KV cache and a bidirectional denoiser that
reads it, samples in-graph and returns the next self-conditioning input) has no counterpart among
optimum's export tasks, and Gemma-4-style mixed 256/512 head sizes, K=V global layers and the
all-layer MoE are simpler to state directly than to coax through a tracer.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from dgport.progress import Progress
from dgport.safe_files import writing

from .validation import rel_err
from .onnx_builder import ONNX_DTYPE, WEIGHTS_FILE, WeightStore
from .onnx_steps import build_denoise, build_encoder, build_step, io_spec
from .onnx_quant import QuantSpec

ENCODER, DENOISE = "encoder.onnx", "denoise_step.onnx"
VISION = "vision.onnx"  # checkpoints with a vision tower: patches -> soft tokens (exporters/onnx_vision.py)
STEP = "step.onnx"  # quantized exports: encoder and denoiser in one graph (onnx_steps.build_step)
# the CPU's twin of a graph: bf16 exports' fp32-compute graphs, or KEY.FORM.onnx where its expert form differs
CPU_FP32COMPUTE = {"encoder": "encoder.fp32compute.onnx", "denoise_step": "denoise_step.fp32compute.onnx"}


def _save(b, path: Path) -> None:
    model = b.model()
    with writing(path):
        onnx.save(model, str(path))
    onnx.checker.check_model(str(path))  # resolves weights.bin next to it


def moe_forms(opts) -> dict:
    """Experts per device and graph (unquantized exports; quantized ones unroll their experts as
    constants in one step graph). "auto" (both graphs' default) lets each device run its faster form:
    on CPUs the unrolled loop (each expert's weights read in place: at the 26B-A4B's layer geometry
    0.77x the Loop's step time and 0.46-0.91x its encode time, bit for bit the same; bench/RESULTS.md),
    on GPUs the dense step (a 256-token canvas hits nearly every expert; one batched MatMul per
    projection) and the sparse Loop for the encoder (long prompts)."""
    auto = {"encoder": {"cuda": "sparse", "cpu": "unrolled"}, "denoise_step": {"cuda": "dense", "cpu": "unrolled"}}
    chosen = {"encoder": opts.encoder_moe, "denoise_step": opts.denoise_moe}
    return {dev: {g: auto[g][dev] if chosen[g] == "auto" else chosen[g] for g in chosen} for dev in ("cuda", "cpu")}


def export(ckpt, out_dir, opts, progress: Progress | None = None) -> dict:
    """Writes the graphs GPUs run (`graphs`) and, where the CPU EP needs others (`cpu_graphs`: bf16
    has no CPU kernels, so fp32-compute twins; the faster expert form), those too, on one weights file."""
    progress = progress or Progress()
    out_dir = Path(out_dir)
    cfg = ckpt.config
    md = ONNX_DTYPE[opts.dtype]
    forms = moe_forms(opts)
    fused = opts.attention == "fused"
    store = WeightStore(ckpt, out_dir, opts.dtype)
    quant = None
    if opts.quantize:
        from .quantize import quantized_tensors

        quant = QuantSpec(opts.quantize, opts.group_size, quantized_tensors(cfg, opts.quantize))
    what = f"int{opts.quantize} (group {opts.group_size})" if quant else opts.dtype
    files = []
    vision = None if getattr(opts, "text_only", False) else ckpt.vision
    built_vision, vision_specs = [], []

    def vision_graph() -> None:  # on the same weights file, before the store closes
        if vision is not None:
            from .onnx_vision import build_vision, vision_quant

            with progress.step("onnx: vision graph"):
                vq = vision_quant(vision.config, quant.group) if quant is not None else None
                built_vision.append(build_vision(vision.config, store, md, quant=vq))
                vision_specs.extend({id(q): q for q in (vq or {}).values()}.values())

    def write(b, fname, moe) -> dict:
        _save(b, out_dir / fname)
        files.append(fname)
        # every graph holds its weights as external-data initializers (loads by path alone); True was
        # written by earlier dgport for bf16 fp32-compute graphs whose weights the backend bound per call
        return {"file": fname, "weights": list(b.weights), "moe": moe, "weights_as_inputs": False, **io_spec(b)}

    if quant is not None:  # one graph for both roles and every device: one packed copy of each weight
        try:
            with progress.step(f"onnx: step graph (encoder + denoiser) + {what} weights"):
                step = build_step(cfg, store, md, opts.with_logits, progress=progress, fused_attention=fused,
                                  quant=quant, vision=vision)
            vision_graph()
        finally:
            store.close()
        with progress.step("onnx: writing graphs"):
            graphs = {"step": write(step, STEP, "sparse")}
        cpu_graphs = graphs
        opset = step.opset
    else:
        graphs, cpu_graphs, opset = _two_graphs(cfg, store, md, opts, forms, fused, what, write, progress,
                                                vision, vision_graph)
    vision_entry = None
    if built_vision:
        _save(built_vision[0], out_dir / VISION)
        files.append(VISION)
        from .onnx_vision import ATTENTION

        vision_entry = {"file": VISION, "weights": list(built_vision[0].weights), "weights_as_inputs": False,
                        "attention": ATTENTION, **io_spec(built_vision[0])}
    files.append(WEIGHTS_FILE)
    entry = {
        "files": files,
        "dtype": opts.dtype,
        "with_logits": bool(opts.with_logits),
        "opset": opset,
        # "explicit": MatMul/Softmax/MatMul; "fused": one ONNX Attention node per layer (opset 23)
        "attention": opts.attention,
        # the step graphs batch rows whose caches differ in length (left padding masked by implied
        # position) at per-row temperatures ([] or [B]); exports without the key run rows one at a time
        "rows": True,
        "builder": "dgport onnx_graph: built from config + weights with onnx.helper (no tracing)",
        # experts per device and graph: "sparse" = a Loop over experts, each on the tokens routed to
        # it (the reference's loop); "dense" = every expert on every token, zero weight for unrouted ones
        "moe": {dev: {"step": "sparse"} for dev in forms} if quant is not None else forms,
        "kv_layout": "[batch, kv_heads, seq, head_dim]; encoder returns the updated cache per layer "
                     "(past + new; sliding layers trimmed to the last sliding_window - 1 positions)",
        "weights": {"file": WEIGHTS_FILE, "tensors": store.index},
        "graphs": graphs,
    }
    if cpu_graphs != graphs:
        entry["cpu_graphs"] = cpu_graphs
    if vision_entry is not None:  # fp32 compute on every device; soft tokens out as float32
        entry["vision_graph"] = vision_entry
    if quant is not None:
        entry["quantization"], entry["quantized_tensors"] = quantization_entry(quant, vision_specs)
    if opts.dtype == "bf16":
        entry["cpu_note"] = ("onnxruntime's CPU EP has no bf16 kernels: on CPU the fp32-compute graphs read the "
                             "bf16 weights and cast each to fp32 where it is used (bf16 rounding kept at the "
                             "reference's casts; K/V and sc_embeds stay bf16)")
    return entry


def _two_graphs(cfg, store, md, opts, forms, fused, what, write, progress, vision=None,
                vision_graph=lambda: None) -> tuple[dict, dict, int]:
    """Unquantized exports: the encoder and denoise_step graphs GPUs run and the CPU's set."""

    def builders(store, emulate, progress=None):  # graph -> its builder, given an expert form
        return {"encoder": lambda moe: build_encoder(cfg, store, md, emulate=emulate, progress=progress, moe=moe,
                                                     fused_attention=fused, vision=vision),
                "denoise_step": lambda moe: build_denoise(cfg, store, md, opts.with_logits, emulate=emulate,
                                                          progress=progress, moe=moe, fused_attention=fused)}

    native = builders(store, False, progress)
    built = {}
    try:
        with progress.step(f"onnx: encoder graph + {what} weights"):
            built["encoder"] = native["encoder"](forms["cuda"]["encoder"])
        with progress.step("onnx: denoise_step graph"):
            built["denoise_step"] = native["denoise_step"](forms["cuda"]["denoise_step"])
        vision_graph()
    finally:
        store.close()
    with progress.step("onnx: writing graphs"):
        graphs = {key: write(b, fname, forms["cuda"][key])
                  for key, b, fname in (("encoder", built["encoder"], ENCODER),
                                        ("denoise_step", built["denoise_step"], DENOISE))}
        cpu_graphs = dict(graphs)
        emulate = opts.dtype == "bf16"  # the CPU EP has no bf16 kernels: fp32-compute twins on the same bf16 weights
        for key, build in builders(_ReadOnlyStore(store), emulate).items():
            form = forms["cpu"][key]
            if emulate or form != forms["cuda"][key]:  # else the CPU runs the GPUs' graph
                cpu_graphs[key] = write(build(form), CPU_FP32COMPUTE[key] if emulate else f"{key}.{form}.onnx", form)
    return graphs, cpu_graphs, built["encoder"].opset


def quantization_entry(quant: QuantSpec, vision_specs=()) -> tuple[dict, dict]:
    """The manifest's record of a quantized export: the scheme with a summary per role, and per
    quantized transformers tensor its bits and measured relative weight error (relative Frobenius
    norm of dequantized - original; everything not listed stays fp32)."""
    from .quantize import SCHEME

    tensors = {name: {"role": role, "bits": bits, "rel_error": round(q.errors[name], 6)}
               for q in (quant, *vision_specs) for name, (role, bits) in q.tensors.items()}
    roles: dict = {}
    for t in tensors.values():
        r = roles.setdefault(t["role"], {"bits": t["bits"], "max_rel_error": 0.0})
        r["max_rel_error"] = max(r["max_rel_error"], t["rel_error"])
    # `roles` is the summary `dgport info` shows; per tensor in the entry's `quantized_tensors`
    return {"bits": quant.bits, "group_size": quant.group, "scheme": SCHEME,
            "kept": "fp32: router, norms, layer scalars, per-expert scales", "roles": roles}, tensors


class _ReadOnlyStore:
    """The WeightStore after writing: graphs built on it may only reference stored weights."""

    def __init__(self, store: WeightStore):
        self.index, self.proto, self.dtype = store.index, store.proto, store.dtype

    def get(self, name, make, dtype=None):
        if name not in self.index:
            raise RuntimeError(f"weight {name} was not written by the native graphs")
        return name

    view = WeightStore.view  # a view writes no bytes

    def raw(self, name):  # pragma: no cover - never reached when every weight is already stored
        raise RuntimeError(name)


# ----------------------------------------------------------------------------------- validation

VALIDATION_METRIC = rel_err  # norm-wise: see exporters/validation.py


def validation_backends(ckpt, out_dir, entry):
    """Every graph set the CPU EP can run, opened there, for the driver's comparison with the source
    model: the CPU's own, and the GPU graphs when they differ and are not bf16 (no CPU kernels; their
    fp32-compute twins are the CPU's set). [(label, open)], label None for the CPU's set."""
    from dgport.manifest import read_manifest
    from dgport.runtimes.onnx import OnnxBackend

    sets = [(None, None)]
    if "cpu_graphs" in entry and entry["dtype"] != "bf16":
        sets.append(("gpu graphs", "graphs"))
    # accuracy level 0: quantized weights' products in fp32, so the graph can be checked tightly
    return [(label, lambda g=graphs: OnnxBackend(read_manifest(out_dir), device="cpu", graph_set=g, accuracy_level=0))
            for label, graphs in sets]


def extra_validation(ckpt, out_dir, entry, opts, progress) -> dict:
    """Quantized exports only: the CPU graphs against transformers fp32 on the same checkpoint with
    its quantized tensors replaced by their dequantized values, gated as tightly as an fp32 export
    (1e-5 relative): this checks the graph (blocked dequantization, packing, the gathered experts),
    not the quantization. (The driver's comparison with the unquantized model is the quantization's
    cost, reported.)"""
    if not opts.quantize:
        return {}
    import shutil
    import tempfile

    from .checkpoint import read_checkpoint
    from .onnx_vision import VISION_QUANT
    from .quantize import write_dequantized_checkpoint
    from .validation import validate_export

    tmp = Path(tempfile.mkdtemp(prefix="dgport-dequantized-"))
    try:
        with progress.step("onnx: writing the dequantized fp32 checkpoint for validation"):
            write_dequantized_checkpoint(ckpt, opts.quantize, opts.group_size, tmp)
        deq = read_checkpoint(tmp)
        errors = {}
        for label, open_candidate in validation_backends(ckpt, out_dir, entry):
            name = "onnx vs dequantized fp32" + ("" if label is None else f" ({label})")
            with progress.step(f"validating {name}"):
                errors[name] = validate_export(open_candidate, deq, "onnx", "fp32", None, VALIDATION_METRIC,
                                               images=VISION_QUANT == "blocks" and "vision_graph" in entry
                                               and deq.vision is not None)
        deq.close()
        return errors
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
