"""The DiffusionGemma text stack as ONNX nodes (`Model`: embedding, layers, attention, experts), written
directly from a checkpoint's config and weights with `onnx.helper`, the way onnxruntime-genai's model
builder does: no tracing, one node per operation of the reference math (spec §3-§5, §10), standard ONNX
ops only (opset 21). The graphs themselves (encoder, denoise_step, the quantized joint step; their
inputs, masks and outputs) are assembled in exporters/onnx_steps.py.

Weights go through a `WeightStore` (exporters/onnx_builder.py, with the `Builder` every graph is
written with): each checkpoint tensor is transformed once (linear layers transposed to [in, out],
q/k/v and gate/up fused), written once into one external-data file (`weights.bin`) and referenced by
name from both graphs, so encoder and decoder share one copy on disk and (through
`SessionOptions.add_initializer`) one copy in memory. The head (lm_head and in-graph sampler) is in
exporters/onnx_head.py, quantized weights in exporters/onnx_quant.py.

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

import numpy as np
from onnx import helper

from dgport.config import TextConfig
from dgport.manifest_schema import MOE_FORMS
from .checkpoint import DEC
from .onnx_builder import FLOAT, FUSED_ATTENTION_OPSET, INT64, Builder
from .onnx_quant import QuantSpec


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


# ----------------------------------------------------------------------------------- model math


class Model:
    """The DiffusionGemma text stack on a Builder. `mode` is 'encoder', 'decoder' or 'joint' (both,
    selected by the bool tensor `self.denoise`: build_step)."""

    def __init__(self, b: Builder, cfg: TextConfig, mode: str, moe: str = "dense", fused_attention: bool = False,
                 quant: "QuantSpec | None" = None):
        if moe not in MOE_FORMS:
            raise ValueError(f"expert form {moe!r}: one of {MOE_FORMS}")
        self.b, self.cfg, self.mode, self.moe = b, cfg, mode, moe  # quantized exports always unroll (quant)
        self.fused_attention = fused_attention
        self.quant = quant
        self.denoise = None  # joint mode: the bool scalar input choosing the denoiser
        # per layer kind (sliding?), bool [B,1,1,T or 1,S] over [past ; new], True = attend: the graphs'
        # masks (onnx_steps.attention_masks); None attends to every key. `biases`, where set, are the
        # same masks as fp32 0 / -inf, added to the scores instead (cheaper than Where; x + 0 is x)
        self.masks: dict | None = None
        self.biases: dict | None = None
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
        if self.biases is not None:  # a zero bias leaves the scores bit for bit as they are
            sf = b.op("Add", sf, self.biases[sliding])
        elif self.masks is not None:  # so does an all-true mask
            sf = b.op("Where", self.masks[sliding], sf, b.const(np.float32(-np.inf), FLOAT))
        probs = b.op("Softmax", sf, axis=-1)
        probs = probs if b.emulate else b.to_md(probs)  # SDPA keeps fp32 probabilities
        o = b.op("MatMul", probs, b.op("Unsqueeze", v_all, one))  # [B,kv,g,T,d]
        return b.op("Reshape", o, b.const(np.array([0, nh, -1, d], np.int64), INT64))

    def fused_attend(self, q: str, k_all: str, v_all: str, sliding: bool) -> str:
        """The same as one ONNX `Attention` node (opset 23; 4-D inputs give the head counts; the
        boolean mask, True = attend). Runtimes choose the kernel (flash / memory-efficient
        attention on CUDA for half types); the rounding points inside it are the kernel's."""
        b = self.b
        ins = [q, k_all, v_all]
        if self.masks is not None:
            mask = self.masks[sliding]
            if self.mode == "decoder":  # [B,1,1,1,S] -> [B,1,1,T,S]: onnxruntime's kernel wants the query axis
                t = b.op("Slice", b.op("Shape", q), b.const(np.array([2], np.int64), INT64),
                         b.const(np.array([3], np.int64), INT64))
                one = b.const(np.array([1], np.int64), INT64)
                mask = b.op("Expand", mask, b.op("Concat", one, one, one, t, one, axis=0))
            ins.append(b.op("Squeeze", mask, b.const(np.array([2], np.int64), INT64)))  # [B,1,T,S]
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
        stacked = {  # [E, in, out] from HF's [E, out, in]
            "gate_up": lambda: np.ascontiguousarray(np.swapaxes(np.asarray(st.raw(p + "experts.gate_up_proj")), 1, 2)),
            "down": lambda: np.ascontiguousarray(np.swapaxes(np.asarray(st.raw(p + "experts.down_proj")), 1, 2))}
        if self.quant is not None:  # quantized (build_step): each expert its own constant, unrolled
            q = self.quant
            moe = self.unrolled_experts(
                y2, topi, topw, lambda e: q.expert(b, f"layers.{i}.experts.gate_up", p + "experts.gate_up_proj", e),
                lambda e: q.expert(b, f"layers.{i}.experts.down", p + "experts.down_proj", e))
        elif self.moe == "unrolled":  # each expert its own initializer over the stacked tensor's bytes
            moe = self.unrolled_experts(y2, topi, topw,
                                        lambda e: b.expert_weight(f"layers.{i}.experts.gate_up", stacked["gate_up"], e),
                                        lambda e: b.expert_weight(f"layers.{i}.experts.down", stacked["down"], e))
        else:  # the sparse loop gathers one expert's weights, then casts them (emulate mode)
            cast = self.moe != "sparse"
            wgu = b.weight(f"layers.{i}.experts.gate_up", stacked["gate_up"], cast=cast)
            wd = b.weight(f"layers.{i}.experts.down", stacked["down"], cast=cast)
            if self.moe == "grouped":
                from .onnx_grouped import grouped_experts

                moe = grouped_experts(self, y2, topi, topw, wgu, wd)
            elif self.moe == "sparse":
                moe = self.sparse_experts(y2, topi, topw, wgu, wd)
            else:
                moe = self.dense_experts(y2, probs, topi, topw, wgu, wd)
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

    def unrolled_experts(self, y2: str, topi: str, topw: str, wgu, wd) -> str:
        """The reference's loop over experts, unrolled (one block of nodes per expert, in expert order,
        so the sums round as the Loop's do); `wgu(e)`, `wd(e)` give expert e's [in, out] weights, each
        its own initializer. Quantized exports: onnxruntime fuses their DequantizeLinear -> MatMul into
        MatMulNBits with prepacked 4/8-bit blocks; inside a Loop they are gathered, and dequantizing
        a gathered expert costs ~20x its 16-row matmul (bench/bench_quant.py --experts-only). Float
        exports: the MatMuls read the mapped weights in place, where the Loop's Gather copies every
        expert every call."""
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
            g, u = b.op("Split", b.op("MatMul", x, wgu(e)), split, axis=-1, n_out=2)
            o = b.op("MatMul", b.op("Mul", self.gelu(g), u), wd(e))  # [n,H]
            scaled = self.round32(b.op("Mul", b.f32(o), b.op("Unsqueeze", b.op("Gather", w_e, rows, axis=0),
                                                                 self.ax_last)))
            added = self.round32(b.op("Add", b.op("Gather", acc, rows, axis=0), scaled))
            acc = b.op("ScatterND", acc, b.op("Unsqueeze", rows, self.ax_last), added)
        return acc if b.cdt == FLOAT else b.cast(acc, b.md)

    def round32(self, x32: str) -> str:
        """Round an fp32 tensor to the model dtype and keep it in fp32 (accumulators)."""
        b = self.b
        return x32 if b.md == FLOAT else b.cast(b.cast(x32, b.md), FLOAT)
