"""Grouped experts: every expert's tokens in one batched product per projection (`--encoder-moe` /
`--denoise-moe grouped`; docs/GRAPH_CONTRACT.md, "Expert forms").

The reference runs a loop over experts, each on the few tokens routed to it (the sparse form: an
ONNX `Loop`; 128 iterations per layer, each with its NonZero, Gathers and a ScatterND around two
~16-row products). The grouped form computes the same function with a fixed number of nodes:

1. routing as in the reference (top-k of the softmax, renormalized, times the per-expert scale);
   each token's k choices ordered by expert id, so the final sums add in the reference's order;
2. token-expert pairs p = (token n, choice j); per expert its count, and per pair its rank among
   the pairs of its expert (an exclusive CumSum over a [pairs, experts] one-hot);
3. capacity `cap` = the largest count of this call's routing (never a token dropped); pair p goes to
   slot `expert * cap + rank`; every other slot reads an appended zero row;
4. gate/up and down as batched MatMuls over [experts, cap, width] (each expert's weights once);
5. each pair's output row gathered back from its slot, scaled by its routing weight and rounded to
   the model dtype, and the k rows of a token added in ascending expert order, rounding after each
   add, exactly as the reference's `index_add_` over experts in order.

Padding waste is experts * cap / pairs - 1: measured on real routing in bench/RESULTS.md
(`python -m bench.bench_grouped --waste`).
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from .onnx_builder import FLOAT, INT64


def grouped_experts(m, y2: str, topi: str, topw: str, wgu: str, wd: str) -> str:
    """y2 [N, H] (compute dtype), topi / topw [.., K] (int64 / fp32), wgu [E, H, 2M], wd [E, M, H] in the
    compute dtype -> the experts' weighted sum [N, H] (fp32 compute: md-rounded values in fp32, as the
    sparse form returns them; then cast to md like it)."""
    b, cfg = m.b, m.cfg
    M, E, K = cfg.moe_intermediate_size, cfg.num_experts, cfg.top_k_experts

    def i64(v):
        return b.const(np.array(v, np.int64), INT64)

    flat = i64([-1, K])
    topi, topw = b.op("Reshape", topi, flat), b.op("Reshape", topw, flat)  # [N,K]
    # each token's choices in ascending expert order (the reference adds its experts' outputs in that order)
    order = b.op("TopK", b.cast(topi, FLOAT), i64([K]), axis=-1, largest=0, sorted=1, n_out=2)[1]  # [N,K]
    topi = b.op("GatherElements", topi, order, axis=-1)
    topw = b.op("GatherElements", topw, order, axis=-1)
    pair_e = b.op("Reshape", topi, i64([-1]))  # [P], P = N*K, pair p = token p // K, choice p % K
    n_tok = b.op("Slice", b.op("Shape", y2), i64([0]), i64([1]))  # [1]
    n_pairs = b.op("Mul", n_tok, i64([K]))
    pair_tok = b.op("Div", b.op("Range", i64(0), b.op("Squeeze", n_pairs, i64([0])), i64(1)), i64(K))  # [P]
    onehot = b.cast(b.op("Equal", b.op("Unsqueeze", pair_e, i64([1])), i64(np.arange(E))), INT64)  # [P,E]
    counts = b.op("ReduceSum", onehot, i64([0]), keepdims=0)  # [E]
    cap = b.op("ReduceMax", counts, keepdims=1)  # [1]: the largest count, so no pair is ever dropped
    before = b.op("CumSum", onehot, i64(0), exclusive=1)  # [P,E]: earlier pairs of each expert
    rank = b.op("GatherElements", before, b.op("Unsqueeze", pair_e, i64([1])), axis=1)  # [P,1]
    slot = b.op("Add", b.op("Mul", b.op("Unsqueeze", pair_e, i64([1])), cap), rank)  # [P,1] in [0, E*cap)
    # slot -> token row; empty slots read row N, a zero row appended to the tokens
    n_slots = b.op("Mul", i64([E]), cap)
    rows = b.op("ScatterND", b.op("Expand", n_tok, n_slots), slot, pair_tok)  # [E*cap]
    zero_row = b.op("ConstantOfShape", b.op("Slice", b.op("Shape", y2), i64([1]), i64([2])),
                    value=helper.make_tensor("zero", FLOAT, [1], [0.0]))
    zero_row = b.op("Unsqueeze", zero_row if b.cdt == FLOAT else b.cast(zero_row, b.cdt), i64([0]))  # [1,H]
    xs = b.op("Gather", b.op("Concat", y2, zero_row, axis=0), rows, axis=0)  # [E*cap, H]
    xs = b.op("Reshape", xs, b.op("Concat", i64([E]), cap, i64([-1]), axis=0))  # [E, cap, H]
    g, u = b.op("Split", b.op("MatMul", xs, wgu), i64([M, M]), axis=-1, n_out=2)
    o = b.op("MatMul", b.op("Mul", m.gelu(g), u), wd)  # [E, cap, H]
    o = b.op("Reshape", o, b.op("Concat", n_slots, i64([-1]), axis=0))  # [E*cap, H]
    per_pair = b.op("Gather", o, b.op("Squeeze", slot, i64([1])), axis=0)  # [P, H]
    per_pair = b.op("Reshape", per_pair, b.op("Concat", n_tok, i64([K, -1]), axis=0))  # [N,K,H]
    scaled = m.round32(b.op("Mul", b.f32(per_pair), b.op("Unsqueeze", topw, i64([-1]))))  # [N,K,H] fp32
    parts = b.op("Split", scaled, i64([1] * K), axis=1, n_out=K) if K > 1 else [scaled]
    acc = parts[0]  # 0 + s is s exactly: the reference's first index_add_
    for part in parts[1:]:
        acc = m.round32(b.op("Add", acc, part))
    acc = b.op("Squeeze", acc, i64([1]))  # [N,H]
    return acc if b.cdt == FLOAT else b.cast(acc, b.md)
