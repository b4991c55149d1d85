"""The Sudoku model's architecture and its checkpoint folders: the transformers config, a fresh model,
and saving / resuming one (weights, AdamW's moments and the steps and minutes trained)."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from models.fixtures import BASE_GENERATION, FULL, SLIDING
from models.sudoku.vocab import CANVAS, CELL0_ID, VOCAB_SIZE, write_tokenizer

ARCH = dict(
    hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    global_head_dim=64, num_global_key_value_heads=2,
    layer_types=[SLIDING, FULL, SLIDING, FULL],
    sliding_window=256, num_experts=4, top_k_experts=2, moe_intermediate_size=128,
)

GENERATION = {**BASE_GENERATION, "max_new_tokens": CANVAS, "max_denoising_steps": 32}


def hf_config(arch=ARCH):
    from transformers import DiffusionGemmaConfig

    a = dict(arch)
    text = dict(
        vocab_size=VOCAB_SIZE, num_hidden_layers=len(a["layer_types"]), max_position_embeddings=1024,
        use_bidirectional_attention="vision", tie_word_embeddings=True,
        rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        },
        **a,
    )
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=1, num_key_value_heads=1, head_dim=16)
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=CANVAS,
                                eos_token_id=[1, 106], pad_token_id=0, bos_token_id=2)


def build_model(seed: int):
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(hf_config())
    g = torch.Generator().manual_seed(seed + 1)
    H = ARCH["hidden_size"]
    with torch.no_grad():
        emb = model.model.decoder.embed_tokens.weight
        rows, cols, boxes = (torch.randn(9, H, generator=g) for _ in range(3))
        for k in range(81):
            r, c = divmod(k, 9)
            emb[CELL0_ID + k] = 0.02 * (rows[r] + cols[c] + boxes[(r // 3) * 3 + c // 3]) / math.sqrt(3)
    return model


OPTIMIZER_FILE = "optimizer.safetensors"  # AdamW moments by parameter name (safetensors: no pickle)


def optimizer_tensors(opt, model) -> dict:
    """AdamW's state as named tensors: `NAME.exp_avg`, `NAME.exp_avg_sq` and `NAME.step`."""
    import torch

    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                n = names[id(p)]
                out[f"{n}.exp_avg"] = st["exp_avg"].detach().contiguous()
                out[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].detach().contiguous()
                out[f"{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    return out


def restore_optimizer(opt, model, folder: Path) -> bool:
    """Loads `folder/optimizer.safetensors` into AdamW (a restart with fresh moments cost 10-20 points
    of solve rate in the first thousand steps, TRAINING_LOG.md); False when the folder has none."""
    from safetensors.torch import load_file

    path = Path(folder) / OPTIMIZER_FILE
    if not path.exists():
        return False
    saved = load_file(str(path))
    for n, p in model.named_parameters():
        if f"{n}.exp_avg" in saved:
            opt.state[p] = {"step": saved[f"{n}.step"].reshape(()).clone(), "exp_avg": saved[f"{n}.exp_avg"].clone(),
                            "exp_avg_sq": saved[f"{n}.exp_avg_sq"].clone()}
            if opt.state[p]["exp_avg"].shape != p.shape:
                raise SystemExit(f"{path}: {n} has shape {tuple(opt.state[p]['exp_avg'].shape)}, the model {tuple(p.shape)}")
    return True


def save(model, out: Path, meta: dict | None = None, opt=None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    (tmp / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
    write_tokenizer(tmp)
    if meta:
        (tmp / "train_state.json").write_text(json.dumps(meta, indent=2))
    if opt is not None:
        from safetensors.torch import save_file

        save_file(optimizer_tensors(opt, model), str(tmp / OPTIMIZER_FILE))
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def trained_counts(folder: Path, steps: int | None, minutes: float | None) -> dict:
    """The steps and minutes already trained into the checkpoint `folder`: from its train_state.json,
    else from --init-steps / --init-minutes. Training's data and noise streams go on after these
    steps, so a guess (0) would replay the streams the weights were trained on."""
    for flag, value in (("--init-steps", steps), ("--init-minutes", minutes)):
        if value is not None and not 0 <= value < 1e9:
            raise SystemExit(f"{flag} {value}: must be a count of at least 0")
    state = Path(folder) / "train_state.json"
    if state.is_file():
        if steps is not None or minutes is not None:
            raise SystemExit(f"--init-steps/--init-minutes: {state} already counts them; leave the flags out")
        try:
            meta = json.loads(state.read_text())
            counts = {"total_steps": int(meta["total_steps"]), "total_minutes": float(meta["total_minutes"])}
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{state}: no total_steps and total_minutes ({e}); fix or remove the file") from None
        if counts["total_steps"] < 0 or counts["total_minutes"] < 0:
            raise SystemExit(f"{state}: negative counts; fix or remove the file")
        return counts
    if steps is None or minutes is None:
        raise SystemExit(f"{folder}: no train_state.json; give --init-steps and --init-minutes "
                         "(the steps and minutes its weights were trained)")
    return {"total_steps": steps, "total_minutes": minutes}
