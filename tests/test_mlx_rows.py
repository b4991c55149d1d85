"""MLX rows (RowBackend, batched generation): rows with different cache lengths denoised as one
batch give each row exactly what a single-row encode + denoise of that row alone gives (argmax,
sampled ids and entropies, bit for bit on MLX's CPU backend), through self-conditioned steps, rows
joining and leaving, commits and per-row temperatures; open_row(copy_of) equals re-encoding; 4-bit
exports alike; the single-row state is never touched; bad calls are one-line DgportErrors."""
from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx  # noqa: E402  (the dev extra installs mlx[cpu]; a missing mlx must fail, not skip)

from dgport.errors import DgportError  # noqa: E402
from dgport.exporters.export import ExportOptions, export  # noqa: E402
from dgport.manifest import open_export  # noqa: E402
from dgport.runtimes.mlx import MlxBackend  # noqa: E402


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    """(preset, kind) -> MLX export folder; kind 'fp32' or 'q4' (4-bit, the default group)."""
    root = tmp_path_factory.mktemp("mlx-rows")
    opts = {"fp32": ExportOptions(formats=("mlx",), validate=False),
            "q4": ExportOptions(formats=("mlx",), quantize=4, validate=False)}

    class Lazy(dict):
        def __missing__(self, key):
            name, kind = key
            export(checkpoints[name], root / f"{name}-{kind}", opts[kind])
            self[key] = root / f"{name}-{kind}"
            return self[key]

    return Lazy()


def backend(exports, preset="long-context", kind="fp32", **kw) -> MlxBackend:
    return MlxBackend(open_export(exports[(preset, kind)], "mlx"), **kw)


def assert_same_step(batch_out, i, single_out, where):
    np.testing.assert_array_equal(batch_out.argmax[i], single_out.argmax[0], err_msg=f"argmax {where}")
    np.testing.assert_array_equal(batch_out.sampled[i], single_out.sampled[0], err_msg=f"sampled {where}")
    np.testing.assert_array_equal(batch_out.entropy[i], single_out.entropy[0], err_msg=f"entropy {where}")
    assert batch_out.argmax.dtype == batch_out.sampled.dtype == np.int64 and batch_out.entropy.dtype == np.float32


class Shadow:
    """One row's single-row twin: its own backend (or a shared one's single-row state), fed what the row is fed."""

    def __init__(self, be: MlxBackend, prompt):
        self.be = be
        be.reset()
        be.encode(np.asarray(prompt)[None], np.arange(len(prompt))[None])
        self.len = len(prompt)

    def commit(self, ids):
        self.be.encode(np.asarray(ids)[None], np.arange(self.len, self.len + len(ids))[None])
        self.len += len(ids)

    def step(self, canvas, positions, t, u, fresh):
        if fresh:
            self.be.new_canvas()
        return self.be.denoise(canvas[None], positions[None], np.float32(t), u[None])


def run_script(rows_be, shadows, rng, script):
    """Drive rows and their shadows through `script`: a list of steps, each a list of row names (in
    batch order) with 'fresh' marks ('a*' starts a canvas) or ('commit', name). Returns the number of
    (row, step) comparisons and whether some batch was padded."""
    C, V = rows_be.config.canvas_length, rows_be.config.vocab_size
    ids = {name: rows_be.open_row() for name in shadows}
    for name, sh in shadows.items():
        prompt = sh.prompt
        rows_be.encode_row(ids[name], prompt[None], np.arange(len(prompt))[None])
        assert rows_be.row_cache_len(ids[name]) == len(prompt)
    canvas = {name: rng.integers(0, V, C) for name in shadows}
    last = {}
    compared, padded = 0, False
    for entry in script:
        if entry[0] == "commit":
            name = entry[1]
            committed = last[name]
            rows_be.encode_row(ids[name], committed[None], np.arange(shadows[name].len, shadows[name].len + C)[None])
            shadows[name].commit(committed)
            assert rows_be.row_cache_len(ids[name]) == shadows[name].len
            canvas[name] = rng.integers(0, V, C)
            continue
        names = [n.rstrip("*") for n in entry]
        fresh = np.array([n.endswith("*") for n in entry])
        b = len(names)
        cv = np.stack([canvas[n] for n in names])
        pos = np.stack([np.arange(shadows[n].len, shadows[n].len + C) for n in names])
        temps = rng.uniform(0.3, 1.0, b).astype(np.float32)
        u = rng.random((b, C), dtype=np.float32)
        out = rows_be.denoise_rows([ids[n] for n in names], cv, pos, temps, u, fresh)
        padded |= rows_be._batch.padded
        for i, n in enumerate(names):
            single = shadows[n].step(cv[i], pos[i], temps[i], u[i], fresh[i])
            assert_same_step(out, i, single, f"row {n}, step {entry}")
            compared += 1
            last[n] = out.argmax[i]
            canvas[n] = np.where(rng.random(C) < 0.5, out.sampled[i], rng.integers(0, V, C))
    for name in ids:
        rows_be.close_row(ids[name])
    return compared, padded


