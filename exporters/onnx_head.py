"""The denoise step's head, in the graph: final norm, the tied lm_head, the fp32 softcap, the
sampler (argmax, entropy, the inverse-CDF draw at the given uniforms) and the next step's
self-conditioning input p @ E. Graphs that compute in fp32 stream the vocabulary (`_streamed_head`);
half-precision GPU graphs use whole [N, V] arrays (`_whole_head`)."""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto, helper

from dgport.config import TextConfig

from .checkpoint import DEC
from .onnx_builder import BOOL, FLOAT, INT64, Builder

if TYPE_CHECKING:
    from .onnx_graph import Model

VOCAB_CHUNK = 4096  # vocabulary rows per chunk of the table in the streamed head (_streamed_head; measured, RESULTS)
# a disallowed token's logit / T under a vocabulary constraint: finite (exp gives 0, and 0 * it is 0 in the
# entropy's sums, where -inf would give NaN), far below any allowed one (|softcapped logit| <= the cap)
MASKED = -1e30


def constraint_inputs(b: Builder, V: int, like: str) -> tuple[str, str]:
    """The vocabulary-constraint inputs, both with defaults (docs/GRAPH_CONTRACT.md): `token_masks`
    bool [K, V] (row k: the tokens class k allows; default one all-true row) and `token_classes` int64
    [B, C] (each position's class; default [[0]], broadcast to the canvas). Returns the masks and the
    classes expanded to the shape of `like` ([B, C] ids)."""
    masks = b.optional_input("token_masks", BOOL, ["mask_rows", V], np.ones((1, V), np.bool_))
    cls = b.optional_input("token_classes", INT64, ["class_batch", "class_canvas"], np.zeros((1, 1), np.int64))
    return masks, b.op("Expand", cls, b.op("Shape", like))


def _constrained(b: Builder, classes: str) -> str:
    """The bool scalar: some position has a class other than 0 (else the table is not read at all)."""
    some = b.op("ReduceSum", b.cast(b.op("Greater", classes, b.const(np.int64(0), INT64)), INT64), keepdims=0)
    return b.op("Greater", some, b.const(np.int64(0), INT64))


def _tables(b: Builder, masks: str) -> tuple[str, str]:
    """The bool table as two float [K, V] tables: `keep` (1 allowed, 0 not) and `bias` (0 allowed, MASKED
    not). Masking with them is an Add and Muls (onnxruntime's Where is ~15x slower than a Mul)."""
    keep = b.cast(masks, FLOAT)
    bias = b.op("Mul", b.op("Sub", b.const(np.float32(1), FLOAT), keep), b.const(np.float32(MASKED), FLOAT))
    return keep, bias


def _rows_of(b: Builder, con, table: str, cols=None) -> str:
    """[N, V] (or [N, chunk] for the vocabulary slice `cols` = (start, end)): each row's line of `table`."""
    if cols is not None:
        table = b.op("Slice", table, *cols, b.const(np.array([1], np.int64), INT64))
    return b.op("Gather", table, con[1], axis=0)


def _divide(b: Builder, logits: str, temp: str, con) -> str:
    """logits / T; under a constraint (con = (masks, flat classes [N], active)), disallowed tokens' values
    are MASKED (x + MASKED is MASKED; x + 0 is x), in an If taken only when some class is not 0 (so an
    unconstrained step runs the Div alone, as before)."""
    if con is None:
        return b.op("Div", logits, temp)

    def masked():
        _, bias = _tables(b, con[0])
        return [b.op("Add", b.op("Div", logits, temp), _rows_of(b, con, bias))]

    return b.if_else(con[2], masked, lambda: [b.op("Div", logits, temp)], [(FLOAT, 2)])[0]


def denoise_head(b: Builder, m: Model, cfg: TextConfig, md: int, h: str, temp: str, unif: str,
                 with_logits: bool, constraint: tuple[str, str] | None = None) -> None:
    """Final norm, tied lm_head, fp32 softcap and the in-graph sampler of the last hidden states h
    [B, C, H] at temperature `temp` ([] or [B]): the outputs argmax_ids, entropy, sampled_ids,
    next_sc_embeds (and logits, unmasked). `constraint`: (token_masks, classes [B, C]) from
    constraint_inputs: the sampler's distribution allows only each position's class of tokens."""
    H, V = cfg.hidden_size, cfg.vocab_size
    h = m.rms(h, m.vec32(f"{DEC}norm.weight"))
    flat = b.op("Reshape", h, b.const(np.array([-1, H], np.int64), INT64))
    bc = b.op("Slice", b.op("Shape", h), b.const(np.array([0], np.int64), INT64),
              b.const(np.array([2], np.int64), INT64))
    unif = b.op("Reshape", unif, b.const(np.array([-1], np.int64), INT64))  # [N], like flat's rows
    temp = _row_temperatures(b, temp, bc, flat)
    con = None
    if constraint is not None:
        classes = b.op("Reshape", constraint[1], b.const(np.array([-1], np.int64), INT64))  # [N]
        con = (constraint[0], classes, _constrained(b, classes))
    if b.cdt == FLOAT:  # fp32 and quantized exports, the CPU's fp32-compute graphs of bf16 ones
        argmax, entropy, sampled, expect, logits = _streamed_head(b, m, cfg, md, flat, temp, unif, with_logits, con)
    else:
        argmax, entropy, sampled, expect, logits = _whole_head(b, m, cfg, flat, temp, unif, con)
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


