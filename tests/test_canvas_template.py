"""Canvas templates: the text and JSON forms, the loop's handling of fixed positions (never changed,
accepted at no entropy cost, left out of the stopping rule, EOS in a hole never cuts the text after it),
and token identity across torch, ONNX Runtime CPU and MLX on fixtures and the Sudoku model."""
from __future__ import annotations

import json

import numpy as np
import pytest

import dgport
from dgport import Hole, Template
from dgport.backend import StepOutput
from dgport.canvas_template import MAX_HOLE, TemplateError
from dgport.config import GenerationDefaults
from dgport.exporters.checkpoint import read_config
from dgport.loop import generate_ids, make_rng
from dgport.sampler import accept_mask

JSON_TEMPLATE = ['{"name": "', Hole(8), '", "age": ', Hole(3), ', "ok": true}']  # 44 positions: 3 canvases of 16


# --------------------------------------------------------------------------------------------
# the text and JSON forms


def test_text_form_marks_holes_and_keeps_escaped_markers_as_text():
    t = Template.parse('{"a": "{{hole:5}}", "b": {{hole:2}}} \\{{hole:3}} end')
    assert t.parts == ('{"a": "', Hole(5), '", "b": ', Hole(2), '} {{hole:3}} end')
    assert Template.parse("{{hole:1}}").parts == (Hole(1),)


@pytest.mark.parametrize("text, says", [
    ("x {{hole:0}}", "from 1 to"),
    ("x {{hole:x}}", "from 1 to"),
    (f"x {{{{hole:{MAX_HOLE + 1}}}}}", "from 1 to"),
    ("x {{hole:99999999}}", "from 1 to"),
    ("x {{ hole:3}} {{hole:2}}", "looks like a hole"),
    ("{{hole:2}} then {{hole 3}}", "looks like a hole"),
    ("no hole at all", "has no hole"),
])
def test_text_form_refuses_bad_markers_in_one_line(text, says):
    with pytest.raises(TemplateError, match=says) as e:
        Template.parse(text, where="t.txt")
    assert "\n" not in str(e.value) and str(e.value).startswith("t.txt")


@pytest.mark.parametrize("value, says", [
    ("text", "must be a list"),
    ([1], r"template\[0\]"),
    ([{"hole": 0}], "1 to"),
    ([{"hole": "3"}], r"template\[0\]"),
    ([{"hole": True}], r"template\[0\]"),
    ([{"hole": 2, "x": 1}], r"template\[0\]"),
    ([], "empty"),
])
def test_json_form_refuses_malformed_parts(value, says):
    with pytest.raises(TemplateError, match=says):
        Template.from_json(value)


def test_json_form_round_trip():
    assert Template.from_json(['{"k": ', {"hole": 4}, "}"]) == Template(['{"k": ', Hole(4), "}"])


@pytest.mark.parametrize("bad", [Hole, "x", [3], [Hole(2), None]])
def test_python_form_refuses_what_is_not_a_part(bad):
    with pytest.raises(TemplateError):
        Template(bad)
    with pytest.raises(TemplateError):
        Hole(0)


