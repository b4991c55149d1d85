"""What every dgport ONNX graph is written with: `WeightStore`, which transforms each checkpoint
tensor once and writes it once into the export's one external-data file (`weights.bin`), and
`Builder`, which adds nodes, constants, weights (as initializers of that file), dtype casts and
Loops to a graph and assembles the model."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from dgport.errors import ExportError
from dgport.safe_files import writing

from .checkpoint import first_non_finite

OPSET = 21
FUSED_ATTENTION_OPSET = 23  # the first with ONNX `Attention`
FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
ONNX_DTYPE = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
# quantized exports' integer tensors: "uint4" is packed two to a byte (ONNX's int4 order), "uint8" plain
QUANT_DTYPE = {"uint4": TensorProto.UINT4, "uint8": TensorProto.UINT8, "int8": TensorProto.INT8}  # int8: the vision tower
UINT8 = TensorProto.UINT8
NP_NAME = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
WEIGHTS_FILE = "weights.bin"
ALIGN = 64


def np_dtype(dtype: str):
    if dtype == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"fp32": np.float32, "fp16": np.float16}[dtype])


# ----------------------------------------------------------------------------------- weights


class WeightStore:
    """Writes each transformed weight once into `weights.bin` and hands out external-data
    TensorProtos referencing it. `index` records name -> (offset, nbytes, dtype, shape)."""

    def __init__(self, ckpt, out_dir: Path, dtype: str):
        self.ckpt, self.dtype, self.np_dtype = ckpt, dtype, np_dtype(dtype)
        self.path = Path(out_dir) / WEIGHTS_FILE
        with writing(self.path):
            self.f = open(self.path, "wb")
        self.offset = 0
        self.index: dict[str, dict] = {}

    def close(self):
        with writing(self.path):  # the last buffered bytes are written here
            self.f.close()

    def raw(self, hf_name: str) -> np.ndarray:
        return self.ckpt.tensor(hf_name)

    def get(self, name: str, make, dtype: str | None = None) -> str:
        """Store the array `make()` (cast to the model dtype, or to `dtype` = 'fp32') under `name`."""
        if name in self.index:
            return name
        shape = None
        if dtype in QUANT_DTYPE:  # bytes as made (uint8; uint4 packed in pairs)
            arr = np.ascontiguousarray(np.asarray(make(), np.int8 if dtype == "int8" else np.uint8))
            shape = list(arr.shape[:-1]) + [arr.shape[-1] * (2 if dtype == "uint4" else 1)]
            label = dtype
        elif dtype == "bf16":  # quantization scales: bf16 in any export
            arr = np.ascontiguousarray(np.asarray(make()).astype(np_dtype("bf16")))
            label = "bf16"
            bad = first_non_finite(arr)
            if bad is not None:
                raise ExportError(f"tensor {name}: quantization scale is not finite ({arr.reshape(-1)[bad]}): the "
                                  "weights of its group span more than float32 can hold; the checkpoint's weights are "
                                  "damaged, or export it without --quantize")
        else:
            arr = np.asarray(make())
            target = np.dtype(np.float32) if dtype == "fp32" else self.np_dtype
            if arr.dtype != target:
                arr = arr.astype(np.float32).astype(target) if arr.dtype != np.float32 else arr.astype(target)
            arr, label = np.ascontiguousarray(arr), "fp32" if dtype == "fp32" else self.dtype
        with writing(self.path):
            self._write(name, arr, label, shape)
        return name

    def view(self, name: str, parent: str, index: int) -> str:
        """`name` = parent[index]: the bytes of one slice along the stored tensor's first axis, no new
        bytes written (a per-expert weight of a stacked [experts, in, out] tensor)."""
        if name not in self.index:
            meta = self.index[parent]
            shape = list(meta["shape"][1:])
            nbytes = meta["nbytes"] // meta["shape"][0]
            self.index[name] = {"offset": meta["offset"] + index * nbytes, "nbytes": nbytes, "dtype": meta["dtype"],
                                "shape": shape, "view_of": parent}
        return name

    def _write(self, name: str, arr: np.ndarray, dtype: str, shape) -> None:
        pad = (-self.offset) % ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        self.f.write(arr.tobytes())
        self.index[name] = {"offset": self.offset, "nbytes": arr.nbytes, "dtype": dtype,
                            "shape": list(arr.shape) if shape is None else shape}
        self.offset += arr.nbytes

    def proto(self, name: str) -> TensorProto:
        meta = self.index[name]
        t = TensorProto()
        t.name = name
        t.data_type = {**ONNX_DTYPE, **QUANT_DTYPE}[meta["dtype"]]
        t.dims.extend(meta["shape"])
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", WEIGHTS_FILE), ("offset", str(meta["offset"])), ("length", str(meta["nbytes"]))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t


# ----------------------------------------------------------------------------------- builder


@dataclass
class Builder:
    name: str
    store: WeightStore
    md: int  # ONNX dtype of the model (weights, activations, K/V)
    emulate: bool = False  # fp32 compute with md rounding (CPU EP for bf16 exports)
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    optional: list = field(default_factory=list)  # inputs with a default (overridable initializers)
    opset: int = OPSET
    _n: int = 0
    _consts: dict = field(default_factory=dict)
    _casts: dict = field(default_factory=dict)  # weight -> its fp32 cast (emulate mode), made once

    @property
    def cdt(self) -> int:
        """Compute dtype of model-dtype tensors inside the graph."""
        return FLOAT if self.emulate else self.md

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def loop(self, trips: str, acc0: str, step, hint: str) -> str:
        """An ONNX Loop of `trips` iterations carrying one fp32 tensor from `acc0`: `step(i, acc)`
        adds the body's nodes (outer-scope names may be read) and returns the next acc."""
        return self.loop_carrying(trips, [(acc0, FLOAT)], lambda i, acc: [step(i, acc)], hint)[0]

    def loop_carrying(self, trips: str, carried: list, step, hint: str, scans: tuple = ()) -> list:
        """An ONNX Loop of `trips` iterations carrying the tensors `carried` ([(initial value, dtype)]):
        `step(i, *values)` adds the body's nodes and returns the next values followed by one tensor per
        `scans` entry ((dtype, shape)), which the Loop stacks along a new first axis. Returns the final
        values and the stacked scans. The cond is explicit (true): ONNX's reference evaluator runs a
        Loop whose cond is omitted zero times."""
        first = len(self.nodes)
        i, cond = self.fresh(hint), self.fresh("cond")
        names = [self.fresh("carry") for _ in carried]
        outs = step(i, *names)
        cond_out = self.op("Identity", cond)
        vi = helper.make_tensor_value_info
        body = helper.make_graph(
            self.nodes[first:], self.fresh(f"{hint}_body"),
            [vi(i, INT64, []), vi(cond, BOOL, [])] + [vi(n, dt, None) for n, (_, dt) in zip(names, carried)],
            [vi(cond_out, BOOL, [])] + [vi(o, dt, None) for o, (_, dt) in zip(outs, carried)]
            + [vi(o, dt, shape) for o, (dt, shape) in zip(outs[len(carried):], scans)])
        del self.nodes[first:]
        res = self.op("Loop", trips, self.const(np.bool_(True), BOOL), *(v for v, _ in carried), body=body,
                      n_out=len(carried) + len(scans))
        return [res] if isinstance(res, str) else res

    def if_else(self, cond: str, then, other, types: list) -> list:
        """An ONNX If on the bool scalar `cond`: `then()` and `other()` each add their branch's nodes
        (outer-scope names may be read) and return its outputs, one per (dtype, rank) in `types`."""
        def branch(fn, hint):
            first = len(self.nodes)
            outs = list(fn())
            for k, out in enumerate(outs):
                if not any(out in n.output for n in self.nodes[first:]):  # an outer name: the branch's own
                    outs[k] = self.op("Identity", out)
            vis = [helper.make_tensor_value_info(o, dt, [self.fresh("d") for _ in range(rank)])
                   for o, (dt, rank) in zip(outs, types)]
            g = helper.make_graph(self.nodes[first:], self.fresh(hint), [], vis)
            del self.nodes[first:]
            return g

        res = self.op("If", cond, then_branch=branch(then, "then"), else_branch=branch(other, "else"), n_out=len(types))
        return [res] if isinstance(res, str) else res

    def op(self, op_type: str, *ins, n_out: int = 1, name: str | None = None, domain: str | None = None, **attrs):
        base = name or self.fresh(op_type.lower())
        outs = [base] if n_out == 1 else [f"{base}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(ins), outs, name=f"n_{base}", domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype: int) -> str:
        arr = np.asarray(value, dtype=np.float32 if dtype in (FLOAT, TensorProto.BFLOAT16) else
                         {INT64: np.int64, TensorProto.FLOAT16: np.float16, BOOL: np.bool_, UINT8: np.uint8}[dtype])
        key = (arr.tobytes(), arr.shape, dtype)
        if key not in self._consts:
            name = self.fresh("const")
            if dtype == TensorProto.BFLOAT16:
                t = helper.make_tensor(name, dtype, arr.shape, arr.reshape(-1).tolist())
            else:
                t = numpy_helper.from_array(arr, name)
            self.inits.append(t)
            self._consts[key] = name
        return self._consts[key]

    def cconst(self, value) -> str:
        """A constant in the compute dtype holding `value` rounded to the model dtype."""
        v = np.float32(value)
        if self.md == TensorProto.BFLOAT16:
            import ml_dtypes

            v = np.float32(np.asarray(v).astype(ml_dtypes.bfloat16))
        elif self.md == TensorProto.FLOAT16:
            v = np.float32(np.float16(v))
        return self.const(v, self.cdt)

    def weight(self, name: str, make, dtype: str | None = None, cast: bool = True) -> str:
        """A checkpoint-derived weight: an initializer with external data in weights.bin. In emulate mode
        a half-precision weight stays in its stored dtype and is cast to fp32 in the graph where it is
        used, so the CPU holds the bf16 weights once instead of an fp32 copy. `cast=False` returns the
        stored-dtype tensor for a caller that gathers from it first (embedding rows, one expert) and
        casts what it gathered with `compute()`."""
        self.store.get(name, make, dtype)
        return self._use(name, cast)

    def expert_weight(self, parent: str, make, e: int) -> str:
        """Expert e's slice of the stacked weight `parent` ([experts, in, out], stored once by `make`):
        its own initializer over the same bytes, cast to fp32 where used in emulate mode."""
        self.store.get(parent, make)
        return self._use(self.store.view(f"{parent}.{e}", parent, e), True)

    def _use(self, name: str, cast: bool) -> str:
        meta = self.store.index[name]
        if meta["dtype"] in QUANT_DTYPE:
            if name not in self.weights:
                self.weights.append(name)
                self.inits.append(self.store.proto(name))
            return name
        if name not in self.weights:
            self.weights.append(name)
            self.inits.append(self.store.proto(name))
            if self.emulate and ONNX_DTYPE[meta["dtype"]] != FLOAT:
                # also a graph input: an overridable initializer, which ONNX Runtime's constant folding
                # leaves alone (a constant one would be folded through its Cast into an fp32 copy)
                self.inputs.append(helper.make_tensor_value_info(name, ONNX_DTYPE[meta["dtype"]], meta["shape"]))
        if not (cast and self.emulate) or ONNX_DTYPE[meta["dtype"]] == FLOAT:
            return name
        if name not in self._casts:
            self._casts[name] = self.cast(name, FLOAT)
        return self._casts[name]

    def f32(self, x: str) -> str:
        """A compute-dtype tensor in fp32 (a cast only when the graph computes in half precision)."""
        return x if self.cdt == FLOAT else self.cast(x, FLOAT)

    def compute(self, x: str) -> str:
        """A model-dtype tensor in the compute dtype (emulate mode: cast to fp32)."""
        return self.cast(x, FLOAT) if self.emulate and self.md != FLOAT else x

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)

    def to_md(self, x32: str) -> str:
        """Round an fp32 tensor to the model dtype (the reference's `.to(dtype)`)."""
        if self.md == FLOAT:
            return x32
        if self.emulate:
            return self.cast(self.cast(x32, self.md), FLOAT)
        return self.cast(x32, self.md)

    def input(self, name: str, dtype: int, shape) -> str:
        if self.emulate and dtype == self.md and self.md != FLOAT:
            self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
            return self.cast(name, FLOAT)
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def optional_input(self, name: str, dtype: int, shape, default: np.ndarray) -> str:
        """A graph input with a default: an initializer of the same name listed among the graph inputs
        (an overridable initializer), which onnxruntime uses when the caller does not feed it."""
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        self.inits.append(numpy_helper.from_array(np.asarray(default), name))
        self.optional.append(name)
        return name

    def output(self, name: str, x: str, dtype: int, shape) -> None:
        if self.emulate and dtype == self.md and self.md != FLOAT:
            x = self.cast(x, self.md)
        self.nodes.append(helper.make_node("Identity", [x], [name], name=f"n_out_{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def model(self):
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="dgport")
        m.ir_version = 10
        return m
