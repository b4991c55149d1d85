"""Build dgport's two ONNX graphs (encoder, denoise_step) directly from a checkpoint's config and
weights with `onnx.helper`, the way onnxruntime-genai's model builder does: no tracing, one node per
operation of the reference math (spec §3-§5, §10), standard ONNX ops only (opset 21).

Weights go through a `WeightStore`: each checkpoint tensor is transformed once (linear layers
transposed to [in, out], q/k/v and gate/up fused), written once into one external-data file
(`weights.bin`) and referenced by name from both graphs, so encoder and decoder share one copy on
disk and (through `SessionOptions.add_initializer`) one copy in memory.

Dtypes: `md` is the model dtype (fp32, fp16 or bf16): weights, activations, K/V and sc_embeds. RMSNorm,
softmaxes, the router, logits and the sampler run in fp32 as in the reference. ONNX Runtime's CPU
execution provider has no bf16 kernels, so a bf16 export also gets "fp32-compute" graphs for the CPU
EP: the same math in fp32 with bf16 rounding at the reference's explicit casts and bf16 K/V and
sc_embeds at the graph boundary; their weights are the same bf16 external-data initializers, cast to
fp32 in the graph where each is used (an expert only after it is gathered), so the CPU holds the bf16
bytes once rather than an fp32 copy. Those initializers are also listed as graph inputs (ONNX's
"overridable initializers", IR >= 4): ONNX Runtime never constant-folds an overridable initializer,
so a plain `InferenceSession(path)` does not fold Cast(weight) into fp32 copies either, and callers
never have to feed them (they do not appear among the session's inputs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from dgport.config import TextConfig

OPSET = 21
FUSED_ATTENTION_OPSET = 23  # the first with ONNX `Attention`
FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
ONNX_DTYPE = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
# quantized exports' integer tensors: "uint4" is packed two to a byte (ONNX's int4 order), "uint8" plain
QUANT_DTYPE = {"uint4": TensorProto.UINT4, "uint8": TensorProto.UINT8}
UINT8 = TensorProto.UINT8
NP_NAME = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
WEIGHTS_FILE = "weights.bin"
VOCAB_CHUNK = 4096  # vocabulary rows per chunk of the table in the streamed head (_streamed_head; measured, RESULTS)
ALIGN = 64
DEC = "model.decoder."


def np_dtype(dtype: str):
    if dtype == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"fp32": np.float32, "fp16": np.float16}[dtype])


def rope_inv_freq_f32(cfg: TextConfig, layer: int) -> np.ndarray:
    """The reference's inverse frequencies in float32, computed in float32 in its order of operations
    (`1 / base ** (arange(0, 2r, 2) / d)`); TextConfig.rope_inv_freq gives the same values in float64,
    which round differently in the last bit and shift RoPE phases by ~1e-5 at a few hundred positions."""
    d = cfg.head_dims[layer]
    if cfg.is_sliding(layer):
        base, rot = cfg.sliding_rope_theta, d // 2
    else:
        base, rot = cfg.full_rope_theta, int(cfg.full_partial_rotary_factor * d // 2)
    exps = np.arange(0, 2 * rot, 2).astype(np.float32) / np.float32(d)
    inv = (np.float32(1.0) / np.power(np.float32(base), exps)).astype(np.float32)
    return np.concatenate([inv, np.zeros(d // 2 - rot, np.float32)])


# ----------------------------------------------------------------------------------- weights


class WeightStore:
    """Writes each transformed weight once into `weights.bin` and hands out external-data
    TensorProtos referencing it. `index` records name -> (offset, nbytes, dtype, shape)."""

    def __init__(self, ckpt, out_dir: Path, dtype: str):
        self.ckpt, self.dtype, self.np_dtype = ckpt, dtype, np_dtype(dtype)
        self.path = Path(out_dir) / WEIGHTS_FILE
        self.f = open(self.path, "wb")
        self.offset = 0
        self.index: dict[str, dict] = {}

    def close(self):
        self.f.close()

    def raw(self, hf_name: str) -> np.ndarray:
        return self.ckpt.tensor(hf_name)

    def get(self, name: str, make, dtype: str | None = None) -> str:
        """Store the array `make()` (cast to the model dtype, or to `dtype` = 'fp32') under `name`."""
        if name not in self.index and dtype in QUANT_DTYPE:  # bytes as made (uint8; uint4 packed in pairs)
            arr = np.ascontiguousarray(np.asarray(make(), np.uint8))
            shape = list(arr.shape[:-1]) + [arr.shape[-1] * (2 if dtype == "uint4" else 1)]
            self._write(name, arr, dtype, shape)
        elif name not in self.index and dtype == "bf16":  # quantization scales: bf16 in any export
            self._write(name, np.ascontiguousarray(np.asarray(make()).astype(np_dtype("bf16"))), "bf16", None)
        if name not in self.index:
            arr = np.asarray(make())
            target = np.dtype(np.float32) if dtype == "fp32" else self.np_dtype
            if arr.dtype != target:
                arr = arr.astype(np.float32).astype(target) if arr.dtype != np.float32 else arr.astype(target)
            self._write(name, np.ascontiguousarray(arr), "fp32" if dtype == "fp32" else self.dtype, None)
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


# ----------------------------------------------------------------------------------- model math


class Model:
    """The DiffusionGemma text stack on a Builder. `mode` is 'encoder', 'decoder' or 'joint' (both,
    selected by the bool tensor `self.denoise`: build_step)."""

    def __init__(self, b: Builder, cfg: TextConfig, mode: str, sparse_moe: bool = False, fused_attention: bool = False,
                 quant: "QuantSpec | None" = None):
        self.b, self.cfg, self.mode, self.sparse_moe = b, cfg, mode, sparse_moe
        self.fused_attention = fused_attention
        self.quant = quant
        self.denoise = None  # joint mode: the bool scalar input choosing the denoiser
        if fused_attention:
            b.opset = max(b.opset, FUSED_ATTENTION_OPSET)
        self.eps = b.const(np.float32(cfg.rms_norm_eps), FLOAT)
        self.neg_half = b.const(np.float32(-0.5), FLOAT)
        self.ax_last = b.const(np.array([-1], np.int64), INT64)

    # weights ---------------------------------------------------------------------------
    def lin(self, key: str, parts) -> str:
        """A fused linear weight [in, sum(out)] from HF [out, in] tensors (dequantized in the graph
        from its blocked integers in a quantized export)."""
        st = self.b.store
        if self.quant is not None and parts[0] in self.quant.tensors:
            return self.quant.constant(self.b, key, parts)
        return self.b.weight(key, lambda: np.concatenate([np.asarray(st.raw(p)).T for p in parts], axis=1))

    def vec32(self, hf_name: str) -> str:
        return self.b.weight(hf_name, lambda: np.asarray(self.b.store.raw(hf_name)).astype(np.float32), "fp32")

    def vec(self, hf_name: str) -> str:
        return self.b.weight(hf_name, lambda: self.b.store.raw(hf_name))

    # pieces ----------------------------------------------------------------------------
    def rms(self, x: str, w: str | None = None) -> str:
        b = self.b
        xf = b.f32(x)
        ms = b.op("ReduceMean", b.op("Mul", xf, xf), self.ax_last, keepdims=1)
        y = b.op("Mul", xf, b.op("Pow", b.op("Add", ms, self.eps), self.neg_half))
        if w is not None:
            y = b.op("Mul", y, w)
        return b.to_md(y)

    def mm(self, x: str, w: str) -> str:
        return self.b.op("MatMul", x, w)

    def gelu(self, x: str) -> str:
        return self.b.op("Gelu", x, approximate="tanh")

    def rope_tables(self, positions: str) -> dict:
        """cos/sin [B, T, 1, d] per layer type, computed in fp32 and cast to the model dtype."""
        b, cfg = self.b, self.cfg
        pos = b.op("Unsqueeze", b.cast(positions, FLOAT), self.ax_last)  # [B,T,1]
        tables = {}
        for i in range(cfg.num_layers):
            inv = rope_inv_freq_f32(cfg, i)
            key = inv.tobytes()
            if key in tables:
                continue
            freqs = b.op("Mul", pos, b.const(inv, FLOAT))  # [B,T,d/2]
            emb = b.op("Concat", freqs, freqs, axis=-1)
            one = b.const(np.array([2], np.int64), INT64)
            cos = b.op("Unsqueeze", b.to_md(b.op("Cos", emb)), one)
            sin = b.op("Unsqueeze", b.to_md(b.op("Sin", emb)), one)
            tables[key] = (cos, sin)
        return {i: tables[rope_inv_freq_f32(cfg, i).tobytes()] for i in range(cfg.num_layers)}

    def rope(self, x: str, cos: str, sin: str, d: int) -> str:
        b = self.b
        x1, x2 = b.op("Split", x, b.const(np.array([d // 2, d // 2], np.int64), INT64), axis=-1, n_out=2)
        rot = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
        return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rot, sin))

    def embedding(self, cast: bool = True) -> str:
        """The token embedding table [V, H] (also the tied lm_head); quantized exports: QuantSpec."""
        b = self.b
        return b.weight("embed_tokens", lambda: b.store.raw(f"{DEC}embed_tokens.weight"), cast=cast)

    def embed(self, ids: str) -> str:
        b = self.b
        if self.quant is not None:
            rows = self.quant.rows(b, "embed_tokens", f"{DEC}embed_tokens.weight", ids)
        else:
            rows = b.compute(b.op("Gather", self.embedding(cast=False), ids, axis=0))
        return b.op("Mul", rows, b.cconst(math.sqrt(self.cfg.hidden_size)))

    # layer -----------------------------------------------------------------------------
    def layer(self, i: int, h: str, rope, past_k: str, past_v: str, qpos: str | None, kv_only: bool = False):
        """One layer. Returns (h, k_all, v_all) where k_all/v_all = [past ; new] ([B, kv, S, d])."""
        b, cfg = self.b, self.cfg
        p = f"{DEC}layers.{i}."
        d, nkv, nh = cfg.head_dims[i], cfg.kv_heads[i], cfg.num_heads
        sliding = cfg.is_sliding(i)
        x = self.rms(h, self.vec32(p + "input_layernorm.weight"))
        if kv_only:
            parts = [p + "self_attn.k_proj.weight"] + ([p + "self_attn.v_proj.weight"] if sliding else [])
            sizes = [nkv * d] * len(parts)
            w = self.lin(f"layers.{i}.attn.kv" if sliding else f"layers.{i}.attn.k", parts)
        else:
            parts = [p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight"] + (
                [p + "self_attn.v_proj.weight"] if sliding else [])
            sizes = [nh * d] + [nkv * d] * (len(parts) - 1)
            w = self.lin(f"layers.{i}.attn.qkv" if sliding else f"layers.{i}.attn.qk", parts)
        proj = self.mm(x, w)
        outs = b.op("Split", proj, b.const(np.array(sizes, np.int64), INT64), axis=-1, n_out=len(sizes)) \
            if len(sizes) > 1 else [proj]
        if not kv_only:
            q, outs = outs[0], outs[1:]
        k = b.op("Reshape", outs[0], b.const(np.array([0, 0, nkv, d], np.int64), INT64))
        v = b.op("Reshape", outs[1], b.const(np.array([0, 0, nkv, d], np.int64), INT64)) if sliding else k
        cos, sin = rope[i]
        perm = [0, 2, 1, 3]
        k = b.op("Transpose", self.rope(self.rms(k, self.vec32(p + "self_attn.k_norm.weight")), cos, sin, d),
                 perm=perm)
        v = b.op("Transpose", self.rms(v), perm=perm)
        k_all = b.op("Concat", past_k, k, axis=2)
        v_all = b.op("Concat", past_v, v, axis=2)
        if kv_only:
            return None, k_all, v_all
        q = b.op("Reshape", q, b.const(np.array([0, 0, nh, d], np.int64), INT64))
        q = b.op("Transpose", self.rope(self.rms(q, self.vec32(p + "self_attn.q_norm.weight")), cos, sin, d),
                 perm=perm)  # [B, nh, T, d]
        o = self.fused_attend(q, k_all, v_all, sliding) if self.fused_attention else \
            self.attend(q, k_all, v_all, sliding, nh, nkv, d)  # [B, nh, T, d]
        o = b.op("Reshape", b.op("Transpose", o, perm=perm), b.const(np.array([0, 0, nh * d], np.int64), INT64))
        a = self.mm(o, self.lin(f"layers.{i}.attn.o", [p + "self_attn.o_proj.weight"]))
        h = b.op("Add", h, self.rms(a, self.vec32(p + "post_attention_layernorm.weight")))
        h = self.ffn(i, h)
        dec, enc = f"{DEC}layers.{i}.layer_scalar", f"model.encoder.language_model.layers.{i}.layer_scalar"
        scalar = self.vec(dec) if self.mode == "decoder" else self.vec(enc) if self.mode == "encoder" else \
            b.op("Where", self.denoise, self.vec(dec), self.vec(enc))
        return b.op("Mul", h, scalar), k_all, v_all

    def attend(self, q: str, k_all: str, v_all: str, sliding: bool, nh: int, nkv: int, d: int) -> str:
        """Grouped-query attention, scaling 1.0, spelled out: scores and softmax in fp32, as SDPA."""
        b = self.b
        q5 = b.op("Reshape", q, b.const(np.array([0, nkv, nh // nkv, -1, d], np.int64), INT64))
        one = b.const(np.array([2], np.int64), INT64)
        kT = b.op("Unsqueeze", b.op("Transpose", k_all, perm=[0, 1, 3, 2]), one)  # [B,kv,1,d,S]
        scores = b.op("MatMul", q5, kT)  # [B,kv,g,T,S], scaling 1.0
        sf = b.f32(scores)
        if self.mode != "decoder":  # encoder, joint: masked
            sf = b.op("Where", self.masks[sliding], sf, b.const(np.float32(-np.inf), FLOAT))
        probs = b.op("Softmax", sf, axis=-1)
        probs = probs if b.emulate else b.to_md(probs)  # SDPA keeps fp32 probabilities
        o = b.op("MatMul", probs, b.op("Unsqueeze", v_all, one))  # [B,kv,g,T,d]
        return b.op("Reshape", o, b.const(np.array([0, nh, -1, d], np.int64), INT64))

    def fused_attend(self, q: str, k_all: str, v_all: str, sliding: bool) -> str:
        """The same as one ONNX `Attention` node (opset 23; 4-D inputs give the head counts; the
        encoder's boolean mask, True = attend). Runtimes choose the kernel (flash / memory-efficient
        attention on CUDA for half types); the rounding points inside it are the kernel's."""
        b = self.b
        ins = [q, k_all, v_all]
        if self.mode != "decoder":  # encoder, joint: masked
            ins.append(b.op("Squeeze", self.masks[sliding], b.const(np.array([2], np.int64), INT64)))  # [B,1,T,S]
        return b.op("Attention", *ins, scale=1.0)

    def ffn(self, i: int, r: str) -> str:
        b, cfg = self.b, self.cfg
        p = f"{DEC}layers.{i}."
        I, K, H = cfg.intermediate_size, cfg.top_k_experts, cfg.hidden_size
        # dense MLP
        x = self.rms(r, self.vec32(p + "pre_feedforward_layernorm.weight"))
        gu = self.mm(x, self.lin(f"layers.{i}.mlp.gate_up", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]))
        gate, up = b.op("Split", gu, b.const(np.array([I, I], np.int64), INT64), axis=-1, n_out=2)
        m = self.mm(b.op("Mul", self.gelu(gate), up), self.lin(f"layers.{i}.mlp.down", [p + "mlp.down_proj.weight"]))
        h1 = self.rms(m, self.vec32(p + "post_feedforward_layernorm_1.weight"))
        # router on the raw residual
        s = b.op("Mul", self.rms(r), self.vec(p + "router.scale"))
        if b.emulate:  # torch multiplies by the python float, then rounds
            s = b.to_md(b.op("Mul", s, b.const(np.float32(H ** -0.5), FLOAT)))
        else:
            s = b.op("Mul", s, b.cconst(H ** -0.5))
        logits = self.mm(s, self.lin(f"layers.{i}.router", [p + "router.proj.weight"]))
        probs = b.op("Softmax", b.f32(logits), axis=-1)  # [B,T,E]
        topw, topi = b.op("TopK", probs, b.const(np.array([K], np.int64), INT64), axis=-1, largest=1, sorted=1,
                          n_out=2)
        topw = b.op("Div", topw, b.op("ReduceSum", topw, self.ax_last, keepdims=1))
        topw = b.op("Mul", topw, b.op("Gather", self.vec32(p + "router.per_expert_scale"), topi, axis=0))
        y = self.rms(r, self.vec32(p + "pre_feedforward_layernorm_2.weight"))  # [B,T,H]
        y2 = b.op("Reshape", y, b.const(np.array([-1, H], np.int64), INT64))  # [N,H]
        st = b.store
        if self.quant is not None:  # quantized (build_step): each expert its own constant, unrolled
            moe = self.unrolled_experts(y2, topi, topw, (f"layers.{i}.experts.gate_up", p + "experts.gate_up_proj"),
                                        (f"layers.{i}.experts.down", p + "experts.down_proj"))
        else:  # the sparse loop gathers one expert's weights, then casts them (emulate mode)
            wgu = b.weight(f"layers.{i}.experts.gate_up",
                           lambda: np.ascontiguousarray(np.swapaxes(np.asarray(st.raw(p + "experts.gate_up_proj")), 1, 2)),
                           cast=not self.sparse_moe)
            wd = b.weight(f"layers.{i}.experts.down",
                          lambda: np.ascontiguousarray(np.swapaxes(np.asarray(st.raw(p + "experts.down_proj")), 1, 2)),
                          cast=not self.sparse_moe)
            moe = self.sparse_experts(y2, topi, topw, wgu, wd) if self.sparse_moe else \
                self.dense_experts(y2, probs, topi, topw, wgu, wd)
        moe = b.op("Reshape", moe, b.op("Shape", r))
        h2 = self.rms(moe, self.vec32(p + "post_feedforward_layernorm_2.weight"))
        ff = self.rms(b.op("Add", h1, h2), self.vec32(p + "post_feedforward_layernorm.weight"))
        return b.op("Add", r, ff)

    def dense_experts(self, y2: str, probs: str, topi: str, topw: str, wgu: str, wd: str) -> str:
        """Every expert on every token, exact zero weight for unrouted ones: for canvas-sized batches
        (most experts are hit anyway) one batched MatMul per projection reads each expert once."""
        b, cfg = self.b, self.cfg
        M, E = cfg.moe_intermediate_size, cfg.num_experts
        dense_w = b.op("ScatterElements", b.op("Mul", probs, b.const(np.float32(0), FLOAT)), topi, topw, axis=-1)
        y3 = b.op("Unsqueeze", y2, b.const(np.array([0], np.int64), INT64))  # [1,N,H]
        egu = b.op("MatMul", y3, wgu)  # [E,N,2M]
        eg, eu = b.op("Split", egu, b.const(np.array([M, M], np.int64), INT64), axis=-1, n_out=2)
        eo = b.op("MatMul", b.op("Mul", self.gelu(eg), eu), wd)  # [E,N,H]
        wt = b.op("Unsqueeze", b.op("Transpose", b.op("Reshape", dense_w, b.const(np.array([-1, E], np.int64), INT64)),
                                    perm=[1, 0]), self.ax_last)  # [E,N,1]
        eo = b.to_md(b.op("Mul", b.f32(eo), wt))
        eo32 = b.f32(eo)
        return b.to_md(b.op("ReduceSum", eo32, b.const(np.array([0], np.int64), INT64), keepdims=0))  # [N,H]

    def sparse_experts(self, y2: str, topi: str, topw: str, wgu: str, wd: str) -> str:
        """The reference's own loop: for each expert, gather the tokens routed to it, run it, scale
        by the routing weight, round to the model dtype and add into the result in expert order
        (`index_add_`). An ONNX Loop over experts with Gather/ScatterND: FLOPs ~ top_k/num_experts of
        the dense form, which matters for long prompts."""
        b, cfg = self.b, self.cfg
        M, E, K = cfg.moe_intermediate_size, cfg.num_experts, cfg.top_k_experts
        flat = b.const(np.array([-1, K], np.int64), INT64)
        topi, topw = b.op("Reshape", topi, flat), b.op("Reshape", topw, flat)  # [N,K]
        acc0 = b.op("ConstantOfShape", b.op("Shape", y2), value=helper.make_tensor("zero", FLOAT, [1], [0.0]))

        def step(e, acc):
            hit = b.op("Equal", topi, e)  # [N,K]
            routed = b.op("Greater", b.op("ReduceSum", b.cast(hit, INT64), self.ax_last, keepdims=0),
                          b.const(np.int64(0), INT64))  # [N]
            rows = b.op("Squeeze", b.op("NonZero", routed), b.const(np.array([0], np.int64), INT64))  # [n]
            w_e = b.op("ReduceSum", b.op("Where", hit, topw, b.const(np.float32(0), FLOAT)), self.ax_last, keepdims=0)
            x = b.op("Gather", y2, rows, axis=0)  # [n,H]

            def expert(w):  # one expert's weights, gathered, then cast (emulate mode)
                return b.compute(b.op("Gather", w, e, axis=0))

            g, u = b.op("Split", b.op("MatMul", x, expert(wgu)),
                        b.const(np.array([M, M], np.int64), INT64), axis=-1, n_out=2)
            o = b.op("MatMul", b.op("Mul", self.gelu(g), u), expert(wd))  # [n,H]
            scaled = self.round32(b.op("Mul", b.f32(o),
                                       b.op("Unsqueeze", b.op("Gather", w_e, rows, axis=0), self.ax_last)))
            # a token appears once per expert, so the rows are unique: read-add-write with a plain ScatterND
            # (ScatterND's reduction="add" lacks kernels on some execution providers)
            added = self.round32(b.op("Add", b.op("Gather", acc, rows, axis=0), scaled))
            return b.op("ScatterND", acc, b.op("Unsqueeze", rows, self.ax_last), added)

        out = b.loop(b.const(np.int64(E), INT64), acc0, step, "expert")  # [N,H] fp32, md-rounded
        return out if b.cdt == FLOAT else b.cast(out, b.md)

    def unrolled_experts(self, y2: str, topi: str, topw: str, wgu: tuple, wd: tuple) -> str:
        """Quantized exports' sparse form: the reference's loop over experts, unrolled (one block of
        nodes per expert, in expert order, so the sums round as the Loop's do). Each expert's weights
        are then constant initializers, so onnxruntime fuses their DequantizeLinear -> MatMul into
        MatMulNBits with prepacked 4/8-bit blocks; inside a Loop they are gathered, and dequantizing
        a gathered expert costs ~20x its 16-row matmul (bench/bench_quant.py --experts-only)."""
        b, cfg = self.b, self.cfg
        M, E, K = cfg.moe_intermediate_size, cfg.num_experts, cfg.top_k_experts
        flat = b.const(np.array([-1, K], np.int64), INT64)
        topi, topw = b.op("Reshape", topi, flat), b.op("Reshape", topw, flat)  # [N,K]
        acc = b.op("ConstantOfShape", b.op("Shape", y2), value=helper.make_tensor("zero", FLOAT, [1], [0.0]))
        zero_i, zero_f = b.const(np.int64(0), INT64), b.const(np.float32(0), FLOAT)
        sq0 = b.const(np.array([0], np.int64), INT64)
        split = b.const(np.array([M, M], np.int64), INT64)
        for e in range(E):
            hit = b.op("Equal", topi, b.const(np.int64(e), INT64))  # [N,K]
            routed = b.op("Greater", b.op("ReduceSum", b.cast(hit, INT64), self.ax_last, keepdims=0), zero_i)
            rows = b.op("Squeeze", b.op("NonZero", routed), sq0)  # [n]
            w_e = b.op("ReduceSum", b.op("Where", hit, topw, zero_f), self.ax_last, keepdims=0)
            x = b.op("Gather", y2, rows, axis=0)  # [n,H]
            g, u = b.op("Split", b.op("MatMul", x, self.quant.expert(b, *wgu, e)), split, axis=-1, n_out=2)
            o = b.op("MatMul", b.op("Mul", self.gelu(g), u), self.quant.expert(b, *wd, e))  # [n,H]
            scaled = self.round32(b.op("Mul", b.f32(o), b.op("Unsqueeze", b.op("Gather", w_e, rows, axis=0),
                                                                 self.ax_last)))
            added = self.round32(b.op("Add", b.op("Gather", acc, rows, axis=0), scaled))
            acc = b.op("ScatterND", acc, b.op("Unsqueeze", rows, self.ax_last), added)
        return acc if b.cdt == FLOAT else b.cast(acc, b.md)

    def round32(self, x32: str) -> str:
        """Round an fp32 tensor to the model dtype and keep it in fp32 (accumulators)."""
        b = self.b
        return x32 if b.md == FLOAT else b.cast(b.cast(x32, b.md), FLOAT)

    # masks (encoder) -------------------------------------------------------------------
    def build_masks(self, qpos: str, past_len: str, past_len_sliding: str):
        """Causal masks [B,1,1,T,S] over [past ; new] from absolute positions: full k <= q,
        sliding q - window < k <= q. Past keys sit at positions start - L .. start - 1."""
        b = self.b
        start = b.op("Slice", qpos, b.const(np.array([0], np.int64), INT64), b.const(np.array([1], np.int64), INT64),
                     b.const(np.array([1], np.int64), INT64))  # [B,1]
        zero, one = b.const(np.int64(0), INT64), b.const(np.int64(1), INT64)
        q = b.op("Unsqueeze", qpos, b.const(np.array([1, 2, 4], np.int64), INT64))  # [B,1,1,T,1]
        masks = {}
        for sliding, L in ((False, past_len), (True, past_len_sliding)):
            rng = b.op("Range", zero, L, one)  # [L]
            kpast = b.op("Add", b.op("Sub", start, L), rng)  # [B,L]
            kpos = b.op("Concat", kpast, qpos, axis=1)  # [B,S]
            k = b.op("Unsqueeze", kpos, b.const(np.array([1, 2, 3], np.int64), INT64))  # [B,1,1,1,S]
            m = b.op("LessOrEqual", k, q)
            if sliding:
                lo = b.op("Sub", q, b.const(np.int64(self.cfg.sliding_window), INT64))
                m = b.op("And", m, b.op("Greater", k, lo))
            masks[sliding] = m
        self.masks = masks