def test_layout_tokenizes_each_part_alone_and_lays_out_canvases(checkpoints):
    from dgport.tokenizer import ChatTokenizer

    tok = ChatTokenizer(checkpoints["tiny"])
    lay = Template(JSON_TEMPLATE).layout(tok)
    pieces = [tok.encode(p) if isinstance(p, str) else [-1] * p.n for p in JSON_TEMPLATE]
    assert lay.ids.tolist() == [i for p in pieces for i in p]
    assert lay.holes == ((len(pieces[0]), 8), (len(pieces[0]) + 8 + len(pieces[2]), 3))
    C = 16
    assert lay.canvases(C) == -(-lay.length // C)
    if lay.length % C == 0:  # a template that fills its last canvas has no room for EOS
        ids, fixed = lay.canvas(lay.canvases(C) - 1, C, eos_id=1, pad_id=0)
        assert (ids[fixed] == lay.ids[-C:][fixed]).all() and not (ids == 1).any()
        lay = Template(JSON_TEMPLATE + ["!"]).layout(tok)
    ids, fixed = lay.canvas(lay.canvases(C) - 1, C, eos_id=1, pad_id=0)
    tail = lay.length % C
    assert ids[tail] == 1 and (ids[tail + 1:] == 0).all() and fixed[tail:].all()  # EOS, then PAD, fixed
    with pytest.raises(TemplateError, match="max_new_tokens"):
        lay.check_budget(C, lay.length - 1)
    assert lay.check_budget(C, None) == lay.canvases(C) * C


# --------------------------------------------------------------------------------------------
# the loop, on a scripted backend whose every output is random


class NoisyBackend:
    """Random argmax, entropies and samples every step (EOS and PAD often among them); records inputs."""

    def __init__(self, config, seed=0, special_rate=0.2):
        self.config = config
        self.rng = np.random.default_rng(seed)
        self.special_rate = special_rate
        self.canvases, self.encoded = [], []
        self.cache_len = 0

    def encode(self, ids, positions):
        self.encoded.append(ids[0].copy())
        self.cache_len += ids.shape[1]

    def new_canvas(self):
        pass

    def reset(self):
        self.cache_len = 0

    def denoise(self, canvas, positions, t, uniforms):
        self.canvases.append(canvas[0].copy())
        B, C = canvas.shape
        V = self.config.vocab_size

        def ids():
            x = self.rng.integers(3, V, size=(B, C))
            special = self.rng.random((B, C)) < self.special_rate
            return np.where(special, self.rng.choice([0, 1], size=(B, C)), x)

        return StepOutput(ids(), self.rng.random((B, C), dtype=np.float32) * 2, ids())


def _settings(**kw):
    base = dict(max_new_tokens=64, max_denoising_steps=5, entropy_bound=0.5, t_min=0.4, t_max=0.8,
                stability_threshold=1, confidence_threshold=0.005, eos_token_ids=(1, 106), pad_token_id=0)
    base.update(kw)
    return GenerationDefaults(**base)


def test_fixed_positions_are_never_changed_and_eos_in_a_hole_cuts_nothing(checkpoints):
    from dgport.tokenizer import ChatTokenizer

    cfg = read_config(checkpoints["tiny"])[0]
    tok = ChatTokenizer(checkpoints["tiny"])
    lay = Template(JSON_TEMPLATE).layout(tok)
    for seed in range(5):
        be = NoisyBackend(cfg, seed)
        steps = []
        res = generate_ids(be, [2, 5, 6], _settings(max_new_tokens=lay.check_budget(16, None)), make_rng(seed),
                           on_step=steps.append, template=lay)
        assert res.finished and len(res.steps_per_canvas) == lay.canvases(16)
        out = np.asarray(res.token_ids)
        assert (out[:lay.length][lay.fixed] == lay.ids[lay.fixed]).all()
        assert out[lay.length] == 1 and (out[lay.length + 1:] == 0).all()
        assert not np.isin(out[:lay.length][~lay.fixed], [1]).any()  # EOS in a hole is dropped (PAD)
        for ev in steps:  # every step's input and argmax canvas carry the fixed tokens; all are accepted
            ids, fixed = lay.canvas(ev.canvas_index, 16, 1, 0)
            assert (ev.canvas[fixed] == ids[fixed]).all() and (ev.argmax[fixed] == ids[fixed]).all()
            assert ev.accepted[fixed].all() and (ev.fixed == fixed).all()
        for c in be.canvases:  # what the backend saw
            assert any((c[f] == i[f]).all() for i, f in (lay.canvas(k, 16, 1, 0) for k in range(lay.canvases(16))))
        # the next canvas' prompt is the committed canvas (what the result says)
        assert all((e == out[16 * k:16 * (k + 1)]).all() for k, e in enumerate(be.encoded[1:]))
        assert all(len(h) <= n for h, (_, n) in zip(res.holes, lay.holes))


def test_fixed_positions_spend_no_entropy_budget():
    """Holes are accepted exactly as the entropy-bound rule accepts them among holes alone."""
    e = np.array([[0.9, 0.1, 3.0, 0.2, 0.05, 2.0]], dtype=np.float32)
    fixed = np.array([False, True, True, False, False, True])
    got = accept_mask(np.where(fixed, np.float32(0), e), 0.3)
    holes = accept_mask(e[:, ~fixed], 0.3)
    assert got[0, fixed].all() and (got[0, ~fixed] == holes[0]).all()


def test_a_canvas_without_holes_takes_no_step(checkpoints):
    from dgport.tokenizer import ChatTokenizer

    cfg = read_config(checkpoints["tiny"])[0]
    tok = ChatTokenizer(checkpoints["tiny"])
    lay = Template(["x" * 20, Hole(4)]).layout(tok)  # canvas 1 all text, canvas 2 holds the hole
    res = generate_ids(NoisyBackend(cfg), [2, 5], _settings(), make_rng(0), template=lay)
    assert res.steps_per_canvas[0] == 0 and res.steps_per_canvas[1] > 0


# --------------------------------------------------------------------------------------------
# token identity across backends (fp32), fixtures and the Sudoku model


@pytest.fixture(scope="module")
def both_exports(checkpoints, tmp_path_factory):
    from dgport.exporters.export import ExportOptions, export

    out = {}
    for name in ("tiny", "eos", "confident"):
        folder = tmp_path_factory.mktemp("tmpl") / name
        export(checkpoints[name], folder, ExportOptions(formats=("onnx", "mlx"), validate=False))
        out[name] = folder
    return out


@pytest.mark.parametrize("preset", ["tiny", "eos", "confident"])
def test_template_tokens_identical_on_torch_onnx_and_mlx(preset, both_exports, torch_gens):
    gens = {"torch": torch_gens[preset], "cpu": dgport.load(both_exports[preset], backend="cpu", threads=2),
            "mlx": dgport.load(both_exports[preset], backend="mlx")}
    lay = Template(JSON_TEMPLATE).layout(gens["cpu"].tokenizer)
    for seed in (0, 1, 2):
        results = {k: g.generate([2, 105, 300, 301, 106, 107], seed=seed, template=JSON_TEMPLATE)
                   for k, g in gens.items()}
        ref = results["torch"]
        for k, r in results.items():
            assert (r.token_ids, r.steps_per_canvas, r.holes) == (ref.token_ids, ref.steps_per_canvas, ref.holes), k
        out = np.asarray(ref.token_ids[0][:lay.length])
        assert (out[lay.fixed] == lay.ids[lay.fixed]).all()
        text = ref.text
        assert text == '{"name": "' + ref.holes[0] + '", "age": ' + ref.holes[1] + ', "ok": true}'
        assert ref.finished


def test_without_a_template_nothing_changes(both_exports, torch_gens):
    """template=None is the reference path: same tokens as a run that never heard of templates."""
    gen = dgport.load(both_exports["eos"], backend="cpu", threads=2)
    a = gen.generate([2, 140, 141, 142], seed=0)
    b = torch_gens["eos"].generate([2, 140, 141, 142], seed=0)
    assert a.token_ids == b.token_ids and a.holes is None


def test_sudoku_template_identical_across_backends_and_keeps_every_given():
    from dgport.task import answer_template
    from models.sudoku.puzzles import generate

    from dgport.default_model import default_checkpoint

    gens = {b: dgport.load(backend=b) for b in ("cpu", "mlx")}
    gens["torch"] = dgport.load(default_checkpoint(), backend="torch")
    for p in generate(5, 3, 30, 35):
        t = answer_template("sudoku", p.puzzle)
        results = {b: g.generate(p.puzzle, seed=p.seed, template=t) for b, g in gens.items()}
        assert len({json.dumps(r.token_ids) for r in results.values()}) == 1
        grid = "".join(results["cpu"].text.split())
        assert all(q == "." or q == a for q, a in zip(p.puzzle, grid))
        assert len(results["cpu"].holes) == p.puzzle.count(".")


def test_think_with_a_template_is_refused(torch_gens):
    with pytest.raises(TemplateError, match="thinking"):
        torch_gens["tiny"].generate("hi", template=["a", Hole(2)], think=True)