def _row_temperatures(b: Builder, temp: str, bc: str, flat: str) -> str:
    """The temperature input, a scalar [] or one per row [B], as a column [N, 1] over flat's rows
    (row-major [B, C]): [] or [B] -> [1 or B, 1] -> [B, C] -> [N, 1]. Exact copies of the given
    values, so a scalar divides every logit by the same float as before."""
    col = b.op("Reshape", temp, b.const(np.array([-1, 1], np.int64), INT64))
    n1 = b.op("Concat", b.op("Slice", b.op("Shape", flat), b.const(np.array([0], np.int64), INT64),
                             b.const(np.array([1], np.int64), INT64)), b.const(np.array([1], np.int64), INT64), axis=0)
    return b.op("Reshape", b.op("Expand", col, bc), n1, allowzero=1)


def _softcap(b: Builder, cfg: TextConfig, lg: str) -> str:
    cap = b.const(np.float32(cfg.final_logit_softcapping), FLOAT)
    return b.op("Mul", b.op("Tanh", b.op("Div", lg, cap)), cap)


def _whole_head(b: Builder, m: Model, cfg: TextConfig, flat: str, temp: str, unif: str, con=None):
    """The head over whole [N, V] arrays, for graphs that compute in half precision (the GPU graphs of
    fp16/bf16 exports: one half-precision GEMM each for the logits and p @ E) of flat [N, H] with
    uniforms [N]: argmax, entropy, sampled ids [N], the expectation p @ E [N, H] and the logits [N, V]."""
    V = cfg.vocab_size
    E = m.embedding()
    logits = _softcap(b, cfg, b.f32(b.op("Gemm", flat, E, transB=1)))  # tied lm_head, one copy of the table
    proc = _divide(b, logits, temp, con)
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
                   with_logits: bool, con=None):
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

    def masked_online(mx, s, x, keep):
        """online() over the allowed entries of x (keep 1; the others MASKED): their exp is 0, computed as
        exp(0) * 0, never as the exp of a huge negative (onnxruntime's Exp runs ~30x slower on arguments
        below -87, whose results are denormal or 0)."""
        mx_new = b.op("Max", mx, b.op("ReduceMax", x, m.ax_last, keepdims=1))
        alpha = b.op("Exp", b.op("Sub", mx, mx_new))
        d = b.op("Sub", x, mx_new)
        e = b.op("Mul", b.op("Exp", b.op("Mul", d, keep)), keep)
        se = b.op("ReduceSum", e, m.ax_last, keepdims=1)
        return mx_new, b.op("Add", b.op("Mul", s, alpha), se), alpha, d, e, se

    def chunk_core(capped, mx, s, cols, tables):
        """(proc, and online()'s six values) of a chunk of softcapped logits; `tables` (keep, bias) [K, V]
        under a constraint, None without."""
        if tables is None:
            proc = b.op("Div", capped, temp)
            return (proc, *online(mx, s, proc))
        proc = b.op("Add", b.op("Div", capped, temp), _rows_of(b, con, tables[1], cols))
        return (proc, *masked_online(mx, s, proc, _rows_of(b, con, tables[0], cols)))

    def read_chunk(tables, i, mx, s, t, idx, *rest):
        start, end = bounds(i)
        rows = _table_rows(b, m, start, end)  # [chunk, H] fp32
        capped = _softcap(b, cfg, b.op("Gemm", flat, rows, transB=1))  # [N, chunk]
        proc, mx_new, s_new, alpha, d, e, se = chunk_core(capped, mx, s, (start, end), tables)
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
    scans = [(FLOAT, ["rows", 1])] * 2 + [(FLOAT, ["rows", chunk])] * (1 + with_logits)

    def vocab_loop(tables):
        return b.loop_carrying(trips, carried, functools.partial(read_chunk, tables), "vocab", scans=scans)

    if con is None:
        outs = vocab_loop(None)
    else:  # one If per step around the whole Loop: its else branch is the unconstrained Loop, node for node
        types = [(dt, 2) for _, dt in carried] + [(FLOAT, 3)] * len(scans)  # carried [N, 1 or H]; scans [chunks, N, w]
        outs = b.if_else(con[2], lambda: vocab_loop(_tables(b, con[0])), lambda: vocab_loop(None), types)
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