# a row joins mid-way (c), one leaves (b), a and c commit a canvas and go on; rows step in varying order
SCRIPT = [["a*", "b*"], ["a", "b"], ["a", "b", "c*"], ["c", "b", "a"], ["a", "c"],
          ("commit", "a"), ["c", "a*"], ["a", "c"], ("commit", "c"), ["a", "c*"], ["c", "a"]]
PROMPT_LENS = {"a": 5, "b": 13, "c": 28}  # sliding window 8 (7 cached): 'a' padded there, full layers all padded


def make_shadows(exports, rng, lens, preset="long-context", kind="fp32", shared=None):
    V = shared.config.vocab_size if shared is not None else None
    shadows = {}
    for name, L in lens.items():
        be = shared if (shared is not None and name == "a") else backend(exports, preset, kind)
        V = be.config.vocab_size
        prompt = np.concatenate([[2], rng.integers(3, V, L - 1)])
        sh = Shadow(be, prompt)
        sh.prompt = prompt
        shadows[name] = sh
    return shadows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_of_different_lengths_equal_single_rows(exports, seed):
    rows_be = backend(exports)
    rng = np.random.default_rng(seed)
    # row 'a''s twin is rows_be's own single-row state: rows and the single-row path share nothing
    shadows = make_shadows(exports, rng, PROMPT_LENS, shared=rows_be)
    compared, padded = run_script(rows_be, shadows, rng, SCRIPT)
    assert padded and compared == 20
    cfg = rows_be.config
    assert cfg.sliding_cache_len < PROMPT_LENS["b"] and cfg.sliding_cache_len > PROMPT_LENS["a"]


def test_4bit_rows_equal_its_single_rows(exports):
    rows_be = backend(exports, kind="q4")
    assert rows_be.entry["quantization"]["bits"] == 4
    rng = np.random.default_rng(7)
    shadows = make_shadows(exports, rng, PROMPT_LENS, kind="q4")
    compared, padded = run_script(rows_be, shadows, rng, SCRIPT)
    assert padded and compared == 20


@pytest.mark.parametrize("preset", ["tiny", "long-context"])
def test_random_batches_equal_single_rows(exports, preset):
    """Many batches of 1-11 rows with cache lengths 1-60 (one step, fresh): every row bit-identical."""
    rows_be, single = backend(exports, preset), backend(exports, preset)
    cfg = rows_be.config
    C, V = cfg.canvas_length, cfg.vocab_size
    rng = np.random.default_rng(100)
    tokens = 0
    for _ in range(12):
        b = int(rng.integers(1, 12))
        lens = rng.integers(1, 61, b)
        prompts = [rng.integers(0, V, L) for L in lens]
        rows = []
        for p in prompts:
            rows.append(rows_be.open_row())
            rows_be.encode_row(rows[-1], p[None], np.arange(len(p))[None])
        cv = rng.integers(0, V, (b, C))
        pos = np.stack([np.arange(L, L + C) for L in lens])
        temps = rng.uniform(0.3, 1.0, b).astype(np.float32)
        u = rng.random((b, C), dtype=np.float32)
        out = rows_be.denoise_rows(rows, cv, pos, temps, u, np.ones(b, bool))
        for i, p in enumerate(prompts):
            single.reset()
            single.encode(p[None], np.arange(len(p))[None])
            single.new_canvas()
            assert_same_step(out, i, single.denoise(cv[i:i + 1], pos[i:i + 1], temps[i], u[i:i + 1]), f"row {i} of {b}")
            tokens += C
        for r in rows:
            rows_be.close_row(r)
    assert tokens >= 50 * C