def _layers(cfg: TextConfig, progress, what: str):
    if progress is None:
        return range(cfg.num_layers)
    return progress.track(range(cfg.num_layers), f"onnx: {what}", total=cfg.num_layers)


def kv_dims(cfg: TextConfig, i: int, past: str):
    return ["batch", cfg.kv_heads[i], past, cfg.head_dims[i]]


def cache_inputs(b, cfg: TextConfig, md: int) -> list:
    """The per-layer past_key_{i} / past_value_{i} inputs both graphs read."""
    pasts = []
    for i in range(cfg.num_layers):
        past = "past_seq_s" if cfg.is_sliding(i) else "past_seq_f"
        pasts.append((b.input(f"past_key_{i}", md, kv_dims(cfg, i, past)),
                      b.input(f"past_value_{i}", md, kv_dims(cfg, i, past))))
    return pasts


def _past_lengths(b: Builder, cfg: TextConfig, pasts) -> tuple[str, str]:
    """Cached lengths (int64 scalars) of the full and the sliding layers, read off the past K shapes."""
    two = b.const(np.array([2], np.int64), INT64)

    def plen(i):
        return b.op("Squeeze", b.op("Slice", b.op("Shape", pasts[i][0]), two, b.const(np.array([3], np.int64), INT64)),
                    b.const(np.array([0], np.int64), INT64))

    full, slid = cfg.full_layers, cfg.sliding_layers
    return (plen(full[0]) if full else b.const(np.int64(0), INT64),
            plen(slid[0]) if slid else b.const(np.int64(0), INT64))


