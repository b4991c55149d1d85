"""The vision graph (`vision.onnx`): Gemma 4's vision tower and DiffusionGemma's multimodal embedder,
from patches to soft tokens in the text width (transformers' Gemma4VisionModel + embed_vision).

    pixel_values [N, P, 3 * patch**2] float32, pixel_position_ids [N, P, 2] int64 ((x, y); (-1, -1) pads)
      -> soft_tokens [N, P / k**2, H] (float32 holding export-dtype values; an image's first `soft_tokens` rows are its own,
         the rest pool only padding)

Built from the config with the same Builder as the text graphs: the weights live in the export's
weights.bin in its dtype and the graph computes in fp32 (half-precision weights are cast where used).
Attention is bidirectional over an image's patches with padding keys masked; 2-D axial RoPE rotates
the first half of each head by x and the second by y; k x k average pooling by position, then
sqrt(width) scaling, optional standardization, a scale-less RMSNorm and the projection."""
from __future__ import annotations

import numpy as np

from dgport.vision_config import VisionConfig, expected_vision_tensors

from .onnx_builder import FLOAT, INT64, UINT8, Builder

VT = "model.encoder.vision_tower."
EMB = "model.encoder.embed_vision."


class Vision:
    def __init__(self, b: Builder, cfg: VisionConfig, attention: str = "explicit", quant=None):
        self.b, self.cfg, self.attention, self.quant = b, cfg, attention, quant
        self._rows: dict = {}  # an input's int8 rows and scales (RowInt8 linears)
        self.eps = b.const(np.float32(cfg.rms_norm_eps), FLOAT)
        self.neg_half = b.const(np.float32(-0.5), FLOAT)
        self.last = b.const(np.array([-1], np.int64), INT64)

    def w(self, hf: str, transpose: bool = False) -> str:
        b = self.b
        return b.weight(hf, lambda: np.asarray(b.store.raw(hf)).T if transpose else b.store.raw(hf))

    def w32(self, hf: str) -> str:
        b = self.b
        return b.weight(hf, lambda: np.asarray(b.store.raw(hf)).astype(np.float32), "fp32")

    def rms(self, x: str, weight: str | None) -> str:
        b = self.b
        ms = b.op("ReduceMean", b.op("Mul", x, x), self.last, keepdims=1)
        y = b.op("Mul", x, b.op("Pow", b.op("Add", ms, self.eps), self.neg_half))
        return y if weight is None else b.op("Mul", y, weight)

    def fused_linear(self, x: str, prefixes: list[str]) -> list[str]:
        """Several unclipped linears of one input as one MatMul on their weights side by side (q/k/v,
        gate/up: one wider GEMM), split again; clipped linears (bounds of their own) one at a time."""
        b = self.b
        if self.cfg.clipped_linears or len(prefixes) == 1:
            return [self.linear(x, p) for p in prefixes]
        names = [p + "linear.weight" for p in prefixes]
        key = names[0].removesuffix(".weight") + "+" + "+".join(n.split(".")[-3] for n in names[1:])
        return b.op("Split", self.product(x, names, key), b.const(np.array(self.widths(prefixes), np.int64), INT64),
                    axis=-1, n_out=len(names))

    def product(self, x: str, names: list[str], key: str) -> str:
        """x times the weights of `names` side by side ([in, sum of outs], stored under `key`): int8 rows,
        integer blocks (MatMulNBits) or the export's float weights, as the export quantizes them."""
        b = self.b
        spec = self.quant.get(names[0]) if self.quant else None
        if isinstance(spec, RowInt8):
            return self.int8_matmul(x, spec, key, names)
        if spec is not None:  # blocked integers -> MatMulNBits
            return b.op("MatMul", x, spec.constant(b, key, names))
        if len(names) == 1:
            return b.op("MatMul", x, self.w(names[0], transpose=True))
        return b.op("MatMul", x, b.weight(key, lambda: np.concatenate([np.asarray(b.store.raw(n)).T for n in names],
                                                                        axis=1)))

    def int8_matmul(self, x: str, spec: RowInt8, key: str, names) -> str:
        """x [N, P, in] fp32 times the int8 weights of `names` side by side (RowInt8) -> [N, P, out] fp32."""
        b = self.b
        wq = b.weight(f"{key}.w8", lambda: spec.quantized(b.store, key, names)[0], dtype="int8")
        ws = b.weight(f"{key}.wscale", lambda: spec.quantized(b.store, key, names)[1], "fp32")
        if x not in self._rows:  # one quantization of an input for all the linears that read it
            m = b.op("Max", b.op("ReduceMax", b.op("Abs", x), self.last, keepdims=1), b.const(np.float32(1e-30), FLOAT))
            sx = b.op("Div", m, b.const(np.float32(127), FLOAT))
            xq = b.op("Add", b.op("Round", b.op("Div", x, sx)), b.const(np.float32(128), FLOAT))
            self._rows[x] = (b.cast(xq, UINT8), sx)
        xq, sx = self._rows[x]
        y = b.op("MatMulInteger", xq, wq, b.const(np.uint8(128), UINT8))
        return b.op("Mul", b.op("Mul", b.cast(y, FLOAT), sx), ws)

    def widths(self, prefixes: list[str]) -> list[int]:
        c = self.cfg
        w = {"q_proj.": c.num_heads * c.head_dim, "k_proj.": c.kv_heads * c.head_dim, "v_proj.": c.kv_heads * c.head_dim,
             "gate_proj.": c.intermediate_size, "up_proj.": c.intermediate_size}
        return [w[p.split(".")[-2] + "."] for p in prefixes]

    def linear(self, x: str, prefix: str) -> str:
        """A Gemma4ClippableLinear: clamp the input, multiply, clamp the output (when the config clips)."""
        b, clip = self.b, self.cfg.clipped_linears
        if clip:
            x = b.op("Clip", x, self.w32(prefix + "input_min"), self.w32(prefix + "input_max"))
        name = prefix + "linear.weight"
        y = self.product(x, [name], name.removesuffix(".weight"))
        if clip:
            y = b.op("Clip", y, self.w32(prefix + "output_min"), self.w32(prefix + "output_max"))
        return y

    def rope(self, x: str, tables) -> str:
        """x [N, P, heads, d]: the first d/2 channels rotated by x positions, the rest by y positions."""
        b, d = self.b, self.cfg.head_dim
        halves = b.op("Split", x, b.const(np.array([d // 2, d // 2], np.int64), INT64), axis=-1, n_out=2)
        out = []
        for part, (cos, sin) in zip(halves, tables):
            p1, p2 = b.op("Split", part, b.const(np.array([d // 4, d // 4], np.int64), INT64), axis=-1, n_out=2)
            rot = b.op("Concat", b.op("Neg", p2), p1, axis=-1)
            out.append(b.op("Add", b.op("Mul", part, cos), b.op("Mul", rot, sin)))
        return b.op("Concat", *out, axis=-1)

    def rope_tables(self, pos32: str):
        """(cos, sin) [N, P, 1, d/2] for the x and the y axis."""
        b, d = self.b, self.cfg.head_dim
        spatial = d // 2
        inv = (1.0 / (np.float32(self.cfg.rope_theta) ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial)))
        inv = b.const(inv.astype(np.float32), FLOAT)
        tables = []
        for axis in (0, 1):
            p = b.op("Gather", pos32, b.const(np.int64(axis), INT64), axis=2)  # [N, P]
            f = b.op("Mul", b.op("Unsqueeze", p, self.last), inv)  # [N, P, d/4]
            f = b.op("Unsqueeze", b.op("Concat", f, f, axis=-1), b.const(np.array([2], np.int64), INT64))
            tables.append((b.op("Cos", f), b.op("Sin", f)))
        return tables

    def heads(self, x: str, n: int) -> str:
        return self.b.op("Reshape", x, self.b.const(np.array([0, 0, n, self.cfg.head_dim], np.int64), INT64))

    def layer(self, i: int, h: str, bias: str, tables) -> str:
        b, c = self.b, self.cfg
        p = f"{VT}encoder.layers.{i}."
        a = p + "self_attn."
        y = self.rms(h, self.w(p + "input_layernorm.weight"))
        q, k, v = self.fused_linear(y, [a + "q_proj.", a + "k_proj.", a + "v_proj."])
        q = self.rope(self.rms(self.heads(q, c.num_heads), self.w(a + "q_norm.weight")), tables)
        k = self.rope(self.rms(self.heads(k, c.kv_heads), self.w(a + "k_norm.weight")), tables)
        v = self.rms(self.heads(v, c.kv_heads), None)
        if self.attention == "fused":
            o = self.fused_attend(q, k, v, bias)
        else:
            o = self.attend(q, k, v, bias)
        o = self.rms(self.linear(o, a + "o_proj."), self.w(p + "post_attention_layernorm.weight"))
        h = b.op("Add", h, o)
        m = f"{p}mlp."
        y = self.rms(h, self.w(p + "pre_feedforward_layernorm.weight"))
        gate, up = self.fused_linear(y, [m + "gate_proj.", m + "up_proj."])
        y = b.op("Mul", b.op("Gelu", gate, approximate="tanh"), up)
        y = self.rms(self.linear(y, m + "down_proj."), self.w(p + "post_feedforward_layernorm.weight"))
        return b.op("Add", h, y)

    def fused_attend(self, q: str, k: str, v: str, mask: str) -> str:
        """One ONNX `Attention` node (opset 23) on [N, heads, P, d] (the head counts from the 4-D shapes),
        scaling 1, the boolean key mask expanded over the queries ([N, 1, P, P]: onnxruntime's kernel
        wants the query axis) -> [N, P, heads * d]."""
        b, c = self.b, self.cfg
        q, k, v = (b.op("Transpose", t, perm=[0, 2, 1, 3]) for t in (q, k, v))
        o = b.op("Attention", q, k, v, mask, scale=1.0)
        return b.op("Reshape", b.op("Transpose", o, perm=[0, 2, 1, 3]),
                    b.const(np.array([0, 0, c.num_heads * c.head_dim], np.int64), INT64))

    def attend(self, q: str, k: str, v: str, bias: str) -> str:
        """Spelled out: [N, kv, g, P, P] fp32 scores, softmax, values -> [N, P, heads * d]."""
        b, c = self.b, self.cfg
        g = c.num_heads // c.kv_heads
        # [N, kv, g, P, d] queries against [N, kv, 1, P, d] keys: grouped heads without copying K/V
        q = b.op("Reshape", b.op("Transpose", q, perm=[0, 2, 1, 3]),
                 b.const(np.array([0, c.kv_heads, g, -1, c.head_dim], np.int64), INT64))
        k = b.op("Unsqueeze", b.op("Transpose", k, perm=[0, 2, 1, 3]), b.const(np.array([2], np.int64), INT64))
        v = b.op("Unsqueeze", b.op("Transpose", v, perm=[0, 2, 1, 3]), b.const(np.array([2], np.int64), INT64))
        scores = b.op("Add", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 2, 4, 3])), bias)  # scaling 1
        o = b.op("MatMul", b.op("Softmax", scores, axis=-1), v)  # [N, kv, g, P, d]
        o = b.op("Reshape", o, b.const(np.array([0, c.num_heads, -1, c.head_dim], np.int64), INT64))
        return b.op("Reshape", b.op("Transpose", o, perm=[0, 2, 1, 3]),
                    b.const(np.array([0, 0, c.num_heads * c.head_dim], np.int64), INT64))

    def pool(self, h: str, pos: str, pad: str, n_patches: str) -> str:
        """Average k x k patches by position into P / k**2 soft tokens ([N, S, D]), then scale by sqrt(D)."""
        b, k = self.b, self.cfg.pooling_kernel_size
        h = b.op("Where", b.op("Unsqueeze", pad, self.last), b.const(np.float32(0), FLOAT), h)
        if k > 1:
            clamped = b.op("Max", pos, b.const(np.int64(0), INT64))
            kidx = b.op("Div", clamped, b.const(np.int64(k), INT64))  # floor: non-negative
            kx = b.op("Gather", kidx, b.const(np.int64(0), INT64), axis=2)
            ky = b.op("Gather", kidx, b.const(np.int64(1), INT64), axis=2)
            max_x = b.op("Add", b.op("ReduceMax", b.op("Gather", clamped, b.const(np.int64(0), INT64), axis=2),
                                     self.last, keepdims=1), b.const(np.int64(1), INT64))
            idx = b.op("Add", kx, b.op("Mul", b.op("Div", max_x, b.const(np.int64(k), INT64)), ky))  # [N, P]
            n_out = b.op("Div", n_patches, b.const(np.array([k * k], np.int64), INT64))
            slots = b.op("Range", b.const(np.int64(0), INT64), b.op("Squeeze", n_out), b.const(np.int64(1), INT64))
            onehot = b.op("Equal", b.op("Unsqueeze", idx, self.last), slots)  # [N, P, S]
            weights = b.op("Div", b.cast(onehot, FLOAT), b.const(np.float32(k * k), FLOAT))
            h = b.op("MatMul", b.op("Transpose", weights, perm=[0, 2, 1]), h)
        return b.op("Mul", h, b.const(np.float32(self.cfg.hidden_size ** 0.5), FLOAT))

    def build(self) -> None:
        b, c = self.b, self.cfg
        pv = b.input("pixel_values", FLOAT, ["N", "P", 3 * c.patch_size ** 2])
        pos = b.input("pixel_position_ids", INT64, ["N", "P", 2])
        minus = b.const(np.int64(-1), INT64)
        px = b.op("Gather", pos, b.const(np.int64(0), INT64), axis=2)
        py = b.op("Gather", pos, b.const(np.int64(1), INT64), axis=2)
        pad = b.op("And", b.op("Equal", px, minus), b.op("Equal", py, minus))  # [N, P]
        # patch embedding: 2 * (pixels - 0.5) projected, plus the x and y position embeddings (none on padding)
        x = b.op("Mul", b.op("Sub", pv, b.const(np.float32(0.5), FLOAT)), b.const(np.float32(2), FLOAT))
        h = b.op("MatMul", x, self.w(VT + "patch_embedder.input_proj.weight", transpose=True))
        table = VT + "patch_embedder.position_embedding_table"
        clamped = b.op("Max", pos, b.const(np.int64(0), INT64))
        cx = b.op("Gather", clamped, b.const(np.int64(0), INT64), axis=2)
        cy = b.op("Gather", clamped, b.const(np.int64(1), INT64), axis=2)
        tx = b.weight(table + ".x", lambda: np.asarray(b.store.raw(table))[0])
        ty = b.weight(table + ".y", lambda: np.asarray(b.store.raw(table))[1])
        pe = b.op("Add", b.op("Gather", tx, cx, axis=0), b.op("Gather", ty, cy, axis=0))
        pe = b.op("Where", b.op("Unsqueeze", pad, self.last), b.const(np.float32(0), FLOAT), pe)
        h = b.op("Add", h, pe)
        if self.attention == "fused":  # True = attend: [N, 1, P, P] (every query row the same)
            keep = b.op("Unsqueeze", b.op("Not", pad), b.const(np.array([1, 2], np.int64), INT64))  # [N, 1, 1, P]
            n_p = b.op("Gather", b.op("Shape", pv), b.const(np.array([1], np.int64), INT64))
            one = b.const(np.array([1], np.int64), INT64)
            bias = b.op("Expand", keep, b.op("Concat", one, one, n_p, one, axis=0))
        else:  # keys that are padding never attended: 0 / -inf per key, [N, 1, 1, 1, P]
            bias = b.op("Where", pad, b.const(np.float32(-np.inf), FLOAT), b.const(np.float32(0), FLOAT))
            bias = b.op("Unsqueeze", bias, b.const(np.array([1, 2, 3], np.int64), INT64))
        tables = self.rope_tables(b.cast(pos, FLOAT))
        for i in range(c.num_layers):
            h = self.layer(i, h, bias, tables)
        n_patches = b.op("Gather", b.op("Shape", pv), b.const(np.array([1], np.int64), INT64))
        h = self.pool(h, pos, pad, n_patches)
        if c.standardize:
            h = b.op("Mul", b.op("Sub", h, self.w32(VT + "std_bias")), self.w32(VT + "std_scale"))
        h = b.op("MatMul", self.rms(h, None), self.w(EMB + "embedding_projection.weight", transpose=True))
        # float32 out, rounded to the export dtype (transformers casts the tower's output to the embedding dtype)
        b.output("soft_tokens", b.to_md(h), FLOAT, ["N", "S", c.text_hidden_size])


# The tower's form, chosen by measurement (bench/RESULTS.md, 2026-12-06; real geometry, 2,520 patches, 2 threads):
# one Attention node a layer is as exact as the spelled-out form and faster. In quantized exports its
# linears are int8 ("rows": each patch's activations quantized symmetrically on the fly, int8 weights
# per output column, MatMulInteger: onnxruntime's u8s8 GEMM), which beat 8-bit blocks (MatMulNBits,
# "blocks") at cosine 0.9996 to fp32's soft tokens; 4-bit blocks were slower still and at 0.98.
ATTENTION = "fused"
VISION_BITS = 8
VISION_QUANT = "rows"
W8_MAX = 63  # the int8 tower's weights use 7 bits: u8 x s8 pair sums fit 16 bits without VNNI (RowInt8)


class RowInt8:
    """The tower's linears as int8 (the "rows" form): weights [in, out] symmetric per output column in
    7 bits (`key.w8` int8 in [-W8_MAX, W8_MAX], `key.wscale` fp32 [out]); at run time each row of the
    input symmetric over its features, as uint8 with zero point 128 ((x / s + 128), s = max|x| / 127),
    into `MatMulInteger`, then the int32 product times both scales. Stock operators (opset 10).

    Why 7 bits: on x86 CPUs without VNNI, onnxruntime's u8 x s8 GEMM adds products in pairs into
    saturating 16-bit lanes (vpmaddubsw): 2 x 255 x 127 overflows them and the answer would be silently
    wrong; 2 x 255 x 63 = 32,130 fits, on every CPU (onnxruntime's own quantizer calls this reduce_range)."""
    bits, group, form = 8, None, "rows"

    def __init__(self):
        self.tensors: dict = {}
        self.errors: dict = {}
        self._made: dict = {}

    def quantized(self, store, key: str, names) -> tuple[np.ndarray, np.ndarray]:
        if key not in self._made:
            self._made.clear()
            ws = [np.asarray(store.raw(n), np.float32).T for n in names]
            w = np.concatenate(ws, axis=1)
            s = np.abs(w).max(axis=0) / W8_MAX
            s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
            q = np.clip(np.rint(w / s), -W8_MAX, W8_MAX).astype(np.int8)
            col = 0
            for n, part in zip(names, ws):
                d = q[:, col:col + part.shape[1]].astype(np.float32) * s[col:col + part.shape[1]] - part
                self.errors[n] = float(np.linalg.norm(d) / max(float(np.linalg.norm(part)), 1e-30))
                col += part.shape[1]
            self._made[key] = (q, s)
        return self._made[key]


def vision_quant(cfg: VisionConfig, group: int, bits: int | None = None, form: str = VISION_QUANT) -> dict:
    """{linear weight name: its quantization} of a quantized export's tower (the encoder layers' linears).
    "rows": every linear, RowInt8. "blocks": VISION_BITS-bit blocks (QuantSpec) of the export's group
    size, or the largest of 32 and 16 below it that divides the linear's input width (the real MLP's
    4,304); a linear none divides stays fp32. (`bits`, "blocks" at other than VISION_BITS: for
    bench/bench_vision.py's comparison only.)"""
    from .onnx_quant import QuantSpec

    specs: dict = {}
    out = {}
    for name, shape in expected_vision_tensors(cfg).items():
        if not name.endswith("linear.weight"):
            continue
        if form == "rows":
            out[name] = specs.setdefault("rows", RowInt8())
            out[name].tensors[name] = ("vision tower", 8)
            continue
        g = next((g for g in (group, 32, 16) if g <= group and shape[-1] % g == 0), None)
        if g is not None:
            out[name] = specs.setdefault(g, QuantSpec(bits or VISION_BITS, g, {}))
            out[name].tensors[name] = ("vision tower", bits or VISION_BITS)
    return out


def build_vision(cfg: VisionConfig, store, md: int, attention: str = ATTENTION, quant=None) -> Builder:
    """The vision graph on a Builder (weights written to `store`; computed in fp32): `.model()` is the
    ONNX model, `.weights` the weights it reads. `attention`: "explicit" (MatMul, Softmax, MatMul) or
    "fused" (one opset-23 Attention node a layer); `quant`: {linear's weight name: the QuantSpec
    (bits, group) it is stored with} as blocked integers (DequantizeLinear -> MatMul, fused into MatMulNBits)."""
    b = Builder("dgport_vision", store, md, emulate=md != FLOAT)
    if attention == "fused":
        b.opset = max(b.opset, 23)
    Vision(b, cfg, attention, quant).build()
    return b
