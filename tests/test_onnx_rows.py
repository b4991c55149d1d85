"""Rows on the ONNX backend (dgport.backend.RowBackend, runtimes/onnx_rows.py): requests whose caches
differ in length denoised in one batched call give, row by row, what the single-row `encode` +
`denoise` of that row alone gives, over several self-conditioned steps with rows joining, leaving and
committing, at per-row temperatures; on every graph form (sparse and dense experts, fused attention,
bf16's fp32-compute graphs, fp16, int4/int8). Where exact equality cannot hold (a padded row's
attention softmax sums its terms in other SIMD lanes: docs/onnx.md), the floats are bounded."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from bench.bench_batch import cpu_flags
from dgport.errors import DgportError
from dgport.exporters.export import ExportOptions, export
from dgport.manifest import open_export
from dgport.runtimes.onnx import OnnxBackend
from onnx_support import THREADS, onnx_exports  # noqa: F401

PRESET = "long-context"  # sliding window 8 (7 cached positions): shorter than most prompts here
# prompt lengths: the sliding layers keep min(L, 7), so row a is padded there and b, c, d are not;
# the full layers pad every row but the longest
PROMPTS = {"a": 5, "b": 13, "c": 28, "d": 9}
# rounds of one denoise_rows call: (row, fresh, temperature); "close" and "commit" act between rounds
ROUNDS = [
    [("a", True, 0.8), ("b", True, 0.5), ("c", True, 1.1)],
    [("a", False, 0.7), ("b", False, 0.45), ("c", False, 1.0)],  # the same rows: the batch signal as is
    [("a", False, 0.6), ("b", False, 0.4), ("c", False, 0.9), ("d", True, 0.8)],  # d joins
    "close b",
    [("a", False, 0.5), ("c", False, 0.8), ("d", False, 0.7)],
    "commit a",  # a's canvas is encoded: its cache grows, its next canvas starts fresh
    [("a", True, 0.8), ("c", False, 0.7), ("d", False, 0.6)],
    [("a", False, 0.7), ("c", False, 0.6), ("d", False, 0.5)],
]
_EXPORTS: dict = {}


@pytest.fixture(scope="module")
def exports(checkpoints, onnx_exports, tmp_path_factory):  # noqa: F811
    """name -> an export of the long-context fixture (with logits; the extra forms unvalidated)."""
    opts = {"fp32": None, "fused": dict(attention="fused"), "bf16": dict(dtype="bf16"),
            "fp16": dict(dtype="fp16"), "int4": dict(quantize=4, group_size=32),
            "int8": dict(quantize=8, group_size=32)}

    def get(name):
        if opts[name] is None:
            return onnx_exports[(PRESET, "fp32")]
        if name not in _EXPORTS:
            out = tmp_path_factory.mktemp("rows") / name
            export(checkpoints[PRESET], out, ExportOptions(with_logits=True, validate=False, **opts[name]))
            _EXPORTS[name] = out
        return _EXPORTS[name]

    return get


def backend(path, **kw) -> OnnxBackend:
    return OnnxBackend(open_export(path, "cpu"), device="cpu", threads=THREADS, **kw)


def script(cfg, seed: int = 0):
    """The inputs of ROUNDS, drawn once: per row its prompt, then per event its canvas and uniforms
    (steps) or the ids it commits."""
    rng = np.random.default_rng(seed)
    V, C = cfg.vocab_size, cfg.canvas_length
    prompts = {r: rng.integers(0, V, (1, n)) for r, n in PROMPTS.items()}
    events = []
    for rnd in ROUNDS:
        if rnd == "commit a":
            events.append(("commit", "a", rng.integers(0, V, (1, C))))
        elif isinstance(rnd, str):
            events.append(("close", rnd.split()[1], None))
        else:
            events.append(("step", [(r, f, np.float32(t), rng.integers(0, V, (1, C)),
                                     rng.random((1, C), dtype=np.float32)) for r, f, t in rnd], None))
    return prompts, events


def run_rows(be: OnnxBackend, prompts, events) -> dict:
    """The script as rows: row -> [(argmax, entropy, sampled, logits)] per step it took."""
    C = be.config.canvas_length
    ids = {}
    got = {r: [] for r in prompts}
    for r, p in prompts.items():
        if r == "d":
            continue  # opens when it joins
        ids[r] = be.open_row()
        be.encode_row(ids[r], p, np.arange(p.shape[1])[None])
    for kind, what, extra in events:
        if kind == "close":
            be.close_row(ids.pop(what))
        elif kind == "commit":
            L = be.row_cache_len(ids[what])
            be.encode_row(ids[what], extra, np.arange(L, L + C)[None])
        else:
            for r, *_ in what:
                if r not in ids:
                    ids[r] = be.open_row()
                    be.encode_row(ids[r], prompts[r], np.arange(prompts[r].shape[1])[None])
            rows = [ids[r] for r, *_ in what]
            pos = np.stack([np.arange(be.row_cache_len(i), be.row_cache_len(i) + C) for i in rows])
            out = be.denoise_rows(rows, np.concatenate([w[3] for w in what]), pos,
                                  np.array([w[2] for w in what], np.float32), np.concatenate([w[4] for w in what]),
                                  np.array([w[1] for w in what]))
            logits = be.last_rows_logits
            for i, (r, *_) in enumerate(what):
                got[r].append(tuple(x[i] for x in out) + (None if logits is None else logits[i],))
    return got


def run_alone(be: OnnxBackend, prompts, events) -> dict:
    """The same script, each row alone on the single-row methods (its own encode, new_canvas, denoise)."""
    C = be.config.canvas_length
    want = {}
    for r, p in prompts.items():
        be.reset()
        be.encode(p, np.arange(p.shape[1])[None])
        want[r] = []
        for kind, what, extra in events:
            if kind == "commit" and what == r:
                L = be.cache_len
                be.encode(extra, np.arange(L, L + C)[None])
            elif kind == "step":
                for r2, fresh, t, canvas, u in what:
                    if r2 != r:
                        continue
                    if fresh:
                        be.new_canvas()
                    L = be.cache_len
                    out = be.denoise(canvas, np.arange(L, L + C)[None], t, u)
                    logits = be.last_logits
                    want[r].append(tuple(x[0] for x in out) + (None if logits is None else logits[0],))
    return want


def compare(got: dict, want: dict) -> dict:
    """Row by row and step by step, what differs between rows and alone: positions whose argmax or
    sampled id differ, whose entropy differs (and by how many units in the last place at most), the
    largest relative entropy difference and the largest logit difference."""
    stats = {"steps": 0, "positions": 0, "ids_differ": 0, "entropy_differs": 0, "max_entropy_ulps": 0,
             "max_entropy_rel": 0.0, "max_logit_diff": 0.0}
    for r in want:
        assert len(got[r]) == len(want[r]), r
        for g, w in zip(got[r], want[r]):
            stats["steps"] += 1
            stats["positions"] += g[0].size
            stats["ids_differ"] += int((g[0] != w[0]).sum() + (g[2] != w[2]).sum())
            stats["entropy_differs"] += int((g[1] != w[1]).sum())
            ulps = np.abs(g[1].view(np.int32).astype(np.int64) - w[1].view(np.int32).astype(np.int64))
            stats["max_entropy_ulps"] = max(stats["max_entropy_ulps"], int(ulps.max()))
            rel = float((np.abs(g[1] - w[1]) / np.maximum(np.abs(w[1]), 1e-30)).max())
            stats["max_entropy_rel"] = max(stats["max_entropy_rel"], rel)
            if w[3] is not None:
                stats["max_logit_diff"] = max(stats["max_logit_diff"], float(np.abs(g[3] - w[3]).max()))
    return stats


# the graph forms: (export, graph set, accuracy level, bounds). "exact" forms compute in fp32 (a padded
# row's last-bit differences stay there); "rounded" ones round to bf16/fp16 or quantize activations to
# int8 (accuracy level 4, the quantized exports' default), where a last-bit difference now and then
# crosses a rounding step and, on these random fixtures, carries through the layers and the signal
FORMS = {"fp32-sparse": ("fp32", None, None, "exact"), "fp32-dense": ("fp32", "graphs", None, "exact"),
         "fused": ("fused", None, None, "exact"), "int4": ("int4", None, 0, "exact"),
         "int8": ("int8", None, 0, "exact"), "bf16-fp32compute": ("bf16", None, None, "rounded"),
         "fp16": ("fp16", None, None, "rounded"), "int4-level4": ("int4", None, 4, "rounded"),
         "int8-level4": ("int8", None, 4, "rounded")}
# measured on this script (docs/onnx.md): exact forms differ in 0-1 of 608 ids, entropies by 1 ulp (in
# ~30 % of positions), logits by <= 1.8e-5; rounded ones in up to 8.2 % of ids on an avx512_vnni CPU
# (int4 at level 4; bf16 3.8 %, fp16 0) and 21.2 % on an AVX2-only one (int8 at level 4: its int8
# kernels round other steps there), entropies by <= 1.7e-3 relative on both. The entropy bound checks
# the numbers; the ids bound that rows are not mixed up (another row's cache changes ~all ids).
BOUNDS = {"exact": dict(ids=0.01, entropy_ulps=2, logits=5e-5, entropy_rel=1e-6),
          "rounded": dict(ids=0.12, entropy_ulps=None, logits=None, entropy_rel=5e-3)}
INT8_LEVEL4_IDS_WITHOUT_VNNI = 0.3  # int8 at level 4 where the CPU has no VNNI: 21.2 % measured


@pytest.mark.parametrize("form", list(FORMS))
def test_rows_denoise_like_each_row_alone(form, exports, caplog):
    """Rows of 5, 13, 28 and 9 cached tokens (padded in the full layers, row a in the sliding ones too),
    several self-conditioned steps, a row joining fresh, one leaving, one committing a canvas, per-row
    temperatures. Rows differ from their runs alone only as far as kernels round differently in a
    batch (docs/onnx.md: the softmax over a padded row's keys sums in other SIMD lanes; MatMuls over
    long reductions split by the batch's shape across threads; an expert routed one token takes the
    single-row GEMM path): bounded per form (BOUNDS)."""
    name, graph_set, acc, kind = FORMS[form]
    kw = {"graph_set": graph_set} if graph_set else {}
    if acc is not None:
        kw["accuracy_level"] = acc
    be = backend(exports(name), **kw)
    prompts, events = script(be.config)
    with caplog.at_level(logging.WARNING, logger="dgport.runtimes.onnx"):
        got = run_rows(be, prompts, events)
    assert not caplog.records  # a rows export: no one-by-one fallback
    want = run_alone(be, prompts, events)
    stats = compare(got, want)
    assert stats["steps"] == 19
    bound = BOUNDS[kind]
    ids = bound["ids"]
    if form == "int8-level4" and not {"avx512_vnni", "avx_vnni"} & set(cpu_flags().split()):
        ids = INT8_LEVEL4_IDS_WITHOUT_VNNI
    assert stats["ids_differ"] <= ids * 2 * stats["positions"], stats
    assert stats["max_entropy_rel"] <= bound["entropy_rel"], stats
    if bound["entropy_ulps"] is not None:
        assert stats["max_entropy_ulps"] <= bound["entropy_ulps"], stats
        assert stats["max_logit_diff"] <= bound["logits"], stats


@pytest.mark.parametrize("group,threads,graph_set", [([0], THREADS, None), ([0, 1, 2], 1, "graphs")],
                         ids=["one-row", "equal-lengths"])
def test_rows_bit_identical_where_no_kernel_sees_the_batch(group, threads, graph_set, exports):
    """The batching itself is exact (stacking, gathered and kept signals, [b] temperatures): one row
    alone (its own cache and signal, a [1] temperature) gives exactly the single-row outputs; so do
    rows of equal cache lengths (nothing padded) on one thread with dense experts (no kernel then
    rounds by the batch's shape), over self-conditioned steps."""
    be = OnnxBackend(open_export(exports("fp32"), "cpu"), device="cpu", threads=threads,
                     **({"graph_set": graph_set} if graph_set else {}))
    cfg = be.config
    V, C = cfg.vocab_size, cfg.canvas_length
    rng = np.random.default_rng(1)
    L = 11
    prompts = [rng.integers(0, V, (1, L)) for _ in range(3)]
    steps = [[(rng.integers(0, V, (1, C)), rng.random((1, C), dtype=np.float32)) for _ in range(3)] for _ in prompts]
    temps = np.array([0.8, 0.6, 1.2], np.float32)
    pos = np.arange(L, L + C)[None]
    want = []
    for i in group:
        be.reset()
        be.encode(prompts[i], np.arange(L)[None])
        be.new_canvas()
        want.append([(*be.denoise(c, pos, temps[i], u), be.last_logits) for c, u in steps[i]])
    rows = [be.open_row() for _ in group]
    for r, i in zip(rows, group):
        be.encode_row(r, prompts[i], np.arange(L)[None])
    for s in range(3):
        out = be.denoise_rows(rows, np.concatenate([steps[i][s][0] for i in group]), pos.repeat(len(group), 0),
                              temps[group], np.concatenate([steps[i][s][1] for i in group]),
                              np.full(len(group), s == 0))
        for j in range(len(group)):
            for a, b in zip((*out, be.last_rows_logits), want[j][s]):
                np.testing.assert_array_equal(a[j], b[0])


def test_copy_of_equals_encoding_the_same_prompt(exports):
    """open_row(copy_of=r) starts from r's cache (the server's prefix reuse): extending the copy gives
    what encoding the whole text into a new row gives, and leaves r as it was."""
    be = backend(exports("fp32"))
    cfg = be.config
    V, C = cfg.vocab_size, cfg.canvas_length
    rng = np.random.default_rng(2)
    prompt, more = rng.integers(0, V, (1, 12)), rng.integers(0, V, (1, 6))
    canvas, u = rng.integers(0, V, (1, C)), rng.random((1, C), dtype=np.float32)

    def step(rows, L):
        return be.denoise_rows(rows, canvas.repeat(len(rows), 0), np.arange(L, L + C)[None].repeat(len(rows), 0),
                               np.full(len(rows), 0.7, np.float32), u.repeat(len(rows), 0), np.ones(len(rows), bool))

    src = be.open_row()
    be.encode_row(src, prompt, np.arange(12)[None])
    before = step([src], 12)
    copy = be.open_row(copy_of=src)
    assert be.row_cache_len(copy) == 12
    be.encode_row(copy, more, np.arange(12, 18)[None])
    fresh = be.open_row()
    be.encode_row(fresh, prompt, np.arange(12)[None])
    be.encode_row(fresh, more, np.arange(12, 18)[None])
    for a, b in zip(step([copy], 18), step([fresh], 18)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(step([src], 12), before):
        np.testing.assert_array_equal(a, b)
    assert be.row_cache_len(src) == 12 and be.row_cache_len(copy) == 18


def test_rows_leave_the_single_row_state_alone(exports):
    """Rows and the single-row methods share no state: a single-row canvas interleaved with row steps
    continues exactly as it would alone."""
    be = backend(exports("fp32"))
    cfg = be.config
    V, C = cfg.vocab_size, cfg.canvas_length
    rng = np.random.default_rng(3)
    p = rng.integers(0, V, (1, 10))
    steps = [(rng.integers(0, V, (1, C)), rng.random((1, C), dtype=np.float32)) for _ in range(3)]
    pos = np.arange(10, 10 + C)[None]
    be.encode(p, np.arange(10)[None])
    want = [be.denoise(c, pos, np.float32(0.7), u) for c, u in steps]
    be.reset()
    be.encode(p, np.arange(10)[None])
    r = be.open_row()
    be.encode_row(r, rng.integers(0, V, (1, 20)), np.arange(20)[None])
    for (c, u), w in zip(steps, want):
        be.denoise_rows([r], c, np.arange(20, 20 + C)[None], np.array([1.0], np.float32), u, np.array([False]))
        for a, b in zip(be.denoise(c, pos, np.float32(0.7), u), w):
            np.testing.assert_array_equal(a, b)
    assert be.cache_len == 10 and be.row_cache_len(r) == 20


def test_export_before_rows_runs_one_row_at_a_time(exports, caplog):
    """An export without "rows": true in its manifest denoises rows one single-row call at a time (the
    same outputs as alone, exactly) and says so once."""
    be = backend(exports("fp32"))
    be._rows_batched = False  # what an export written before rows reads as
    prompts, events = script(be.config)
    with caplog.at_level(logging.WARNING, logger="dgport.runtimes.onnx"):
        got = run_rows(be, prompts, events)
    said = [r for r in caplog.records if "one call per row" in r.getMessage()]
    assert len(said) == 1
    want = run_alone(be, prompts, events)
    for r in want:
        for g, w in zip(got[r], want[r]):
            for k in range(3):
                np.testing.assert_array_equal(g[k], w[k])


def test_manifest_marks_rows(exports):
    for name in ("fp32", "int4"):
        assert open_export(exports(name), "cpu").format("onnx")["rows"] is True


def test_row_errors_are_one_line(exports):
    be = backend(exports("fp32"))
    C = be.config.canvas_length
    r = be.open_row()
    cases = [
        (lambda: be.close_row(99), "no ONNX row 99"),
        (lambda: be.row_cache_len("x"), "no ONNX row 'x'"),
        (lambda: be.open_row(copy_of=42), "no ONNX row 42"),
        (lambda: be.encode_row(r, np.zeros((2, 3), np.int64), np.zeros((2, 3), np.int64)), "encode_row takes"),
        (lambda: be.denoise_rows([r], np.zeros((1, C)), np.zeros((1, C)), np.ones(1), np.zeros((1, C)),
                                 np.ones(1, bool)), "empty cache"),
    ]
    be.encode_row(be.open_row(), np.zeros((1, 4), np.int64), np.arange(4)[None])
    full = r + 1
    cases += [
        (lambda: be.denoise_rows([full, full], np.zeros((2, C)), np.zeros((2, C)), np.ones(2), np.zeros((2, C)),
                                 np.ones(2, bool)), "distinct rows"),
        (lambda: be.denoise_rows([full], np.zeros((2, C)), np.zeros((2, C)), np.ones(1), np.zeros((2, C)),
                                 np.ones(1, bool)), r"canvas, positions and uniforms \[1, C\]"),
        (lambda: be.denoise_rows([full], np.zeros((1, C)), np.zeros((1, C)), np.ones(2), np.zeros((1, C)),
                                 np.ones(1, bool)), r"temperatures and fresh \[1\]"),
    ]
    for call, match in cases:
        with pytest.raises(DgportError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
    be.denoise_rows([full], np.zeros((1, C)), np.arange(4, 4 + C)[None], np.ones(1), np.zeros((1, C)), np.ones(1, bool))
    with pytest.raises(DgportError, match="canvas of 16 positions, this canvas has 8"):
        be.denoise_rows([full], np.zeros((1, 8)), np.arange(4, 12)[None], np.ones(1), np.zeros((1, 8)),
                        np.zeros(1, bool))