def _sliding_tail(b: Builder, cfg: TextConfig):
    """(k, v) -> their last sliding_window - 1 positions along axis 2 (DynamicSlidingWindowLayer)."""
    keep = b.const(np.array([cfg.sliding_cache_len], np.int64), INT64)
    zero = b.const(np.array([0], np.int64), INT64)
    two = b.const(np.array([2], np.int64), INT64)

    def tail(x, v):
        # in-range indices: start = max(S - keep, 0), end = S (a negative start beyond the axis is
        # clamped by the ONNX spec, but not by every runtime)
        s = b.op("Slice", b.op("Shape", x), two, b.const(np.array([3], np.int64), INT64))
        start = b.op("Max", b.op("Sub", s, keep), zero)
        return b.op("Slice", x, start, s, two), b.op("Slice", v, start, s, two)

    return tail


def _present(b: Builder, cfg: TextConfig, md: int, i: int, k: str, v: str) -> None:
    out = "present_seq_s" if cfg.is_sliding(i) else "present_seq_f"
    b.output(f"present_key_{i}", k, md, kv_dims(cfg, i, out))
    b.output(f"present_value_{i}", v, md, kv_dims(cfg, i, out))


def build_encoder(cfg: TextConfig, store: WeightStore, md: int, emulate: bool = False, progress=None,
                  sparse_moe: bool = True, fused_attention: bool = False):
    b = Builder("dgport_encoder", store, md, emulate)
    m = Model(b, cfg, "encoder", sparse_moe, fused_attention)
    ids = b.input("input_ids", INT64, ["batch", "seq"])
    pos = b.input("position_ids", INT64, ["batch", "seq"])
    pasts = cache_inputs(b, cfg, md)
    m.build_masks(pos, *_past_lengths(b, cfg, pasts))
    rope = m.rope_tables(pos)
    h = m.embed(ids)
    trim = _sliding_tail(b, cfg)
    for i in _layers(cfg, progress, "encoder layers"):
        last = i == cfg.num_layers - 1
        h, k_all, v_all = m.layer(i, h, rope, *pasts[i], pos, kv_only=last)
        _present(b, cfg, md, i, *(trim(k_all, v_all) if cfg.is_sliding(i) else (k_all, v_all)))
    return b


