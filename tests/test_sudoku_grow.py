"""models/sudoku/grow.py: deepening the Sudoku model keeps what it computes, and training resumes it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "sudoku"


@pytest.fixture(scope="module")
def shipped():
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(MODEL, dtype=torch.float32, use_safetensors=True).eval()


def test_grown_model_computes_the_same_logits(shipped):
    from models.sudoku.grow import grow, max_logit_gap

    big = grow(shipped, 0.0)
    text = big.config.text_config
    old = shipped.config.text_config
    assert text.num_hidden_layers == 2 * old.num_hidden_layers
    assert text.layer_types[::2] == old.layer_types and text.layer_types[1::2] == old.layer_types
    assert max_logit_gap(shipped, big) <= 1e-5


def test_new_layers_are_in_the_path(shipped):
    """The gap check can fail: once a copy's zero output norm moves, the logits move with it."""
    import torch
    from models.sudoku.grow import grow, max_logit_gap

    big = grow(shipped, 0.0)
    for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
        moved = grow(shipped, 0.0)
        with torch.no_grad():
            getattr(moved.model.decoder.layers[3], name).weight.fill_(0.5)
        assert max_logit_gap(big, moved) > 1e-3, name


def copy_gradient(model) -> float:
    """Largest |gradient| on a copy's attention weights (layer 3 copies layer 2) for one loss."""
    import torch
    from models.sudoku.vocab import CANVAS, VOCAB_SIZE

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, VOCAB_SIZE, (1, 40), generator=g)
    canvas = torch.randint(0, VOCAB_SIZE, (1, CANVAS), generator=g)
    model.zero_grad()
    logits = model(input_ids=prompt, decoder_input_ids=canvas).logits
    torch.nn.functional.cross_entropy(logits[0], torch.randint(0, VOCAB_SIZE, (CANVAS,), generator=g)).backward()
    return model.model.decoder.layers[3].self_attn.q_proj.weight.grad.abs().max().item()


def test_zero_copies_get_no_gradient_and_scaled_ones_do(shipped):
    """Why --scale defaults to 0.05: a copy behind zero norms never trains (AdamW moves nothing)."""
    from models.sudoku.grow import grow, max_logit_gap

    assert copy_gradient(grow(shipped, 0.0)) == 0.0
    scaled = grow(shipped, 0.05)
    assert copy_gradient(scaled) > 1e-6
    assert 1e-3 < max_logit_gap(shipped, scaled) < 5.0