def test_padding_is_masked(exports):
    """The mask is what makes padded rows right: the same stacked cache without it changes the short row."""
    be = backend(exports)
    cfg = be.config
    C, V = cfg.canvas_length, cfg.vocab_size
    rng = np.random.default_rng(3)
    rows = [be.open_row() for _ in range(2)]
    for r, L in zip(rows, (4, 20)):
        be.encode_row(r, rng.integers(0, V, (1, L)), np.arange(L)[None])
    cv, pos = rng.integers(0, V, (2, C)), np.stack([np.arange(4, 4 + C), np.arange(20, 20 + C)])
    be.denoise_rows(rows, cv, pos, np.float32([0.7, 0.7]), rng.random((2, C), dtype=np.float32), np.ones(2, bool))
    stacked = be._batch.cache
    assert be._batch.padded and stacked[0][0].shape[2] == cfg.sliding_cache_len  # 'sliding' layer 0: 4 padded to 7
    args = (mx.array(cv.astype(np.int32)), mx.array(pos.astype(np.int32)),
            mx.zeros((2, C, cfg.hidden_size)), stacked)
    masked, unmasked = (np.array(be.model.logits(*args, padded=p)) for p in (True, False))
    assert np.abs(masked[0] - unmasked[0]).max() > 1e-3  # the padded row
    np.testing.assert_array_equal(masked[1], unmasked[1])  # the longest row has no padding to mask


def test_open_row_copy_equals_reencoding(exports):
    be = backend(exports)
    cfg = be.config
    C, V = cfg.canvas_length, cfg.vocab_size
    rng = np.random.default_rng(5)
    prefix, more = rng.integers(0, V, 11), rng.integers(0, V, 6)
    src = be.open_row()
    be.encode_row(src, prefix[None], np.arange(11)[None])
    copy = be.open_row(copy_of=src)
    assert be.row_cache_len(copy) == 11
    be.encode_row(copy, more[None], np.arange(11, 17)[None])
    assert be.row_cache_len(src) == 11 and be.row_cache_len(copy) == 17  # the source is not extended
    again = be.open_row()
    be.encode_row(again, np.concatenate([prefix, more])[None], np.arange(17)[None])
    for i in range(cfg.num_layers):
        for a, b in zip(be._rows[copy].cache[i], be._rows[again].cache[i]):
            np.testing.assert_array_equal(np.array(a), np.array(b))
    cv = rng.integers(0, V, (1, C))
    pos, u = np.arange(17, 17 + C)[None], rng.random((1, C), dtype=np.float32)
    fresh = np.ones(1, bool)
    one = be.denoise_rows([copy], cv, pos, np.float32([0.6]), u, fresh)
    two = be.denoise_rows([again], cv, pos, np.float32([0.6]), u, fresh)
    assert_same_step(one, 0, two, "copy vs re-encoded")
    # and the source row still denoises like a fresh encode of the prefix alone
    single = backend(exports)
    single.encode(prefix[None], np.arange(11)[None])
    pos = np.arange(11, 11 + C)[None]
    assert_same_step(be.denoise_rows([src], cv, pos, np.float32([0.6]), u, fresh), 0,
                     single.denoise(cv, pos, np.float32(0.6), u), "source row")


def test_stack_and_signal_are_kept_between_steps_of_the_same_rows(exports):
    be = backend(exports)
    cfg = be.config
    C, V = cfg.canvas_length, cfg.vocab_size
    rng = np.random.default_rng(9)
    rows = [be.open_row() for _ in range(2)]
    for r, L in zip(rows, (6, 9)):
        be.encode_row(r, rng.integers(0, V, (1, L)), np.arange(L)[None])
    pos = np.stack([np.arange(6, 6 + C), np.arange(9, 9 + C)])

    def step(fresh, rows=rows, pos=pos):
        return be.denoise_rows(rows, rng.integers(0, V, (len(rows), C)), pos, np.float32([0.5, 0.8][:len(rows)]),
                               rng.random((len(rows), C), dtype=np.float32), np.array(fresh))

    step([True, True])
    first = be._batch
    step([False, False])
    assert be._batch is first  # same rows, same lengths: the stack is reused
    step([False, True])
    assert be._batch is first
    be.encode_row(rows[0], rng.integers(0, V, (1, C)), np.arange(6, 6 + C)[None])
    step([True, False], pos=np.stack([np.arange(6 + C, 6 + 2 * C), np.arange(9, 9 + C)]))
    assert be._batch is not first and be._batch.lengths == (6 + C, 9)  # a cache grew: rebuilt


