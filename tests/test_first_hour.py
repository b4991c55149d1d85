"""A new user's first hour (issue #12) and the CLI's catch-all (issue #11 part 4): each item as the
user meets it on the command line."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import dgport
from cli_support import dg  # noqa: E402
from dgport.cli import main

ROOT = Path(__file__).resolve().parents[1]
PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"



def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgport: error: "), err
    assert "Traceback" not in err
    return lines[0]


def cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "dgport.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DGPORT_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, checkpoints):
    out = tmp_path_factory.mktemp("fh") / "tiny-onnx"
    assert main(["export", str(checkpoints["tiny"]), str(out), "--no-validate"]) == 0
    return out


# --- Broken ---------------------------------------------------------------------------------------

NO_TORCH = ("import sys\nfor m in ('torch', 'transformers'): sys.modules[m] = None\n"
            "from dgport.cli import main\ncode = main(sys.argv[1:])\n"
            "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None], 'torch was imported'\n"
            "sys.exit(code)")


def test_the_main_job_and_an_export_need_no_torch(tmp_path, checkpoints):
    env = {"DGPORT_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", NO_TORCH, "run", "--backend", "cpu", "--prompt", PUZZLE],
                         capture_output=True, text=True, env={**os.environ, **env})
    assert run.returncode == 0, run.stderr
    assert re.fullmatch(r"\d{81}\n", run.stdout), run.stdout
    exp = subprocess.run([sys.executable, "-c", NO_TORCH, "export", checkpoints["tiny"], tmp_path / "o",
                          "--no-validate"], capture_output=True, text=True, env={**os.environ, **env})
    assert exp.returncode == 0, exp.stderr
    assert (tmp_path / "o" / "dgport.json").exists() and "Traceback" not in exp.stderr
    ref = subprocess.run([sys.executable, "-c", NO_TORCH, "run", "--backend",
                          "torch", "--prompt", PUZZLE], capture_output=True, text=True, env={**os.environ, **env})
    assert ref.returncode == 1 and "pip install 'dgport[export]'" in one_error_line(ref.stderr)


def test_validation_without_torch_says_how_to_install_or_skip_it(capsys, tmp_path, checkpoints, monkeypatch):
    import importlib.util

    ckpt = checkpoints["tiny"]  # built (with torch) before torch is hidden: the test passes alone too
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    code, _, err = dg(capsys, "export", ckpt, tmp_path / "o")
    assert code == 0, err
    first = err.strip().splitlines()[0]
    assert "pip install 'dgport[export]'" in first and "--no-validate" in first


def test_extras_compose_and_the_cpu_extra_can_export():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(extra, seen=()):
        out = set()
        for req in extras[extra]:
            name = re.split(r"[\[<>=;\s]", req, maxsplit=1)[0]
            if name == "dgport":
                for sub in req[req.index("[") + 1:req.index("]")].split(","):
                    out |= names(sub.strip())
            else:
                out.add(name)
        return out

    runtimes = {"onnxruntime", "onnxruntime-gpu"}
    for combo in (("cuda", "export"), ("cpu", "export"), ("cuda", "serve"), ("mlx", "export")):
        assert len((names(combo[0]) | names(combo[1])) & runtimes) <= 1, combo
    assert {"onnx", "onnxruntime"} <= names("cpu") and "torch" not in names("cpu")
    assert "onnx" in names("mlx") and "onnx" in names("cuda")
    assert {"torch", "transformers", "onnx", "pytest"} <= names("dev")


def test_check_passes_on_the_shipped_model_with_its_own_prompts(capsys):
    code, out, err = dg(capsys, "check", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["agreement"] == {"mlx": 1.0}
    assert report["prompts"] == "3 check prompts of the model"


def test_check_refuses_a_missing_format_before_running_anything(capsys, tiny_onnx):
    code, _, err = dg(capsys, "check", tiny_onnx, "--backends", "cpu,mlx")
    assert code == 1
    assert "has no mlx weights" in one_error_line(err)
    assert "generating" not in err


def test_demo_accepts_its_whole_givens_range(capsys):
    from dgport.models.sudoku.puzzles import MIN_GIVENS, puzzle_from_seed

    for seed in range(5):
        assert puzzle_from_seed(seed, MIN_GIVENS).givens == MIN_GIVENS
    code, out, err = dg(capsys, "demo", "--givens", "23", "--seed", "7")
    assert code == 0, err
    assert "puzzle (seed 7, 23 givens)" in out
    code, _, err = dg(capsys, "demo", "--givens", "17")
    assert code == 2 and "23<=x<=80" in one_error_line(err)


def test_debug_after_the_subcommand(tmp_path):
    out = cli("info", tmp_path / "nope", "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr and "NoSuchOption" not in out.stderr
    assert "ExportError" in out.stderr
    plain = cli("info", tmp_path / "nope")
    assert "Traceback" not in plain.stderr and plain.stderr.count("\n") == 1


# --- Confusing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,message", [
    ("123", "not a Sudoku puzzle: 3 characters after dropping spaces and separators, not 81"),
    ("hello world", "not a Sudoku puzzle"),
    ("55" + PUZZLE[2:], "row 1 gives 5 twice"),
    (PUZZLE[:80] + "3", "column 9 gives 3 twice"),
])
def test_malformed_puzzles_are_refused(capsys, fresh_cache, prompt, message):
    code, out, err = dg(capsys, "run", "--prompt", prompt)
    assert code == 1 and out == ""
    assert message in one_error_line(err)
    assert not fresh_cache.exists()  # refused before the model is even exported


def test_run_says_whether_the_answer_is_a_solution_and_which_seed_it_used(capsys):
    code, out, err = dg(capsys, "run", "--prompt", PUZZLE, "--json")
    assert code == 0, err
    first = json.loads(out)
    assert isinstance(first["seed"], int) and first["answer_check"]["task"] == "sudoku"
    assert first["default_model"] and Path(first["export"]).is_dir()
    code, out, err = dg(capsys, "run", "--prompt", PUZZLE, "--json", "--seed", first["seed"])
    again = json.loads(out)
    assert again["token_ids"] == first["token_ids"] and again["answer_check"] == first["answer_check"]
    code, out, err = dg(capsys, "run", "--prompt", PUZZLE, "--seed", first["seed"])
    assert f"seed {first['seed']}" in err and "sudoku: " in err and first["export"] in err


def test_the_sudoku_verdict():
    from dgport.task import check_answer

    assert check_answer("sudoku", PUZZLE, SOLUTION).ok
    assert check_answer("sudoku", PUZZLE.replace(".", "0"), " ".join(SOLUTION)).ok
    swapped = SOLUTION[1] + SOLUTION[0] + SOLUTION[2:]
    v = check_answer("sudoku", PUZZLE, swapped)
    assert not v.ok and "2 givens changed" in v.summary and "repeat a digit" in v.summary
    assert "not 81 digits" in check_answer("sudoku", PUZZLE, SOLUTION[:80]).summary


def test_every_command_and_load_default_to_the_shipped_model(capsys):
    code, out, err = dg(capsys, "info", "--json")
    assert code == 0, err
    assert json.loads(out)["model"]["canvas"] == 82
    gen = dgport.load()
    assert gen.config.canvas_length == 82
    code, out, _ = dg(capsys, "demo", dgport.default_model.default_export_path("cpu"), "--seed", "1", "--givens", "70")
    assert code == 0 and "puzzle (seed 1, 70 givens)" in out


def test_the_cache_folder_follows_xdg(monkeypatch, tmp_path):
    from dgport.default_model import cache_dir

    monkeypatch.delenv("DGPORT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "dgport"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "dgport"
    monkeypatch.setenv("DGPORT_CACHE_DIR", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"


def test_options_that_would_do_nothing(capsys, checkpoints, tmp_path):
    code, _, err = dg(capsys, "export", checkpoints["tiny"], tmp_path / "o", "--group-size", "32")
    assert code == 1 and "--group-size applies only" in one_error_line(err)
    code, out, err = dg(capsys, "run", "--prompt", PUZZLE, "--seed", "0", "--show-thinking", "--system", "be brief")
    assert code == 0, err
    assert "warning: --show-thinking has no effect without --think" in err
    assert "warning: --system has no effect" in err
    code, out, err = dg(capsys, "run", "--prompt", PUZZLE, "--seed", "0", "--think")
    assert "warning: --think has no effect" in err
    code, out, err = dg(capsys, "run", "--prompt", PUZZLE, "--seed", "0", "--raw", "--system", "x")
    assert "--system has no effect with --raw" in err and "--think" not in err  # only what was given


def test_a_checkpoint_given_where_an_export_is_needed_gets_the_right_export_command(capsys, checkpoints):
    """`info` takes only an export (run, chat, check and serve export a checkpoint into the cache)."""
    code, _, err = dg(capsys, "info", checkpoints["tiny"])
    line = one_error_line(err)
    assert f"dgport export {checkpoints['tiny']} OUT" in line and "dgport info OUT" in line
    assert "--backend" not in line  # info has no --backend to suggest


def test_a_validation_passed_by_the_relative_rule_says_so():
    from dgport.cli_export import _validation_line

    errs = {"encoder_kv": 3.1e-2, "step_entropy": 1e-3, "encoder_kv_vs_fp32": 2e-2, "step_entropy_vs_fp32": 1e-3,
            "reference_encoder_kv_vs_fp32": 1.5e-2, "reference_step_entropy_vs_fp32": 1e-3}
    line = _validation_line("onnx", errs, "bf16", None)
    assert "above the 0.02 target" in line and "relative rule" in line and "3x transformers' own bf16" in line
    assert "encoder_kv 2.00e-02 vs 1.50e-02" in line
    assert "within the 1e-05 target" in _validation_line("onnx", {"encoder_kv": 1e-7}, "fp32", None)
    # the quantization's cost: gated against fp32, unless transformers' own bf16 says the model is too sensitive
    assert "within the 0.1 limit" in _validation_line("onnx", {"encoder_kv": 9e-3, "reference_bf16_encoder_kv_vs_fp32":
                                                               4e-3}, "fp32", 4)
    assert "not gated" in _validation_line("onnx", {"encoder_kv": 0.5, "reference_bf16_encoder_kv_vs_fp32": 0.3},
                                           "fp32", 4)
    assert "within the 1e-05 target" in _validation_line("onnx vs dequantized fp32", {"encoder_kv": 1e-7}, "fp32", 4)


def test_chat_survives_ctrl_c_and_empty_lines(capsys, monkeypatch):
    import dgport.cli_chat as cli_module  # where chat looks up _load

    real_load = cli_module._load
    calls = {"n": 0}

    def load(path, backend):
        gen = real_load(path, backend)
        denoise = gen.backend.denoise

        def interrupt_first(*a, **k):
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt
            return denoise(*a, **k)

        gen.backend.denoise = interrupt_first
        return gen

    monkeypatch.setattr(cli_module, "_load", load)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PUZZLE}\n\n{PUZZLE}\n"))
    code, out, err = dg(capsys, "chat", "--seed", "0")
    assert code == 0, err
    assert "[stopped" in err and err.count("tokens in") == 1
    assert "encoded 198 new prompt tokens" in err and "(cache kept)" not in err  # the stopped turn re-encoded
    assert re.search(r"\d{81}", out)


# --- Cosmetic -------------------------------------------------------------------------------------

def test_first_run_line_and_canvas_count(capsys, fresh_cache):
    code, out, err = dg(capsys, "run", "--prompt", PUZZLE, "--seed", "0")
    assert code == 0, err
    assert "first run: exporting the shipped Sudoku model (onnx, fp32) to" in err and "progress.py" not in err
    assert re.search(r"\| 1 canvas, steps", err)


def test_show_canvas_off_a_terminal(capsys):
    code, out, err = dg(capsys, "run", "--prompt", PUZZLE, "--seed", "0", "--show-canvas")
    assert code == 0, err
    assert re.fullmatch(r"\d{81}\n", out)  # the answer once
    assert "canvas 1  step" in err and err.endswith("\n")


def test_info_leaves_out_what_is_not_there(capsys, checkpoints, tmp_path, monkeypatch):
    from dgport.cli_inspect import _flat

    monkeypatch.setenv("COLUMNS", "400")  # one table row per line

    assert _flat({"bits": 4, "group_size": 64, "group_size_fallbacks": []}) == "bits 4; group_size 64"
    code, _, err = dg(capsys, "export", checkpoints["tiny"], tmp_path / "q", "--format", "mlx", "--quantize", "int4",
                      "--no-validate")
    assert code == 0, err
    code, out, _ = dg(capsys, "info", tmp_path / "q")
    assert not re.search(r"group_size_fallbacks:\s*[,;│]", out) and "None" not in out and "quantization bits 4" in out


def test_a_failed_check_says_it_once(capsys):
    from dgport.crosscheck import CheckReport, Run

    report = CheckReport([Run("cpu"), Run("mlx")], 1.0, {"mlx": 0.5}, {"mlx": 0.1}, "3 given prompts", ok=False)
    report.print()
    assert "FAIL" not in capsys.readouterr().out


def test_plain_progress_lines_off_a_terminal(monkeypatch):
    import time

    from rich.console import Console

    import dgport.progress as progress_module

    monkeypatch.setattr(progress_module, "PLAIN_START_S", 0.05)
    monkeypatch.setattr(progress_module, "PLAIN_DONE_S", 0.05)
    buf = io.StringIO()
    with progress_module.RichProgress(Console(file=buf, force_terminal=False)) as p:
        with p.step("quick"):
            pass
        with p.step("writing graphs"):
            time.sleep(0.2)
    text = buf.getvalue()
    assert "quick" not in text
    assert "writing graphs ...\n" in text and "writing graphs: done in" in text


def test_hints_name_the_checkpoint_alike(capsys):
    code, out, _ = dg(capsys, "export", "--help")
    assert "CHECKPOINT OUT" in out
    code, _, err = dg(capsys, "check", "--backends", "cpu,torch")
    assert "torch=CHECKPOINT" in one_error_line(err)


# --- The catch-all (issue #11 part 4) -------------------------------------------------------------

@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_and_a_closed_stdout_are_one_line(tmp_path):
    env = {"DGPORT_CACHE_DIR": os.environ["DGPORT_CACHE_DIR"]}
    args = f"run --prompt {PUZZLE} --seed 0"
    for redirect in (">/dev/full", ">&-"):
        out = subprocess.run(f"{sys.executable} -m dgport.cli {args} {redirect}", shell=True, capture_output=True,
                             text=True, env={**os.environ, **env})
        assert out.returncode == 1
        assert "cannot write the output" in one_error_line(out.stderr.split("\n", 1)[-1] if
                                                            out.stderr.startswith("first run") else out.stderr)


def test_an_unwritable_out_folder_is_one_line(capsys, checkpoints, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = dg(capsys, "export", checkpoints["tiny"], tmp_path / "file" / "out", "--no-validate")
    assert code == 1 and str(tmp_path / "file") in one_error_line(err)


def _rewrite(export: Path, rel: str, data: bytes) -> None:
    """Replace a file and record it in the manifest, as a hand-edited export would."""
    (export / rel).write_bytes(data)
    manifest = json.loads((export / "dgport.json").read_text())
    manifest["artifacts"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if "manifest_sha256" in manifest:  # the manifest's digest of itself, where this dgport writes one
        from dgport.manifest import manifest_digest

        manifest["manifest_sha256"] = manifest_digest(manifest)
    (export / "dgport.json").write_text(json.dumps(manifest))


def test_runtime_load_errors_are_one_line(capsys, tiny_onnx, checkpoints, tmp_path):
    import shutil

    bad = tmp_path / "bad-onnx"
    shutil.copytree(tiny_onnx, bad)
    _rewrite(bad, "encoder.unrolled.onnx", b"not a protobuf")  # the encoder the CPU runs
    code, _, err = dg(capsys, "run", bad, "--prompt", "hi", "--seed", "0")
    assert code == 1 and "encoder.unrolled.onnx" in one_error_line(err)
    mlx = tmp_path / "mlx"
    assert main(["export", str(checkpoints["tiny"]), str(mlx), "--format", "mlx", "--no-validate"]) == 0
    rel = next(r for r in json.loads((mlx / "dgport.json").read_text())["artifacts"] if r.endswith(".safetensors"))
    _rewrite(mlx, rel, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    code, _, err = dg(capsys, "run", mlx, "--backend", "mlx", "--prompt", "hi", "--seed", "0")
    assert code == 1
    one_error_line(err)


def test_any_other_error_is_one_line_and_debug_keeps_the_traceback(capsys, monkeypatch):
    import dgport.cli as cli_module

    def broken(path, backend):
        raise RuntimeError("kernel failed\nsecond line of detail")

    monkeypatch.setattr(cli_module, "_load", broken)
    code, _, err = dg(capsys, "run", "--prompt", PUZZLE)
    line = one_error_line(err)
    assert code == 1 and "RuntimeError: kernel failed second line of detail" in line and "--debug" in line
    with pytest.raises(RuntimeError):
        main(["run", "--prompt", PUZZLE, "--debug"])


def test_a_damaged_cached_default_export_is_exported_again(capsys, fresh_cache):
    assert main(["run", "--prompt", PUZZLE, "--seed", "0"]) == 0
    first = capsys.readouterr().out
    export = dgport.default_model.default_export_path("cpu")
    weights = export / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, out, err = dg(capsys, "run", "--prompt", PUZZLE, "--seed", "0")
    assert code == 0 and "is damaged" in err and out == first
    (export / "dgport.json").write_text("{")
    code, out, err = dg(capsys, "run", "--prompt", PUZZLE, "--seed", "0")
    assert code == 0 and "is damaged" in err and out == first
    # nothing left beside it but the (empty) lock that makes processes take turns
    assert sorted(p.name for p in export.parent.iterdir()) == [f".{export.name}.cache-lock", export.name]


def test_processes_that_need_the_same_cached_export_take_turns(tmp_path):
    """Two `dgport run` processes on a fresh cache: one exports the shipped model, the other waits for
    it and reuses the result (before, the second failed on the export's lock, or replaced the first)."""
    env = {**os.environ, "DGPORT_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "dgport.cli", "run", "--backend", "cpu", "--seed", "0", "--json", "--prompt", PUZZLE]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert json.loads(outs[0][0])["token_ids"] == json.loads(outs[1][0])["token_ids"]
    assert sum("first run: exporting" in err for _, err in outs) == 1, [err for _, err in outs]
    exports = [p for p in (tmp_path / "cache" / "exports").iterdir() if not p.name.startswith(".")]
    assert len(exports) == 1
    assert not [p for p in exports[0].parent.iterdir() if ".partial-" in p.name or ".damaged-" in p.name]