def _denoise_input(b: Builder, m: Model, cfg: TextConfig, ids: str, sc: str, e: str | None = None) -> str:
    """The denoiser's input embedding with self-conditioning: rms(E[ids]*s + SC_MLP(RMSNorm_w(sc_embeds)))."""
    e = m.embed(ids) if e is None else e
    p = f"{DEC}self_conditioning."
    z = m.rms(sc, m.vec32(p + "pre_norm.weight"))
    gu = m.mm(z, m.lin("self_conditioning.gate_up", [p + "gate_proj.weight", p + "up_proj.weight"]))
    I = cfg.intermediate_size
    g, u = b.op("Split", gu, b.const(np.array([I, I], np.int64), INT64), axis=-1, n_out=2)
    scm = m.mm(b.op("Mul", m.gelu(g), u), m.lin("self_conditioning.down", [p + "down_proj.weight"]))
    return m.rms(b.op("Add", e, scm))


def _denoise_head(b: Builder, m: Model, cfg: TextConfig, md: int, h: str, temp: str, unif: str,
                  with_logits: bool) -> None:
    """Final norm, tied lm_head, fp32 softcap and the in-graph sampler of the last hidden states h
    [B, C, H]: the outputs argmax_ids, entropy, sampled_ids, next_sc_embeds (and logits)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    h = m.rms(h, m.vec32(f"{DEC}norm.weight"))
    flat = b.op("Reshape", h, b.const(np.array([-1, H], np.int64), INT64))
    bc = b.op("Slice", b.op("Shape", h), b.const(np.array([0], np.int64), INT64),
              b.const(np.array([2], np.int64), INT64))
    unif = b.op("Reshape", unif, b.const(np.array([-1], np.int64), INT64))  # [N], like flat's rows
    if b.cdt == FLOAT:  # fp32 and quantized exports, the CPU's fp32-compute graphs of bf16 ones
        argmax, entropy, sampled, expect, logits = _streamed_head(b, m, cfg, md, flat, temp, unif, with_logits)
    else:
        argmax, entropy, sampled, expect, logits = _whole_head(b, m, cfg, flat, temp, unif)
    # [N] -> [B, C] (C may be 0: the step graph encoding)
    argmax, entropy, sampled = (b.op("Reshape", x, bc, allowzero=1) for x in (argmax, entropy, sampled))
    expect = b.op("Reshape", expect, b.op("Concat", bc, b.const(np.array([H], np.int64), INT64), axis=0),
                  allowzero=1)
    soft = b.op("Mul", expect, b.cconst(math.sqrt(H)))
    b.output("argmax_ids", argmax, INT64, ["batch", "canvas"])
    b.output("entropy", entropy, FLOAT, ["batch", "canvas"])
    b.output("sampled_ids", sampled, INT64, ["batch", "canvas"])
    b.output("next_sc_embeds", soft, md, ["batch", "canvas", H])
    if with_logits:
        shape = b.op("Concat", bc, b.const(np.array([V], np.int64), INT64), axis=0)
        b.output("logits", b.op("Reshape", logits, shape, allowzero=1), FLOAT, ["batch", "canvas", V])


def _softcap(b: Builder, cfg: TextConfig, lg: str) -> str:
    cap = b.const(np.float32(cfg.final_logit_softcapping), FLOAT)
    return b.op("Mul", b.op("Tanh", b.op("Div", lg, cap)), cap)


def _whole_head(b: Builder, m: Model, cfg: TextConfig, flat: str, temp: str, unif: str):
    """The head over whole [N, V] arrays, for graphs that compute in half precision (the GPU graphs of
    fp16/bf16 exports: one half-precision GEMM each for the logits and p @ E) of flat [N, H] with
    uniforms [N]: argmax, entropy, sampled ids [N], the expectation p @ E [N, H] and the logits [N, V]."""
    V = cfg.vocab_size
    E = m.embedding()
    logits = _softcap(b, cfg, b.f32(b.op("Gemm", flat, E, transB=1)))  # tied lm_head, one copy of the table
    proc = b.op("Div", logits, temp)
    argmax = b.op("ArgMax", proc, axis=-1, keepdims=0, select_last_index=0)
    probs = b.op("Softmax", proc, axis=-1)
    logp = b.op("LogSoftmax", proc, axis=-1)
    entropy = b.op("Neg", b.op("ReduceSum", b.op("Mul", probs, logp), m.ax_last, keepdims=0))
    cdf = b.op("CumSum", probs, b.const(np.int64(-1), INT64))
    # counted in int32 (an [N, V] int64 would be the sampler's largest array), then widened
    below = b.op("Cast", b.op("LessOrEqual", cdf, b.op("Unsqueeze", unif, m.ax_last)), to=TensorProto.INT32)
    count = b.op("Cast", b.op("ReduceSum", below, m.ax_last, keepdims=0), to=INT64)
    sampled = b.op("Min", count, b.const(np.int64(V - 1), INT64))
    # next step's self-conditioning input: (softmax_fp32(md(proc)) -> md) @ E * md(sqrt(H))
    p_sc = b.to_md(b.op("Softmax", b.f32(b.to_md(proc)), axis=-1))
    return argmax, entropy, sampled, b.op("MatMul", p_sc, E), logits


def _table_rows(b: Builder, m: Model, start: str, end: str) -> str:
    """Rows start:end of the embedding table as the head computes with them ([rows, H], fp32)."""
    if m.quant is not None:
        return m.quant.table_rows(b, "embed_tokens", f"{DEC}embed_tokens.weight", start, end)
    return b.compute(b.op("Slice", m.embedding(cast=False), start, end, b.const(np.array([0], np.int64), INT64)))


def _streamed_head(b: Builder, m: Model, cfg: TextConfig, md: int, flat: str, temp: str, unif: str,
                   with_logits: bool):
    """The head of every graph that computes in fp32, streamed over the vocabulary `VOCAB_CHUNK` rows
    of the table at a time: no [N, V] array but the stacked logits / T, and no second copy of the
    table. Why: the whole-array head held ~5 [N, V] fp32 arrays (1.3 GB for the 26B-A4B); quantized
    exports kept a packed copy of the 8-bit table for a fused MatMulNBits lm_head (0.9 GB; at accuracy
    level 0 that kernel dequantized the whole table to fp32 on every call, 3 GB); the CPU graphs of
    bf16 exports cast the whole table to fp32 on every step (3 GB).
    One Loop reads each chunk of rows once (sliced, cast or dequantized) for the lm_head (an fp32 Gemm:
    in quantized exports the logits are exact to the dequantized weights at every accuracy level) and,
    in fp32 models, for the expectation p @ E, accumulated like flash attention against a running max:
    per row the max m (and its first index), s = sum exp(proc - m), t = sum exp(proc - m) (proc - m)
    and sum exp(proc - m) E, each rescaled when m grows. Then entropy = log s - t / s (accurate for
    confident rows, where it is tiny) and p @ E = (sum exp(proc - m) E) / s. The reference's
    inverse-CDF draw, sum_j [cdf_j <= u], in two levels: the chunk whose cumulative mass first passes u
    (each chunk's mass is a scan output), then one cumulative sum inside that chunk (a whole-vocabulary
    CumSum was a quarter of a head-heavy step). A half-precision model's p @ E rounds the probabilities
    to the model dtype after normalizing (softmax of md(proc), whose max and sum the Loop also keeps),
    so it takes a second Loop over the table. Returns argmax, entropy, sampled [N], expectation [N, H]
    and the logits [N, V] (when asked)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    half = md != FLOAT
    chunk = min(VOCAB_CHUNK, V)
    n_chunks = -(-V // chunk)
    i64 = lambda *v: b.const(np.array(v, np.int64), INT64)  # noqa: E731
    unif = b.op("Unsqueeze", unif, i64(-1))  # [N, 1]
    n = b.op("Slice", b.op("Shape", flat), i64(0), i64(1))

    def filled(value, dtype, width: int = 1):  # [N, width]
        return b.op("ConstantOfShape", b.op("Concat", n, i64(width), axis=0),
                    value=helper.make_tensor("v", dtype, [1], [value]))

    def bounds(i):
        start = b.op("Unsqueeze", b.op("Mul", i, b.const(np.int64(chunk), INT64)), i64(0))
        return start, b.op("Add", start, i64(chunk))  # Slice clamps the last chunk

    def online(mx, s, x):
        """The running max and sum exp(x - max) with the chunk x [N, chunk] added: (max, sum, alpha,
        x - max, exp(x - max), the chunk's own sum), alpha rescaling what was accumulated before."""
        mx_new = b.op("Max", mx, b.op("ReduceMax", x, m.ax_last, keepdims=1))
        alpha = b.op("Exp", b.op("Sub", mx, mx_new))
        d = b.op("Sub", x, mx_new)
        e = b.op("Exp", d)
        se = b.op("ReduceSum", e, m.ax_last, keepdims=1)
        return mx_new, b.op("Add", b.op("Mul", s, alpha), se), alpha, d, e, se

    lowest = float(np.finfo(np.float32).min)  # the running max's start: exp(lowest - m) = 0, and 0 * finite = 0
    carried = [(filled(lowest, FLOAT), FLOAT), (filled(0.0, FLOAT), FLOAT), (filled(0.0, FLOAT), FLOAT),
               (filled(0, INT64), INT64)]
    carried.append((filled(lowest, FLOAT), FLOAT) if half else (filled(0.0, FLOAT, H), FLOAT))
    if half:
        carried.append((filled(0.0, FLOAT), FLOAT))

    def read_chunk(i, mx, s, t, idx, *rest):
        start, end = bounds(i)
        rows = _table_rows(b, m, start, end)  # [chunk, H] fp32
        capped = _softcap(b, cfg, b.op("Gemm", flat, rows, transB=1))  # [N, chunk]
        proc = b.op("Div", capped, temp)
        mx_new, s_new, alpha, d, e, se = online(mx, s, proc)
        first = b.op("Add", b.op("ArgMax", proc, axis=-1, keepdims=1, select_last_index=0), start)
        idx = b.op("Where", b.op("Greater", mx_new, mx), first, idx)  # only a strictly greater max: the first wins
        # t is relative to the running max: moving it from mx to mx_new adds (mx - mx_new) s
        t_old = b.op("Mul", b.op("Add", t, b.op("Mul", b.op("Sub", mx, mx_new), s)), alpha)
        t_new = b.op("Add", t_old, b.op("ReduceSum", b.op("Mul", e, d), m.ax_last, keepdims=1))
        if half:  # the max and sum of softmax(md(proc)), for the second Loop
            mx2, s2, *_ = online(rest[0], rest[1], b.to_md(proc))
            last = [mx2, s2]
        else:
            last = [b.op("Add", b.op("Mul", rest[0], alpha), b.op("MatMul", e, rows))]
        stack = [proc, capped] if with_logits else [proc]
        # the chunk's probability mass against the running max, for the draw (Identity: a scan output
        # of its own name, whose shape onnxruntime knows when the Loop runs no iteration)
        masses = [se, b.op("Identity", mx_new)]
        if V % chunk:  # the last chunk is narrower: pad it to stack (ids >= V: probability 0, then clamped)
            pads = b.op("Concat", i64(0, 0, 0), b.op("Sub", i64(chunk), b.op("Slice", b.op("Shape", capped),
                                                                                i64(1), i64(2))), axis=0)
            stack = [b.op("Pad", x, pads, b.const(np.float32(-np.inf), FLOAT)) for x in stack]
        return [mx_new, s_new, t_new, idx, *last, *masses, *stack]

    # no iterations when there are no rows (the step graph encoding: no table to read)
    trips = b.op("Min", b.const(np.int64(n_chunks), INT64), b.op("Size", flat))
    outs = b.loop_carrying(trips, carried, read_chunk, "vocab",
                           scans=[(FLOAT, ["rows", 1])] * 2 + [(FLOAT, ["rows", chunk])] * (1 + with_logits))
    # stacked: [chunks, N, 1] and [chunks, N, chunk], said explicitly (ONNX's reference evaluator
    # concatenates scan outputs, vstack)
    t1 = b.op("Reshape", trips, i64(1))
    se, mxc, *stacked = (b.op("Reshape", x, b.op("Concat", t1, n, i64(w), axis=0), allowzero=1)
                         for x, w in zip(outs[len(carried):], (1, 1, chunk, chunk)))
    mx, s, t, idx, *rest = outs[:len(carried)]
    entropy = b.op("Sub", b.op("Log", s), b.op("Div", t, s))

    # the reference's inverse-CDF draw, sum_j [cdf_j <= u], in two levels: the chunk whose cumulative
    # mass first passes u (each chunk's mass from the Loop, moved to the final max), then a cumulative
    # sum inside that one chunk per row
    mass = b.op("Div", b.op("Mul", se, b.op("Exp", b.op("Sub", mxc, mx))), s)  # [chunks, N, 1]
    mass = b.op("Reshape", b.op("Transpose", mass, perm=[1, 0, 2]), b.op("Concat", n, t1, axis=0), allowzero=1)
    cum = b.op("CumSum", mass, b.const(np.int64(1), INT64))  # [N, chunks]
    before = b.op("CumSum", mass, b.const(np.int64(1), INT64), exclusive=1)
    passed = b.op("ReduceSum", b.cast(b.op("LessOrEqual", cum, unif), INT64), i64(1), keepdims=1)
    k = b.op("Min", passed, b.op("Sub", t1, i64(1)))  # [N, 1]; past the last chunk: rounding, clamped below
    ids = b.op("Range", b.const(np.int64(0), INT64), trips, b.const(np.int64(1), INT64))
    offset = b.op("ReduceSum", b.op("Mul", before, b.cast(b.op("Equal", ids, k), FLOAT)), i64(1), keepdims=1)
    n0 = b.op("Reshape", n, b.const(np.zeros(0, np.int64), INT64))  # N, a scalar
    rows_of = b.op("Add", b.op("Mul", b.op("Reshape", k, i64(-1)), n0),  # row n of chunk k[n]
                   b.op("Range", b.const(np.int64(0), INT64), n0, b.const(np.int64(1), INT64)))
    proc = b.op("Gather", b.op("Reshape", stacked[0], i64(-1, chunk)), rows_of, axis=0)  # [N, chunk]
    cdf = b.op("Add", b.op("CumSum", b.op("Div", b.op("Exp", b.op("Sub", proc, mx)), s),
                           b.const(np.int64(-1), INT64)), offset)
    inside = b.op("ReduceSum", b.cast(b.op("LessOrEqual", cdf, unif), INT64), m.ax_last, keepdims=1)
    count = b.op("Add", b.op("Mul", k, b.const(np.int64(chunk), INT64)), inside)
    sampled = b.op("Min", count, b.const(np.int64(V - 1), INT64))

    if half:  # (softmax_fp32(md(proc)) -> md) @ E as the reference rounds it: a second pass over the table
        def expect_chunk(i, acc):
            proc = b.op("Gather", stacked[0], i, axis=0)
            p_sc = b.to_md(b.op("Div", b.op("Exp", b.op("Sub", b.to_md(proc), rest[0])), rest[1]))
            rows = _table_rows(b, m, *bounds(i))
            p_sc = b.op("Slice", p_sc, i64(0), b.op("Slice", b.op("Shape", rows), i64(0), i64(1)), i64(1))
            return [b.op("Add", acc, b.op("MatMul", p_sc, rows))]

        expect = b.loop_carrying(trips, [(filled(0.0, FLOAT, H), FLOAT)], expect_chunk, "expect")[0]
    else:
        expect = b.op("Div", rest[0], s)
    logits = None
    if with_logits:  # [chunks, N, chunk] -> [N, V] (no rows: a [0, 0] from the Loop that ran no iteration)
        wide = b.op("Reshape", b.op("Transpose", stacked[1], perm=[1, 0, 2]),
                    b.op("Concat", n, b.op("Mul", t1, i64(chunk)), axis=0), allowzero=1)
        logits = b.op("Slice", wide, i64(0), i64(V), i64(1))
    return idx, entropy, sampled, expect, logits


def _step_inputs(b: Builder, cfg: TextConfig, md: int, ids_name: str, length: str):
    """The denoise step's inputs: token ids, positions, self-conditioning signal, temperature, uniforms."""
    return (b.input(ids_name, INT64, ["batch", length]), b.input("position_ids", INT64, ["batch", length]),
            b.input("sc_embeds", md, ["batch", length, cfg.hidden_size]), b.input("temperature", FLOAT, []),
            b.input("uniforms", FLOAT, ["batch", length]))


def build_denoise(cfg: TextConfig, store: WeightStore, md: int, with_logits: bool, emulate: bool = False,
                  progress=None, sparse_moe: bool = False, fused_attention: bool = False):
    b = Builder("dgport_denoise_step", store, md, emulate)
    m = Model(b, cfg, "decoder", sparse_moe, fused_attention)
    ids, pos, sc, temp, unif = _step_inputs(b, cfg, md, "canvas_ids", "canvas")
    pasts = cache_inputs(b, cfg, md)
    rope = m.rope_tables(pos)
    h = _denoise_input(b, m, cfg, ids, sc)
    for i in _layers(cfg, progress, "denoise layers"):
        h, _, _ = m.layer(i, h, rope, *pasts[i], None)
    _denoise_head(b, m, cfg, md, h, temp, unif, with_logits)
    return b


def build_step(cfg: TextConfig, store: WeightStore, md: int, with_logits: bool, progress=None,
               fused_attention: bool = False, quant: "QuantSpec | None" = None):
    """Encoder and denoiser in one graph (quantized exports), selected by the scalar input `denoise`:
    false: encode `input_ids` causally and return the extended cache (the encoder graph's contract;
    the sampler outputs are empty [B, 0]); true: one denoising step of the canvas `input_ids`
    (the denoise_step graph's contract; the present_* outputs are then to be discarded).
    Why one graph: onnxruntime repacks every constant 4/8-bit weight for its MatMulNBits kernel once
    per kernel, and two sessions (or two branches of an If) are two kernels per weight, so two
    packed copies of the model (and Python offers no shared prepacked-weights container). Here every
    weight feeds one MatMulNBits node, used by both modes. The modes differ only in the input
    embedding (self-conditioning), the causal mask, the layer scalars, and whether the head runs
    (on zero rows when encoding)."""
    b = Builder("dgport_step", store, md)
    m = Model(b, cfg, "joint", True, fused_attention, quant)
    ids, pos, sc, temp, unif = _step_inputs(b, cfg, md, "input_ids", "seq")
    den = b.input("denoise", BOOL, [])
    m.denoise = den
    pasts = cache_inputs(b, cfg, md)
    lf, ls = _past_lengths(b, cfg, pasts)
    m.build_masks(pos, lf, ls)
    m.masks = {k: b.op("Or", v, den) for k, v in m.masks.items()}  # the denoiser attends to everything
    rope = m.rope_tables(pos)
    e = m.embed(ids)
    h = b.op("Where", den, _denoise_input(b, m, cfg, ids, sc, e), e)
    trim = _sliding_tail(b, cfg)
    for i in _layers(cfg, progress, "step layers"):
        h, k_all, v_all = m.layer(i, h, rope, *pasts[i], pos)
        _present(b, cfg, md, i, *(trim(k_all, v_all) if cfg.is_sliding(i) else (k_all, v_all)))
    # the head on the first T rows when denoising, on none when encoding
    one = b.const(np.array([1], np.int64), INT64)
    zero = b.const(np.array([0], np.int64), INT64)
    rows = b.op("Mul", b.op("Slice", b.op("Shape", ids), one, b.const(np.array([2], np.int64), INT64)),
                b.op("Cast", b.op("Reshape", den, one), to=INT64))
    h = b.op("Slice", h, zero, rows, one)
    unif = b.op("Slice", unif, zero, rows, one)
    _denoise_head(b, m, cfg, md, h, temp, unif, with_logits)
    return b


def io_spec(b: Builder) -> dict:
    """Graph inputs/outputs (weights excluded) for the manifest."""
    def one(vi):
        t = vi.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": vi.name, "dtype": TensorProto.DataType.Name(t.elem_type).lower(), "shape": dims}

    return {"inputs": [one(v) for v in b.inputs if v.name not in b.weights],
            "outputs": [one(v) for v in b.outputs]}


# ----------------------------------------------------------------------------------- quantized weights


class QuantSpec:
    """A quantized export's weights in the graph (the scheme: exporters/quantize.py). Each quantized
    tensor `key` is stored as `key.q` (integers), `key.scale` (bf16) and `key.zp` (zero points) and
    dequantized with a blocked `DequantizeLinear` (opset 21) where it is used:
    - constant 2-D weights [in, out]: uint4 (or uint8) initializers into `DequantizeLinear(axis=0)`
      -> `MatMul`, the pattern onnxruntime fuses into its MatMulNBits kernel;
    - experts: one constant [in, out] weight per expert (`layers.{i}.experts.gate_up.{e}`), used by an
      unrolled expert loop (Model.unrolled_experts), so each fuses into MatMulNBits like the dense
      weights (a dense form of quantized experts is refused at export: 15x slower per step);
    - the embedding table [V, H] (8 bits, uint8: Gather has no 4-bit types, blocks along H): rows
      gathered then dequantized for the input embedding; the tied lm_head and the self-conditioning
      expectation p @ E read it a chunk of rows at a time (`table_rows`, in the streamed head's Loop),
      so neither an fp32 copy of the table (3 GB for the real vocabulary) nor a packed one exists."""

    def __init__(self, bits: int, group: int, tensors: dict):
        self.bits, self.group, self.tensors = bits, group, tensors
        self._made: dict = {}
        self.errors: dict = {}  # transformers tensor name -> relative Frobenius error of its weights
        self._expert_err: dict = {}

    def _one(self, w, bits: int):
        from .quantize import dequantize, quantize

        w = np.asarray(w, np.float32)
        t = quantize(w, bits, self.group)
        n = float(np.linalg.norm(w))
        return t, float(np.linalg.norm(dequantize(*t, self.group) - w)) / (n if n > 0 else 1.0)

    def _quantized(self, store, key: str, parts, transpose: bool, index: int | None = None):
        """(q [.., in, out] uint8 unpacked, scale float32 [.., in/g, out], zp uint8) of the parts
        (or of expert `index` of each) concatenated along the output axis; computed once per key
        (three stored tensors use it)."""
        if key not in self._made:
            self._made.clear()  # one key's arrays at a time: the store writes all three before the next
            bits = self.tensors[parts[0]][1]
            qs = []
            for p in parts:
                w = store.raw(p) if index is None else store.raw(p)[index]
                t, err = self._one(w, bits)
                if index is None:
                    self.errors[p] = err
                else:  # experts: the error over all of them, from each one's squared error and norm
                    n2 = float(np.linalg.norm(np.asarray(w, np.float32))) ** 2
                    acc = self._expert_err.setdefault(p, [0.0, 0.0])
                    acc[0] += err * err * (n2 if n2 > 0 else 1.0)
                    acc[1] += n2
                    self.errors[p] = float(np.sqrt(acc[0] / (acc[1] if acc[1] > 0 else 1.0)))
                qs.append(t)
            if transpose:
                qs = [tuple(np.swapaxes(a, -1, -2) for a in t) for t in qs]
            self._made[key] = tuple(np.concatenate([t[k] for t in qs], axis=-1) for k in range(3))
        return self._made[key]

    def _store(self, b: Builder, key: str, parts, transpose: bool, index: int | None = None):
        """Stores key.q / key.scale / key.zp: 4-bit integers and zero points as ONNX uint4 (two a byte),
        8-bit ones as uint8; scales as bf16."""
        from .quantize import pack4, to_bf16

        st = b.store
        bits = self.tensors[parts[0]][1]
        ints, label = (pack4, "uint4") if bits == 4 else ((lambda a: a), "uint8")

        def made(k):
            return self._quantized(st, key, parts, transpose, index)[k]

        q = b.weight(f"{key}.q", lambda: ints(made(0)), dtype=label)
        s = b.weight(f"{key}.scale", lambda: to_bf16(made(1)), dtype="bf16")
        z = b.weight(f"{key}.zp", lambda: ints(made(2)), dtype=label)
        return q, s, z, bits

    def constant(self, b: Builder, key: str, parts) -> str:
        q, s, z, _ = self._store(b, key, parts, transpose=True)
        return b.op("DequantizeLinear", q, b.cast(s, FLOAT), z, axis=0, block_size=self.group)

    def expert(self, b: Builder, key: str, hf_name: str, e: int) -> str:
        """Expert e's weights [in, out] fp32: its own constant initializers, dequantized (-> MatMulNBits)."""
        q, s, z, _ = self._store(b, f"{key}.{e}", [hf_name], transpose=True, index=e)
        return b.op("DequantizeLinear", q, b.cast(s, FLOAT), z, axis=0, block_size=self.group)

    def table_rows(self, b: Builder, key: str, hf_name: str, start: str, end: str) -> str:
        """Rows start:end of the 8-bit embedding table [V, H] as fp32 [rows, H] (the streamed head's
        chunks: sliced inside a Loop, so nothing is constant-folded into an fp32 copy of the table)."""
        q, s, z, _ = self._store(b, key, [hf_name], transpose=False)
        ax0 = b.const(np.array([0], np.int64), INT64)
        q, s, z = (b.op("Slice", t, start, end, ax0) for t in (q, s, z))
        return self._dequantize_rows(b, q, b.cast(s, FLOAT), z)

    def rows(self, b: Builder, key: str, hf_name: str, ids: str) -> str:
        """Rows ids [B, T] of the embedding table [V, H]: [B, T, H] fp32."""
        q, s, z, bits = self._store(b, key, [hf_name], transpose=False)
        if bits != 8:  # exporters/quantize.py keeps it at 8 bits: ONNX Gather has no 4-bit types
            raise ValueError("the embedding table must be 8-bit: its rows are gathered")
        q, s, z = (b.op("Gather", t, ids, axis=0) for t in (q, s, z))
        return self._dequantize_rows(b, q, b.cast(s, FLOAT), z)  # cast the gathered rows' scales, not the table

    def _dequantize_rows(self, b: Builder, q: str, s: str, z: str) -> str:
        """8-bit integers q [..., H] (groups along H), fp32 scales and zero points [..., H/g] ->
        (q - z) * s [..., H] fp32, as a per-axis DequantizeLinear over the groups ([N * H/g, g], axis 0)
        rather than a blocked one: the CUDA EP implements blocked (opset-21) DequantizeLinear for 4-bit
        types only and fails at run time on uint8 (onnxruntime PR 21846; quantize_linear.cc), while
        per-axis uint8 runs on every EP. The same fp32 numbers either way (the scheme's products are exact)."""
        flat = b.const(np.array([-1], np.int64), INT64)
        blocks = b.op("Reshape", q, b.const(np.array([-1, self.group], np.int64), INT64))
        deq = b.op("DequantizeLinear", blocks, b.op("Reshape", s, flat), b.op("Reshape", z, flat), axis=0)
        return b.op("Reshape", deq, b.op("Shape", q))