def test_grow_refuses_an_existing_folder_and_a_missing_checkpoint(tmp_path):
    base = [sys.executable, "-m", "models.sudoku.grow"]
    taken = subprocess.run(base + ["--init", str(MODEL), "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert taken.returncode != 0 and "already exists" in taken.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []
    wild = subprocess.run(base + ["--init", str(MODEL), "--out", str(tmp_path / "w"), "--scale", "2"], cwd=REPO,
                          capture_output=True, text=True)
    assert wild.returncode != 0 and "--scale 2.0: must lie in [0, 1]" in wild.stderr.strip().splitlines()[-1]
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = subprocess.run(base + ["--init", str(empty), "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "no config.json" in bad.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_grow_takes_the_trained_steps_from_the_folder_or_the_flags_and_never_guesses(tmp_path):
    from models.sudoku.checkpoint import trained_counts

    with pytest.raises(SystemExit, match="no train_state.json; give --init-steps and --init-minutes"):
        trained_counts(MODEL, None, None)
    with pytest.raises(SystemExit, match="give --init-steps"):
        trained_counts(MODEL, 34_284, None)
    assert trained_counts(MODEL, 34_284, 434.0) == {"total_steps": 34_284, "total_minutes": 434.0}
    (tmp_path / "train_state.json").write_text(json.dumps({"step": 9, "total_steps": 38_982, "total_minutes": 539.5}))
    assert trained_counts(tmp_path, None, None) == {"total_steps": 38_982, "total_minutes": 539.5}
    with pytest.raises(SystemExit, match="already counts them; leave the flags out"):
        trained_counts(tmp_path, 1, 1.0)
    (tmp_path / "train_state.json").write_text(json.dumps({"step": 9}))
    with pytest.raises(SystemExit, match="no total_steps and total_minutes"):
        trained_counts(tmp_path, None, None)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "models.sudoku.grow", "--init", str(MODEL), "--out", str(out),
                          "--init-steps", "-3", "--init-minutes", "1"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode != 0 and "--init-steps -3: must be a count" in run.stderr.strip().splitlines()[-1]
    assert not out.exists()


def test_training_refuses_a_folder_whose_trained_steps_it_would_guess(tmp_path):
    """train.py, like grow.py, takes the steps already trained from the folder it starts from or from
    the flags: resuming the shipped folder (no train_state.json) from step 0 would replay its streams."""
    base = [sys.executable, "-m", "models.sudoku.train", "--steps", "1"]

    def refused(args, message):
        run = subprocess.run(base + args, cwd=REPO, capture_output=True, text=True)
        assert run.returncode != 0 and message in run.stderr.strip().splitlines()[-1], run.stderr[-2000:]

    shipped = tmp_path / "shipped"  # a copy: a regression here must not train into models/sudoku
    shipped.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(MODEL / name, shipped / name)
    refused(["--out", str(shipped), "--resume"], "no train_state.json; give --init-steps and --init-minutes")
    assert sorted(p.name for p in shipped.iterdir()) == ["config.json", "model.safetensors"]
    refused(["--out", str(tmp_path / "o"), "--init", str(MODEL), "--init-steps", "5"], "give --init-steps")
    refused(["--out", str(tmp_path / "o"), "--init", str(MODEL), "--init-steps", "-1", "--init-minutes", "1"],
            "--init-steps -1: must be a count")
    refused(["--out", str(tmp_path / "o"), "--init-steps", "5", "--init-minutes", "1"], "only with --init or --resume")
    refused(["--out", str(tmp_path / "none"), "--resume"], "no config.json; name a checkpoint folder")
    assert not (tmp_path / "o").exists() and not (tmp_path / "none").exists()


@pytest.mark.slow
def test_dgport_reads_the_grown_folder_and_training_resumes_it(tmp_path):
    from dgport.exporters.checkpoint import read_checkpoint

    out = tmp_path / "grown"
    made = subprocess.run([sys.executable, "-m", "models.sudoku.grow", "--init", str(MODEL), "--out", str(out),
                           "--init-steps", "34284", "--init-minutes", "434"], cwd=REPO, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]
    assert len(read_checkpoint(out).config.layer_types) == 8
    state = json.loads((out / "train_state.json").read_text())
    assert state == {"total_steps": 34_284, "total_minutes": 434.0, "grown_from": str(MODEL), "grown_scale": 0.05}
    run = subprocess.run([sys.executable, "-m", "models.sudoku.train", "--out", str(out), "--resume", "--steps", "1",
                          "--batch", "2", "--draws", "1", "--log-every", "1", "--moment-warmup", "1"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "params 3,363,712" in run.stdout and "done: 1 steps" in run.stdout
    assert json.loads((out / "config.json").read_text())["text_config"]["num_hidden_layers"] == 8


def test_the_committed_training_checkpoint_is_the_shipped_model_grown_and_trained():
    """models/sudoku_next (TRAINING_LOG_30_35 phase 14) is what a later session resumes: the shipped
    geometry grown by grow.py, weights only (no optimizer state, nothing pickled), its steps counted."""
    from models.sudoku.grow import grown_config
    from transformers import DiffusionGemmaForBlockDiffusion

    nxt = REPO / "models" / "sudoku_next"
    assert sorted(p.name for p in nxt.iterdir()) == ["README.md", "config.json", "model.safetensors", "train_state.json"]
    config = json.loads((nxt / "config.json").read_text())
    expected, _ = grown_config(json.loads((MODEL / "config.json").read_text()))
    text, grown = ({k: v for k, v in c["text_config"].items() if k != "dtype"} for c in (config, expected))
    assert text == grown
    state = json.loads((nxt / "train_state.json").read_text())
    # counted after the shipped model's 34,284 steps and 434 minutes (a resumed run's "step" is its own)
    assert state["step"] > 0 and state["total_steps"] >= 34_284 + state["step"]
    assert state["total_minutes"] >= 434 + state["minutes"]
    assert f"{state['total_steps']:,} steps" in (nxt / "README.md").read_text()
    model, info = DiffusionGemmaForBlockDiffusion.from_pretrained(nxt, use_safetensors=True, output_loading_info=True)
    assert model.config.text_config.num_hidden_layers == 8
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
