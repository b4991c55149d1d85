"""Batched generation: each row of `generate_batch` (and of a BatchLoop that rows join and leave
mid-way) gives exactly the tokens of a single-row run with the same seed, on every backend."""
from __future__ import annotations

import numpy as np
import pytest

import dgport
from dgport import Hole
from dgport.batch import BatchLoop
from dgport.errors import DgportError
from dgport.loop import make_rng

# prompts of different lengths: on long-context (sliding window 8) some rows' sliding caches are
# padded and others full
PROMPTS = {
    "long-context": [[2, 130, 131, 132, 133], [2] + list(range(140, 152)), [2] + list(range(130, 157))],
    "eos": [[2, 140, 141, 142], [2, 200, 201], [2, 150, 151, 152, 153, 154, 155]],
    "confident": [[2, 120, 121, 122, 123], [2, 125], [2, 126, 127, 128, 129, 130, 131, 132, 133]],
}


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory):
    from dgport.exporters.export import ExportOptions, export

    class Lazy(dict):
        def __missing__(self, name):
            out = tmp_path_factory.mktemp("batch") / name
            export(checkpoints[name], out, ExportOptions(formats=("onnx", "mlx"), validate=False))
            self[name] = out
            return out

    return Lazy()


def _gen(backend, preset, exports, torch_gens):
    if backend == "torch":
        return torch_gens[preset]
    opts = {"threads": 2} if backend == "cpu" else {}
    return dgport.load(exports[preset], backend=backend, **opts)


def _same(a, b):
    assert a.token_ids == b.token_ids
    assert a.steps_per_canvas == b.steps_per_canvas
    assert (a.finished, a.seed, a.holes) == (b.finished, b.seed, b.holes)


@pytest.mark.parametrize("backend", ["torch", "cpu", "mlx"])
@pytest.mark.parametrize("preset", list(PROMPTS))
def test_generate_batch_rows_equal_single_runs(backend, preset, exports, torch_gens):
    gen = _gen(backend, preset, exports, torch_gens)
    prompts = PROMPTS[preset]
    seeds = [3, 4, 5]
    batch = gen.generate_batch(prompts, seeds=seeds, raw=True)
    for p, s, r in zip(prompts, seeds, batch):
        _same(r, gen.generate(p, seed=s, raw=True))
    if preset == "eos":  # rows stop at different canvases: a finished row leaves the batch
        assert len({len(r.steps_per_canvas) for r in batch}) > 1 or len({r.finished for r in batch}) > 1


@pytest.mark.parametrize("backend", ["torch", "cpu", "mlx"])
def test_generate_batch_with_templates_and_max_batch(backend, exports, torch_gens):
    gen = _gen(backend, "eos", exports, torch_gens)
    prompts = PROMPTS["eos"]
    templates = [None, ['{"a": ', Hole(5), "}"], ["x", Hole(20), "y" * 10]]
    batch = gen.generate_batch(prompts, seeds=[0, 1, 2], raw=True, templates=templates, max_batch=2)
    for p, s, t, r in zip(prompts, [0, 1, 2], templates, batch):
        _same(r, gen.generate(p, seed=s, raw=True, template=t))


@pytest.mark.parametrize("backend", ["torch", "cpu", "mlx"])
def test_rows_join_and_leave_between_steps(backend, exports, torch_gens):
    """Continuous batching: a row joins while others are mid-canvas, one is cancelled; the others
    still equal their single-row runs."""
    gen = _gen(backend, "long-context", exports, torch_gens)
    prompts = PROMPTS["long-context"]
    settings = gen.settings(None)
    loop = BatchLoop(gen.backend)
    first = loop.add(prompts[0], settings, make_rng(10))
    doomed = loop.add(prompts[1], settings, make_rng(11))
    done = []
    for _ in range(3):
        done += loop.step()
    late = loop.add(prompts[2], settings, make_rng(12))
    loop.step()
    loop.remove(doomed)
    while len(loop):
        done += loop.step()
    for e in done:
        loop.close(e)
    assert {id(e) for e in done} == {id(first), id(late)}
    for entry, prompt, seed in ((first, prompts[0], 10), (late, prompts[2], 12)):
        ref = gen.generate(prompt, seed=seed, raw=True)
        assert entry.row.result.token_ids == ref.token_ids[0]
        assert entry.row.result.steps_per_canvas == ref.steps_per_canvas


def test_a_callback_error_ends_only_its_row(torch_gens):
    gen = torch_gens["long-context"]
    settings = gen.settings(None)
    loop = BatchLoop(gen.backend)

    def boom(event):
        raise RuntimeError("client gone")

    bad = loop.add([2, 130, 131], settings, make_rng(0), on_step=boom)
    good = loop.add([2, 140, 141, 142], settings, make_rng(1))
    done = []
    while len(loop):
        done += loop.step()
    for e in done:
        loop.close(e)
    assert isinstance(bad.error, RuntimeError) and good.error is None
    assert good.row.result.token_ids == gen.generate([2, 140, 141, 142], seed=1, raw=True).token_ids[0]


def test_generate_batch_refuses_bad_arguments(torch_gens):
    gen = torch_gens["tiny"]
    for bad, says in (("one prompt", "non-empty list"), ([], "non-empty list")):
        with pytest.raises(DgportError, match=says):
            gen.generate_batch(bad)
    with pytest.raises(DgportError, match="one entry per prompt"):
        gen.generate_batch([[2, 3], [2, 4]], seeds=[1])
    with pytest.raises(DgportError, match="max_batch"):
        gen.generate_batch([[2, 3]], max_batch=0)
    results = gen.generate_batch([[2, 3], [2, 4]], raw=True)
    assert all(isinstance(r.seed, int) for r in results)  # fresh seeds, reported
    _same(results[1], gen.generate([2, 4], seed=results[1].seed, raw=True))


def test_unknown_rows_are_refused(torch_gens):
    be = torch_gens["tiny"].backend
    with pytest.raises(DgportError, match="not open"):
        be.close_row(12345)
    r = be.open_row()
    be.encode_row(r, np.array([[2, 3, 4]]), np.array([[0, 1, 2]]))
    c = be.open_row(copy_of=r)
    assert be.row_cache_len(c) == 3
    be.close_row(r)
    be.close_row(c)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("mlx", marks=pytest.mark.slow)])  # MLX: ~50 s
def test_sudoku_model_rows_equal_single_runs(backend):
    """A trained model (the shipped Sudoku model, fp32): six puzzles of 23-45 givens in one batch, half
    with the answer template, rows finishing after different step counts; every row is its single run."""
    from dgport.models.sudoku.puzzles import generate
    from dgport.task import answer_template

    gen = dgport.load(backend=backend)
    puzzles = [p.puzzle for p in generate(7, 3, 23, 29) + generate(8, 3, 36, 45)]
    templates = [answer_template("sudoku", p) if i % 2 else None for i, p in enumerate(puzzles)]
    seeds = list(range(40, 46))
    batch = gen.generate_batch(puzzles, seeds=seeds, templates=templates)
    for p, s, t, r in zip(puzzles, seeds, templates, batch):
        _same(r, gen.generate(p, seed=s, template=t))
    assert len({tuple(r.steps_per_canvas) for r in batch}) > 1  # rows left the batch at different steps
