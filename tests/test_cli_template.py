"""Canvas templates on the command line: `run --template FILE` (text and JSON forms), `--suffix`,
the Sudoku model's answer template with `--task-template` (run and demo), the JSON fields, the
live canvas view's fixed positions, and every mistake as one line naming the flag or file."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

import dgport
from dgport import Hole, Template
from cli_support import dg  # noqa: E402

PUZZLE = "3..54716.2.78.6.4...12.35..812934.5.5.3721894794.5821..7638942.4..165937935472.81"



@pytest.fixture(scope="module")
def tiny_gen(checkpoints):
    return dgport.load(checkpoints["tiny"], backend="torch")


def run_json(capsys, *args):
    code, out, err = dg(capsys, "run", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_text_template_file_fixes_its_text(capsys, tmp_path, checkpoints, tiny_gen):
    f = tmp_path / "card.txt"
    f.write_text("Name: {{hole:6}}, age {{hole:2}}.\n")  # the editor's trailing newline is dropped
    r = run_json(capsys, checkpoints["tiny"], "--backend", "torch", "--prompt", "Hi", "--template", f, "--seed", "0")
    assert r["template"] is True and len(r["holes"]) == 2
    assert r["text"] == "Name: " + r["holes"][0] + ", age " + r["holes"][1] + "."
    api = tiny_gen.generate("Hi", template=Template(["Name: ", Hole(6), ", age ", Hole(2), "."]), seed=0)
    assert r["token_ids"] == api.token_ids[0] and r["holes"] == api.holes
    assert len(r["token_ids"]) == 32  # the template's 21 positions span two 16-position canvases

    f.write_text("Q: {{hole:3}}\\{{hole:2}}\n\n")  # only one newline is dropped; an escaped marker is text
    r = run_json(capsys, checkpoints["tiny"], "--backend", "torch", "--prompt", "Hi", "--template", f, "--seed", "1")
    assert r["text"] == "Q: " + r["holes"][0] + "{{hole:2}}\n" and len(r["holes"]) == 1


def test_json_template_file_is_the_same_template(capsys, tmp_path, checkpoints):
    j = tmp_path / "t.json"
    j.write_text(json.dumps(['{"id": ', {"hole": 3}, "}"]))
    t = tmp_path / "t.txt"
    t.write_text('{"id": {{hole:3}}}')
    common = (checkpoints["tiny"], "--backend", "torch", "--prompt", "Hi", "--seed", "2")
    a = run_json(capsys, *common, "--template", j)
    b = run_json(capsys, *common, "--template", t)
    assert a["token_ids"] == b["token_ids"] and a["holes"] == b["holes"]
    assert a["text"] == '{"id": ' + a["holes"][0] + "}"


def test_suffix_is_fixed_after_one_hole(capsys, checkpoints):
    common = (checkpoints["tiny"], "--backend", "torch", "--prompt", "def add(a, b):", "--seed", "0")
    r = run_json(capsys, *common, "--suffix", "\nprint(add(2, 3))", "--max-new-tokens", "5")
    assert r["template"] is True and len(r["holes"]) == 1
    assert r["text"] == r["holes"][0] + "\nprint(add(2, 3))"
    assert len(r["token_ids"]) == 32  # a 5-position hole and 17 suffix positions: two canvases
    r = run_json(capsys, *common, "--suffix", "!")  # the hole defaults to one canvas
    assert r["text"].endswith("!") and len(r["token_ids"]) == 32


def test_summary_line_and_show_canvas_name_the_template(capsys, tmp_path, checkpoints):
    f = tmp_path / "t.txt"
    f.write_text("A{{hole:2}}B{{hole:2}}C{{hole:2}}")
    code, out, err = dg(capsys, "run", checkpoints["tiny"], "--backend", "torch", "--prompt", "Hi", "--seed", "0",
                        "--template", f, "--show-canvas")
    assert code == 0, err
    assert out.startswith("A") and out.endswith("C\n")  # the template's first and last text, streamed
    assert "template: 3 holes |" in err
    assert re.search(r"fixed \d+", err)  # the canvas view's title, printed once per canvas off a terminal
    code, out, err = dg(capsys, "run", checkpoints["tiny"], "--backend", "torch", "--prompt", "Hi", "--seed", "0",
                        "--max-new-tokens", "16")
    assert code == 0 and "template" not in err


def test_sudoku_task_template_keeps_every_given(capsys):
    r = run_json(capsys, "--prompt", PUZZLE, "--seed", "0", "--task-template")
    assert r["template"] is True and len(r["holes"]) == PUZZLE.count(".")
    grid = "".join(r["text"].split())
    assert all(p == a for p, a in zip(PUZZLE, grid) if p != ".") and len(grid) == 81
    assert all(len(h) <= 1 for h in r["holes"])
    plain = run_json(capsys, "--prompt", PUZZLE, "--seed", "0")  # off by default: it solves no more puzzles
    assert plain["template"] is False and plain["holes"] is None
    code, out, err = dg(capsys, "run", "--prompt", PUZZLE, "--seed", "0", "--task-template")
    assert code == 0 and "template: 22 holes (the task's)" in err


def test_task_template_on_a_model_without_a_task_is_refused(capsys, checkpoints):
    code, out, err = dg(capsys, "run", checkpoints["tiny"], "--backend", "torch", "--prompt", "Hi", "--seed", "0",
                        "--max-new-tokens", "16", "--task-template")
    assert code != 0 and out == ""
    assert "--task-template: this model declares no task with an answer template" in err


def test_demo_takes_the_answer_template_when_told(capsys):
    code, out, err = dg(capsys, "demo", "--seed", "0", "--givens", "70", "--task-template")
    assert code == 0, err
    assert "givens fixed by the answer template" in out
    code, out, err = dg(capsys, "demo", "--seed", "0", "--givens", "70")
    assert code == 0, err
    assert "no template" in out and "givens fixed" not in out


def test_canvas_view_marks_fixed_positions(checkpoints):
    from rich.console import Console

    from dgport.display import CanvasView
    from dgport.loop import StepEvent
    from dgport.tokenizer import ChatTokenizer

    tok = ChatTokenizer(checkpoints["tiny"])
    ids = np.asarray(tok.encode("abcd"), dtype=np.int64)
    accepted = np.array([True, False, True, False])
    fixed = np.array([True, True, False, False])
    args = (0, 2, 0.5, ids, np.zeros(4, np.float32), accepted, ids)
    view = CanvasView(tok)
    view.update(StepEvent(*args, fixed=fixed))
    assert [s for _, s in view.pieces] == [CanvasView.FIXED_STYLE, CanvasView.FIXED_STYLE, "bold green", "dim"]
    assert "fixed 2" in view.title
    assert CanvasView.FIXED_STYLE not in ("bold green", "dim")
    plain = CanvasView(tok)
    plain.update(StepEvent(*args))  # without a template: the view as it always was
    assert [s for _, s in plain.pieces] == ["bold green", "dim", "bold green", "dim"]
    assert "fixed" not in plain.title and plain.title.startswith("canvas 1  step 3  T=0.500  accepted 2/4")
    console = Console(record=True, width=80, color_system="truecolor", force_terminal=True)
    console.print(view)
    assert "\x1b[1;4;36m" in console.export_text(styles=True)  # bold, underline, cyan


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


@pytest.mark.parametrize("files,args,message", [
    ({}, ["--template", "{tmp}/missing.txt"], r"--template \S+missing.txt: cannot read it"),
    ({"b.txt": b"a \xff {{hole:2}}"}, ["--template", "{tmp}/b.txt"], r"--template \S+b.txt is not valid UTF-8 .*0xff"),
    ({"z.txt": "a {{hole:0}}"}, ["--template", "{tmp}/z.txt"], r"--template \S+z.txt: '\{\{hole:0\}\}'"),
    ({"x.txt": "a {{hole:x}}"}, ["--template", "{tmp}/x.txt"], r"--template \S+x.txt: '\{\{hole:x\}\}'"),
    ({"s.txt": "a {{ hole:3}} {{hole:2}}"}, ["--template", "{tmp}/s.txt"], r"--template \S+s.txt: .*looks like a hole"),
    ({"n.txt": "no hole here\n"}, ["--template", "{tmp}/n.txt"], r"--template \S+n.txt has no hole"),
    ({"bad.json": '["a", {"hole": 2}'}, ["--template", "{tmp}/bad.json"], r"--template \S+bad.json: not valid JSON"),
    ({"z.json": '["a", {"hole": 0}]'}, ["--template", "{tmp}/z.json"], r"--template \S+z.json\[1\]: a hole has 1 to"),
    ({"e.json": "[]"}, ["--template", "{tmp}/e.json"], r"--template \S+e.json: the template is empty"),
    ({"deep.json": "[" * 100_000}, ["--template", "{tmp}/deep.json"],
     r"--template \S+deep.json: the JSON is nested too deeply"),
    ({"t.txt": "A{{hole:2}}"}, ["--template", "{tmp}/t.txt", "--suffix", "x"], "either --template FILE or --suffix"),
    ({"t.txt": "A{{hole:2}}"}, ["--template", "{tmp}/t.txt", "--think"], "--think cannot be used with --template"),
    ({}, ["--suffix", "x", "--think"], "--think cannot be used with --suffix"),
    ({"t.txt": "A{{hole:2}}"}, ["--template", "{tmp}/t.txt", "--task-template"], "--task-template and --template"),
    ({}, ["--suffix", ""], "--suffix is empty"),
    ({"t.txt": "Name: {{hole:6}}, age {{hole:2}}."}, ["--template", "{tmp}/t.txt", "--max-new-tokens", "4"],
     r"--max-new-tokens 4 is shorter than --template \S+t.txt: it spans 21 positions \(2 canvases of 16\)"),
])
def test_template_mistakes_are_one_line_errors(capsys, tmp_path, checkpoints, files, args, message):
    for name, data in files.items():
        _write(tmp_path, name, data)
    capsys.readouterr()
    code, out, err = dg(capsys, "run", checkpoints["tiny"], "--backend", "torch", "--prompt", "Hi",
                        *[a.format(tmp=tmp_path) for a in args])
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgport: error: "), err
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("args,message", [
    (["--think"], "--think cannot be used with --task-template"),
    (["--raw"], "--task-template and --raw contradict"),
    (["--max-new-tokens", "10"], r"--max-new-tokens 10 is shorter than this model's sudoku answer template "
                                 r"\(--task-template\)"),
])
def test_sudoku_task_template_mistakes(capsys, args, message):
    code, out, err = dg(capsys, "run", "--prompt", PUZZLE, "--task-template", *args)
    assert code != 0 and out == ""
    errors = [line for line in err.strip().splitlines() if line.startswith("dgport: error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), err
    assert "Traceback" not in err
