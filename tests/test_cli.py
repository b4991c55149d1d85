"""The command line: happy paths (JSON parsed and checked) and every user mistake as one line on
stderr with a non-zero exit code."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import dgport
from dgport.chat import ChatSession
from cli_support import dg  # noqa: E402
from dgport.cli import main



def test_run_json_on_the_torch_backend(capsys, checkpoints):
    code, out, err = dg(capsys, "run", checkpoints["eos"], "--backend", "torch", "--prompt", "Hello there",
                        "--seed", "0", "--json")
    assert code == 0, err
    data = json.loads(out)
    C = 16
    assert len(data["token_ids"]) % C == 0 and len(data["token_ids"]) <= 4 * C  # default: 4 canvases at most
    assert len(data["steps_per_canvas"]) == len(data["token_ids"]) // C
    assert data["timings"]["denoise_steps"] == sum(data["steps_per_canvas"])
    assert data["timings"]["encode_calls"] == len(data["steps_per_canvas"])
    assert data["tokens_per_forward"] > 0 and isinstance(data["text"], str)
    # the same as the API with the same seed
    api = dgport.load(checkpoints["eos"], backend="torch").generate("Hello there", seed=0, max_new_tokens=4 * C)
    assert api.token_ids[0] == data["token_ids"]


def test_run_streams_text_and_prints_a_summary(capsys, checkpoints):
    code, out, err = dg(capsys, "run", checkpoints["tiny"], "--backend", "torch", "--prompt", "Hi", "--seed", "1",
                        "--max-new-tokens", "32", "--max-denoising-steps", "3")
    assert code == 0, err
    api = dgport.load(checkpoints["tiny"], backend="torch").generate("Hi", seed=1, max_new_tokens=32,
                                                                     max_denoising_steps=3)
    assert out == api.text + "\n"
    assert "tok/s" in err and "steps [3, 3]" in err


def test_run_reads_stdin_and_prompt_file(tmp_path, checkpoints):
    f = tmp_path / "p.txt"
    f.write_text("from a file")
    base = [sys.executable, "-m", "dgport.cli", "run", str(checkpoints["tiny"]), "--backend", "torch", "--seed", "2",
            "--max-new-tokens", "16", "--json"]
    a = subprocess.run(base + ["--prompt-file", str(f)], capture_output=True, text=True)
    b = subprocess.run(base, input="from a file", capture_output=True, text=True)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


def test_thought_channel_hidden_unless_asked(checkpoints):
    from dgport.display import AnswerText
    from dgport.tokenizer import ChatTokenizer

    tok = ChatTokenizer(checkpoints["tiny"])
    ids = tok.encode("<|channel>thought\nhmm<channel|>Blue light scatters.") + [106, 0, 0]
    assert AnswerText(tok).text(ids) == "Blue light scatters."
    assert AnswerText(tok, show_thinking=True).text(ids) == "thought\nhmmBlue light scatters."
    stream = AnswerText(tok)
    stream.add(tok.encode("Blue ")[:3])
    first = stream.delta()
    stream.add(tok.encode("Blue light")[3:])
    assert first + stream.delta() == "Blue light"


def test_chat_turn_stopped_mid_answer_reencodes_the_conversation(checkpoints, hf_models):
    """A turn interrupted mid-answer (Ctrl-C) leaves part of an answer in the cache that the
    conversation does not hold: the next turn encodes the whole conversation afresh."""
    gen = dgport.load(checkpoints["eos"], backend="torch", model=hf_models["eos"])
    session = ChatSession(gen, seed=3, max_new_tokens=32)
    session.say("Hello")
    real_denoise = gen.backend.denoise

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    gen.backend.denoise = interrupted
    with pytest.raises(KeyboardInterrupt):
        session.say("And again?")
    gen.backend.denoise = real_denoise
    ids, keep = session.next_turn_ids("Once more")
    assert not keep
    expected = session.messages + [{"role": "user", "content": "Once more"}]
    assert ids == gen.tokenizer.encode(session._render(expected, True))
    session.say("Once more")
    assert "(cache kept)" not in session.last_stats
    assert session.next_turn_ids("Then?")[1]  # a completed turn keeps the cache again


def test_chat_keeps_the_cache_and_encodes_only_the_new_turn(checkpoints, hf_models):
    gen = dgport.load(checkpoints["eos"], backend="torch", model=hf_models["eos"])
    encoded = []
    real_encode = gen.backend.encode
    gen.backend.encode = lambda ids, pos: (encoded.append((ids.shape[1], int(pos[0, 0]))), real_encode(ids, pos))
    session = ChatSession(gen, seed=3, max_new_tokens=32)
    first = session.say("Hello")
    cache_after_first = gen.backend.cache_len
    ids2, keep = session.next_turn_ids("And again?")
    assert keep
    encoded.clear()
    second = session.say("And again?")
    assert encoded[0] == (len(ids2), cache_after_first)  # only the new turn, at the next position
    assert session.encoded_last_turn == len(ids2) < len(first.prompt_ids) + len(first.token_ids[0]) + len(ids2)
    # the same tokens as one fresh run over the whole stream with the same random draws
    rng = np.random.Generator(np.random.PCG64(3))
    gen.backend.reset()
    again = gen.generate(first.prompt_ids, rng=rng, max_new_tokens=32)
    assert again.token_ids == first.token_ids
    C = gen.config.canvas_length
    seen = first.prompt_ids + first.token_ids[0][: C * (len(first.steps_per_canvas) - 1)] + ids2
    gen.backend.reset()
    fresh = gen.generate(seen, rng=rng, max_new_tokens=32)
    assert fresh.token_ids == second.token_ids


def test_chat_command_runs_two_turns(checkpoints):
    out = subprocess.run([sys.executable, "-m", "dgport.cli", "chat", str(checkpoints["tiny"]), "--backend", "torch",
                          "--seed", "0", "--max-new-tokens", "16", "--max-denoising-steps", "2"],
                         input="Hello\nMore please\n\n", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("tokens in") == 2 and "(cache kept)" in out.stderr


@pytest.mark.parametrize("args,message", [
    (["run", "{missing}", "--prompt", "x"], "no such folder"),
    (["info", "{ckpt}"], "not a dgport export"),
    (["run", "{ckpt}", "--backend", "tpu", "--prompt", "x"], "Invalid value for '--backend'"),
    (["run", "{ckpt}", "--backend", "torch", "--prompt", ""], "the prompt is empty"),
    (["run", "{ckpt}", "--backend", "torch", "--prompt", "   "], "the prompt is empty"),
    (["run", "{ckpt}", "--backend", "torch", "--prompt-file", "{missing}"], "--prompt-file"),
    (["run", "{ckpt}", "--backend", "torch", "--prompt", "x", "--max-new-tokens", "0"], "must be a positive"),
    (["run", "{ckpt}", "--backend", "torch", "--prompt", "x", "--max-denoising-steps", "-2"], "must be a positive"),
    (["run", "{ckpt}", "--backend", "torch", "--prompt", "x", "--stability-threshold", "-1"], "must be >= 0"),
    (["run", "{ckpt}", "--backend", "torch", "--prompt", "x", "--entropy-bound", "0"], "must be a positive"),
    (["run", "{ckpt}", "--backend", "torch", "--prompt", "x", "--encode-chunk", "0"], "must be a positive"),
    (["run", "{ckpt}", "--backend", "torch", "--prompt", "x", "--t-min", "0.9", "--t-max", "0.5"],
     r"t_min \(0.9\) must not be above t_max \(0.5\)"),
    (["check", "{ckpt}", "--backends", "cpu"], "name at least two backends"),
    (["check", "{ckpt}", "--backends", "cpu,torch"], "torch needs the source checkpoint"),
    (["export", "{ckpt}", "{tmp}/out", "--dtype", "fp8"], "--dtype 'fp8'"),
    (["export", "{ckpt}", "{tmp}/out", "--encoder-moe", "fast"], "--encoder-moe 'fast': choose auto, sparse, unrolled, dense or grouped"),
    (["export", "{ckpt}", "{tmp}/out", "--format", "tflite"], "--format 'tflite'"),
    (["export", "{ckpt}", "{tmp}/out", "--format", "mlx", "--quantize", "int3"], "--quantize 3: choose int4 or int8"),
    (["export", "{ckpt}", "{tmp}/out", "--format", "mlx", "--quantize", "four"], "'four': choose int4 or int8"),
    (["export", "{ckpt}", "{tmp}/out", "--quantize", "int4", "--dtype", "bf16"], "--quantize with --dtype bf16"),
    (["export", "{ckpt}", "{tmp}/out", "--denoise-moe", "fast"], "--denoise-moe 'fast': choose auto, sparse, unrolled, dense or grouped"),
    (["export", "{ckpt}", "{tmp}/out", "--attention", "flash"], "--attention 'flash': choose explicit or fused"),
    (["export", "{missing}", "{tmp}/out"], "no such folder"),
])
def test_user_mistakes_are_one_line_errors(capsys, tmp_path, checkpoints, args, message):
    fill = {"ckpt": checkpoints["tiny"], "missing": tmp_path / "missing", "tmp": tmp_path}
    capsys.readouterr()  # drop the fixture build's progress output
    code, out, err = dg(capsys, *[a.format(**fill) for a in args])
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgport: error: "), err
    import re
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_backend_package_missing_names_the_fix(tmp_path):
    code = ("import sys; sys.modules['onnxruntime'] = None; sys.modules['mlx'] = None; sys.modules['mlx.core'] = None\n"
            "from dgport.cli import main; sys.exit(main(sys.argv[1:]))")
    (tmp_path / "dgport.json").write_text("{}")  # looks like an export: the missing package is named first
    for backend, extra in (("cpu", "dgport[cpu]"), ("mlx", "dgport[mlx]")):
        out = subprocess.run([sys.executable, "-c", code, "run", str(tmp_path), "--backend", backend, "--prompt", "x"],
                             capture_output=True, text=True)
        assert out.returncode == 1
        assert out.stderr.strip().count("\n") == 0 and extra in out.stderr, out.stderr


def test_debug_shows_the_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dgport.cli", "--debug", "info", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" in out.stderr


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory, checkpoints):
    out = tmp_path_factory.mktemp("cli") / "tiny-onnx"
    assert main(["export", str(checkpoints["tiny"]), str(out), "--format", "onnx"]) == 0
    return out


@pytest.mark.slow
def test_export_info_run_check_on_an_onnx_export(capsys, cli_export, checkpoints):
    capsys.readouterr()
    code, out, err = dg(capsys, "info", cli_export, "--verify", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["formats"]["onnx"]["dtype"] == "fp32" and info["model"]["layers"] == 4
    assert info["formats"]["onnx"]["experts"] == {"cpu": {"encoder": "unrolled", "denoise_step": "unrolled"},
                                                  "cuda": {"encoder": "sparse", "denoise_step": "dense"}}
    assert info["formats"]["onnx"]["attention"] == "explicit"
    assert info["total_bytes"] > 0 and info["verified"].startswith("sha256")

    code, out, err = dg(capsys, "run", cli_export, "--backend", "cpu", "--prompt", "Hi", "--seed", "4",
                        "--max-new-tokens", "32", "--json")
    assert code == 0, err
    cpu = json.loads(out)
    code, out, err = dg(capsys, "run", cli_export, "--backend", "torch", "--checkpoint", checkpoints["tiny"],
                        "--prompt", "Hi", "--seed", "4", "--max-new-tokens", "32", "--json")
    assert code == 0, err
    assert json.loads(out)["token_ids"] == cpu["token_ids"]
    # --encode-chunk reaches the loop: the prompt and each committed 16-token canvas go in 3-token calls
    code, out, err = dg(capsys, "run", cli_export, "--backend", "cpu", "--prompt", "Hi", "--seed", "4",
                        "--max-new-tokens", "32", "--encode-chunk", "3", "--json")
    assert code == 0, err
    chunked = json.loads(out)
    committed = len(chunked["steps_per_canvas"]) - 1
    assert chunked["timings"]["encode_calls"] == -(-len(chunked["prompt_ids"]) // 3) + committed * -(-16 // 3)

    code, out, err = dg(capsys, "check", cli_export, "--backends", f"cpu,torch={checkpoints['tiny']}",
                        "--max-new-tokens", "32", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and list(report["agreement"].values()) == [1.0]


def test_export_refuses_a_non_empty_out_and_leaves_nothing_behind(capsys, tmp_path, checkpoints):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    code, _, err = dg(capsys, "export", checkpoints["tiny"], out)
    assert code == 1 and "exists and is not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taken")]


def test_demo_solves_a_puzzle_with_the_shipped_model(capsys):
    code, out, err = dg(capsys, "demo", "--backend", "torch", "--seed", "0", "--givens", "70")
    assert code == 0, err
    assert "puzzle (seed 0, 70 givens)" in out
    assert ("solved in" in out) or ("not solved in" in out)
    assert out.count("------+-------+------") == 4  # the puzzle grid and the answer grid


def test_export_quantize_int4_and_what_validation_says(capsys, checkpoints, tmp_path, monkeypatch):
    code, _, err = dg(capsys, "export", checkpoints["tiny"], tmp_path / "q4", "--format", "mlx", "--quantize", "int4",
                      "--no-validate")
    assert code == 0, err
    assert "validation: skipped (--no-validate)" in err
    assert json.loads((tmp_path / "q4" / "dgport.json").read_text())["formats"]["mlx"]["quantization"]["bits"] == 4
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    code, _, err = dg(capsys, "export", checkpoints["tiny"], tmp_path / "o", "--format", "onnx")
    assert code == 0, err
    assert "needs torch and transformers: pip install 'dgport[export]'" in " ".join(err.split())


def test_run_chat_export_and_serve_take_a_checkpoint_folder(capsys, checkpoints, tmp_path, monkeypatch):
    """MODEL may be a Hugging Face checkpoint folder: `run` exports it once into dgport's cache
    (keyed by fingerprint, format, dtype, quantization) and reuses it; `serve` is a command."""
    monkeypatch.setenv("DGPORT_CACHE_DIR", str(tmp_path / "cache"))
    args = ("run", checkpoints["tiny"], "--backend", "cpu", "--prompt", "Hi", "--seed", "3", "--max-new-tokens", "16",
            "--json")
    code, out, err = dg(capsys, *args)
    assert code == 0, err
    exported = [p for p in (tmp_path / "cache" / "exports").iterdir() if not p.name.startswith(".")]
    assert len(exported) == 1 and (exported[0] / "dgport.json").exists()
    stamp = (exported[0] / "dgport.json").stat().st_mtime_ns
    code, again, err = dg(capsys, *args)
    assert code == 0, err
    assert json.loads(again)["token_ids"] == json.loads(out)["token_ids"]
    assert (exported[0] / "dgport.json").stat().st_mtime_ns == stamp  # reused, not exported again
    code, out, err = dg(capsys, "serve", "--help")
    assert code == 0 and "--api-key" in out
