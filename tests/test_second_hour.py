"""A newcomer's second hour: the API takes what `run` takes and reports its seed, a command writes a
small checkpoint to try things on, and the rough edges a new user met (check's seed, demo on any
model, chat on a single-turn model, summaries, titles, check's verdicts) are fixed."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dgport
from cli_support import dg  # noqa: E402
from dgport.errors import DgportError
from dgport.exporters.export import ExportOptions, export

CLI = [sys.executable, "-m", "dgport.cli"]
PUZZLE = "3..54716.2.78.6.4...12.35..812934.5.5.3721894794.5821..7638942.4..165937935472.81"



@pytest.fixture(scope="module")
def tiny_onnx(checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("second-hour") / "tiny-onnx"
    export(checkpoints["tiny"], out, ExportOptions(validate=False))
    return out


def test_load_takes_a_checkpoint_folder_and_results_carry_their_seed(checkpoints, tiny_onnx):
    from_export = dgport.load(tiny_onnx, backend="cpu")
    from_checkpoint = dgport.load(checkpoints["tiny"], backend="cpu")  # exported once into the cache
    a = from_export.generate("Hi", seed=7, max_new_tokens=32)
    b = from_checkpoint.generate("Hi", seed=7, max_new_tokens=32)
    assert a.token_ids == b.token_ids and a.seed == b.seed == 7
    fresh = from_export.generate("Hi", max_new_tokens=32)  # no seed: one is drawn and reported
    assert isinstance(fresh.seed, int) and 0 <= fresh.seed < 2**32
    assert from_export.generate("Hi", seed=fresh.seed, max_new_tokens=32).token_ids == fresh.token_ids
    rng = np.random.default_rng(3)
    assert from_export.generate("Hi", rng=rng, max_new_tokens=32).seed is None  # the caller's stream


def test_load_refuses_what_is_neither_with_one_line(tmp_path):
    with pytest.raises(DgportError) as e:
        dgport.load(tmp_path / "missing", backend="cpu")
    assert "\n" not in str(e.value) and "missing" in str(e.value)


def test_fixture_command_writes_a_checkpoint_that_exports(tmp_path):
    out = tmp_path / "tiny-ckpt"
    r = subprocess.run([sys.executable, "-m", "dgport.models.fixtures", "tiny", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left
    again = subprocess.run([sys.executable, "-m", "dgport.models.fixtures", "tiny", str(out)], capture_output=True,
                           text=True)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "exists" in again.stderr
    summary = export(out, tmp_path / "export", ExportOptions(validate=False))
    assert (summary.out / "dgport.json").is_file()


def test_check_draws_a_fresh_seed_and_prints_it(tiny_onnx, capsys):
    seeds = []
    for _ in range(2):
        code, out, err = dg(capsys, "check", tiny_onnx, "--backends", "cpu,cpu", "--json", "--max-new-tokens", "16")
        assert code == 0, err
        seeds.append(json.loads(out)["seed"])
    assert all(isinstance(s, int) for s in seeds) and seeds[0] != seeds[1]
    code, out, err = dg(capsys, "check", tiny_onnx, "--backends", "cpu,cpu", "--seed", "5", "--max-new-tokens", "16")
    assert code == 0 and "seed 5" in out and "--seed 5" in out


def test_check_verdicts_say_why(monkeypatch):
    from dgport import crosscheck

    class Fake:
        def __init__(self, shift):
            self.shift = shift

        def generate(self, prompt, seed, raw, max_new_tokens, on_step, **kw):
            tokens = [(i + self.shift) % 7 for i in range(20)]
            return type("R", (), {"token_ids": [tokens]})()

    gens = iter([Fake(0), Fake(3)])
    monkeypatch.setattr(crosscheck, "preflight", lambda *a: None)
    monkeypatch.setattr(dgport, "load", lambda *a, **k: next(gens))
    for need, why in [(0.95, "on random weights one rounding flips a token"), (1.0, "a difference is a bug")]:
        gens = iter([Fake(0), Fake(3)])
        monkeypatch.setattr(crosscheck, "_required_agreement", lambda *a, n=need: n)
        report = crosscheck.run_check("x", [("cpu", None), ("mlx", None)], ["p"], seed=4)
        assert not report.ok and why in report.failure and "seed 4" in report.failure
    gens = iter([Fake(0), Fake(3)])
    monkeypatch.setattr(crosscheck, "_required_agreement", lambda *a: None)
    report = crosscheck.run_check("x", [("cpu", None), ("mlx", None)], ["p"], seed=4)
    assert report.ok and report.as_dict()["required_agreement"] is None
    from rich.console import Console

    buf = io.StringIO()
    monkeypatch.setattr("rich.console.Console", lambda *a, **k: Console(file=buf, width=200))
    report.print()
    assert "reported only" in buf.getvalue() and "required agreement 0" not in buf.getvalue()


def test_demo_refuses_a_model_without_the_sudoku_task(tiny_onnx, capsys):
    code, out, err = dg(capsys, "demo", tiny_onnx, "--seed", "1")
    assert code == 1 and err.count("\n") == 1 and "declares no Sudoku task" in err and not out


def test_chat_on_a_single_turn_model_starts_each_message_afresh():
    r = subprocess.run(CLI + ["chat", "--seed", "1"], input=f"{PUZZLE}\n{PUZZLE}\n", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "each message starts a new conversation" in r.stderr
    assert r.stderr.count("encoded 198 new prompt tokens, cache 198 positions") == 2  # no cache kept
    answers = r.stdout.split()
    assert len(answers) == 2 and all(len(a) == 81 for a in answers)


def test_run_summary_names_the_export_and_titles_do_not_wrap(tiny_onnx, checkpoints, tmp_path, capsys):
    code, out, err = dg(capsys, "run", tiny_onnx, "--prompt", "Hi", "--seed", "0", "--max-new-tokens", "16")
    assert code == 0 and str(tiny_onnx) in err.replace("\n", "")
    deep = tmp_path / ("a-rather-long-folder-name-for-an-export" * 2) / "out"
    code, out, err = dg(capsys, "export", checkpoints["tiny"], deep, "--no-validate")
    assert code == 0, err
    assert any(line.startswith("exported to ") and line.rstrip().endswith(" s") and str(deep) in line
               for line in err.splitlines()), err  # the title is one line, not wrapped at 80 columns


def test_canvas_view_shows_the_answer_so_far():
    from rich.console import Console

    from dgport.display import CanvasView

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(65 + i) for i in ids)

    class Event:
        canvas_index, step, temperature = 0, 2, 0.5
        argmax = np.array([0, 1, 2])
        accepted = np.array([True, False, True])
        entropy = np.zeros(3, np.float32)

    view = CanvasView(Tok())
    view.update(Event())
    view.answer = "the committed answer so far"
    buf = io.StringIO()
    Console(file=buf, width=80).print(view)
    assert "ABC" in buf.getvalue() and "the committed answer so far" in buf.getvalue()


def test_export_to_a_relative_out_writes_both_formats(checkpoints, tmp_path, monkeypatch):
    """The checked reader resolves a relative folder: MLX's written-file check refused `./x` exports."""
    monkeypatch.chdir(tmp_path)
    export(checkpoints["tiny"], Path("rel"), ExportOptions(formats=("onnx", "mlx"), validate=False))
    assert dgport.load("rel", backend="mlx").generate("Hi", seed=0, max_new_tokens=16).token_ids == \
        dgport.load("rel", backend="cpu").generate("Hi", seed=0, max_new_tokens=16).token_ids