def test_single_row_state_is_untouched_by_rows(exports):
    be, ref = backend(exports), backend(exports)
    cfg = be.config
    C, V = cfg.canvas_length, cfg.vocab_size
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, V, (1, 10))
    cv, u = rng.integers(0, V, (1, C)), rng.random((1, C), dtype=np.float32)
    pos = np.arange(10, 10 + C)[None]
    for b in (be, ref):
        b.encode(prompt, np.arange(10)[None])
    r = be.open_row()
    be.encode_row(r, rng.integers(0, V, (1, 3)), np.arange(3)[None])
    be.denoise_rows([r], rng.integers(0, V, (1, C)), np.arange(3, 3 + C)[None], np.float32([0.5]), u, np.ones(1, bool))
    assert be.cache_len == 10
    a, b = be.denoise(cv, pos, np.float32(0.7), u), ref.denoise(cv, pos, np.float32(0.7), u)
    assert_same_step(a, 0, b, "single row beside rows")
    be.reset()  # the single-row reset leaves rows alone
    assert be.row_cache_len(r) == 3


def _one_line(err) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_bad_row_calls_are_one_line_errors(exports):
    be = backend(exports)
    cfg = be.config
    C, V = cfg.canvas_length, cfg.vocab_size
    r = be.open_row()
    u = np.zeros((1, C), np.float32)
    args = (np.zeros((1, C), np.int64), np.arange(C)[None], np.float32([0.5]), u, np.ones(1, bool))
    with pytest.raises(DgportError) as e:
        be.denoise_rows([r], *args)
    assert "empty cache" in _one_line(e)
    be.encode_row(r, np.array([[2, 5, 6]]), np.arange(3)[None])
    for call in (lambda: be.close_row(99), lambda: be.row_cache_len(99), lambda: be.open_row(copy_of=99),
                 lambda: be.encode_row(99, np.array([[2]]), np.array([[0]])), lambda: be.denoise_rows([99], *args),
                 lambda: be.row_cache_len("x")):
        with pytest.raises(DgportError) as e:
            call()
        assert "no MLX row" in _one_line(e)
    pos = np.arange(3, 3 + C)[None]
    bad = {
        "two rows, one canvas": lambda: be.denoise_rows([r, r], *args),
        "no rows": lambda: be.denoise_rows([], *args),
        "canvas for two": lambda: be.denoise_rows([r], np.zeros((2, C), np.int64), pos, np.float32([0.5]), u, np.ones(1, bool)),
        "uniforms short": lambda: be.denoise_rows([r], args[0], pos, np.float32([0.5]), u[:, :-1], np.ones(1, bool)),
        "temperatures [2]": lambda: be.denoise_rows([r], args[0], pos, np.float32([0.5, 0.5]), u, np.ones(1, bool)),
        "fresh scalar": lambda: be.denoise_rows([r], args[0], pos, np.float32([0.5]), u, np.bool_(True)),
        "encode [2, T]": lambda: be.encode_row(r, np.array([[1, 2], [3, 4]]), np.array([[3, 4], [3, 4]])),
        "encode positions": lambda: be.encode_row(r, np.array([[1, 2]]), np.array([[3]])),
    }
    for what, call in bad.items():
        with pytest.raises(DgportError) as e:
            call()
        _one_line(e)
    # a row whose signal is for another canvas length must start a canvas
    be.denoise_rows([r], *args[:4], np.ones(1, bool))
    other = be.open_row()
    be.encode_row(other, np.array([[2]]), np.array([[0]]))
    be.denoise_rows([other], args[0], np.arange(1, 1 + C)[None], np.float32([0.5]), u, np.ones(1, bool))
    short = np.zeros((1, C - 1), np.int64)
    with pytest.raises(DgportError) as e:
        be.denoise_rows([r], short, pos[:, :-1], np.float32([0.5]), u[:, :-1], np.zeros(1, bool))
    assert "fresh=True" in _one_line(e)
    be.close_row(r)
    with pytest.raises(DgportError):
        be.row_cache_len(r)
