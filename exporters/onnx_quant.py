"""A quantized export's weights in the graph: stored as blocked integers and dequantized with
standard `DequantizeLinear` where each is used (the numpy scheme itself: exporters/quantize.py)."""
from __future__ import annotations

import numpy as np

from .onnx_builder import FLOAT, INT64, Builder


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