def test_task_declaration_read_only_inside_the_model(tiny_onnx, tmp_path):
    import os
    import shutil

    from dgport.task import declared

    copy = tmp_path / "export"
    shutil.copytree(tiny_onnx, copy)
    outside = tmp_path / "elsewhere.json"
    outside.write_text('{"dgport": {"task": "sudoku"}}')
    (copy / "tokenizer_config.json").unlink()
    os.symlink(outside, copy / "tokenizer_config.json")
    with pytest.raises(DgportError, match="outside the model folder"):
        declared(copy)


def test_default_int4_export_uses_one_group_size_for_both_formats(checkpoints, tmp_path, capsys):
    code, out, err = dg(capsys, "export", checkpoints["tiny"], tmp_path / "q", "--format", "onnx,mlx", "--quantize",
                        "int4", "--no-validate")
    assert code == 0, err
    assert err.count("quantization group size 32: 64 does not divide the input width 96") == 1
    manifest = json.loads((tmp_path / "q" / "dgport.json").read_text())
    groups = {fmt: manifest["formats"][fmt]["quantization"]["group_size"] for fmt in ("onnx", "mlx")}
    assert groups == {"onnx": 32, "mlx": 32}
    for backend in ("cpu", "mlx"):  # (tokens differ: ONNX Runtime runs 4-bit products with int8 activations)
        assert len(dgport.load(tmp_path / "q", backend=backend).generate("Hi", seed=0, max_new_tokens=16).token_ids[0]) == 16
    code, out, err = dg(capsys, "export", checkpoints["tiny"], tmp_path / "q64", "--quantize", "int4",
                        "--group-size", "64", "--format", "mlx", "--no-validate")
    assert code == 1 and "--group-size 64: does not divide the input width 96" in err  # as given, or refused
    assert not (tmp_path / "q64").exists()


def test_plan_needs_no_out_reads_mlx_and_shows_small_sizes(checkpoints, capsys, tmp_path):
    code, out, err = dg(capsys, "export", checkpoints["tiny"], "--plan", "--quantize", "int4", "--format", "onnx,mlx")
    assert code == 0, err
    assert "ONNX export plan (int4 group 32)" in out and "MLX export plan (int4 group 32)" in out
    assert "0.000 GB" not in out and " KB" in out
    code, out, err = dg(capsys, "export", checkpoints["tiny"])
    assert code == 2 and "Missing argument 'OUT'" in err
    # the MLX plan against a real MLX export's weights: headers aside, within 10 %
    from dgport.exporters.export import parse_formats
    from dgport.exporters.plan import plan_mlx

    planned = plan_mlx(checkpoints["tiny"], ExportOptions(formats=parse_formats("mlx")))["weights_bytes"]
    export(checkpoints["tiny"], tmp_path / "m", ExportOptions(formats=("mlx",), validate=False))
    real = sum(p.stat().st_size for p in (tmp_path / "m" / "mlx").iterdir())
    assert 0.9 * real <= planned <= real


def test_plan_of_a_hub_id_reads_its_config_from_the_cache_offline(checkpoints, tmp_path, monkeypatch, capsys):
    import shutil

    repo = tmp_path / "hub" / "models--google--tiny-dg"
    commit = "a" * 40
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    shutil.copy(checkpoints["tiny"] / "config.json", repo / "blobs" / "cfg")
    (snap / "config.json").symlink_to(repo / "blobs" / "cfg")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = dg(capsys, "export", "google/tiny-dg", "--plan")
    assert code == 0, err
    assert "ONNX export plan (fp32)" in out
