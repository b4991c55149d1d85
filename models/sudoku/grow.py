"""Deepen a trained Sudoku checkpoint while keeping what it computes (nearly), so training can go on
with more layers instead of starting over.

    python -m models.sudoku.grow --init models/sudoku --init-steps 34284 --init-minutes 434 \
        --out /work/sudoku_run/grown

Every decoder layer is followed by a copy of itself (same attention type and head size) whose two
output norms (`post_attention_layernorm`, `post_feedforward_layernorm`) are `--scale` times its
source's. At scale 0 the copy adds nothing to the residual stream and the grown model's logits equal
the original's, but then the copy's weights get no gradient at all (their only way to the loss runs
through the zero norms), and AdamW leaves them where they are: in TRAINING_LOG_30_35's phase 12a the zero
norms of such copies reached only 0.001-0.03 in 1,130 steps. The default, 0.05, adds 5 % of each
layer once more (81 of 100 tuning puzzles solved, against the original's 82) and lets every weight
of the copies train from the first step. The encoder shares the decoder's layer weights; only its
per-layer `layer_scalar` buffers are its own, and they follow the same plan. The folder written is a
checkpoint `train.py --resume` continues (its streams go on after `train_state.json`'s steps; no
optimizer state, so give it `--moment-warmup`). The steps and minutes already trained come from
`--init`'s `train_state.json`, or, for a folder without one (the shipped model), from `--init-steps`
and `--init-minutes`, as train.py takes them; a folder with neither is refused. The largest logit
difference to the original on real puzzles' noised canvases is printed; at scale 0 it must be under
1e-5 or nothing is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

OUTPUT_NORMS = ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")


def grown_config(config: dict) -> tuple[dict, list[int]]:
    """The config with each decoder layer doubled, and for each new layer the old layer it copies."""
    text = dict(config["text_config"])
    n = text["num_hidden_layers"]
    source = [i // 2 for i in range(2 * n)]
    text["num_hidden_layers"] = 2 * n
    text["layer_types"] = [text["layer_types"][s] for s in source]
    per_layer = text.get("per_layer_config") or {}
    text["per_layer_config"] = {str(j): dict(per_layer[str(s)]) for j, s in enumerate(source) if str(s) in per_layer}
    return {**config, "text_config": text}, source


def grow(model, scale: float):
    """A DiffusionGemma with twice the layers whose copies' output norms are `scale` times their
    source's: at 0 it computes exactly what `model` computes."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    config, source = grown_config(model.config.to_dict())
    config = DiffusionGemmaConfig.from_dict(config)
    big = DiffusionGemmaForBlockDiffusion(config)
    old = model.state_dict()
    new = {}
    for name in big.state_dict():
        for prefix in ("model.decoder.layers.", "model.encoder.language_model.layers."):
            if name.startswith(prefix):
                j, rest = name[len(prefix):].split(".", 1)
                src = old[f"{prefix}{source[int(j)]}.{rest}"].clone()
                if int(j) % 2 and rest in OUTPUT_NORMS:
                    src.mul_(scale)
                new[name] = src
                break
        else:
            new[name] = old[name].clone()
    missing, unexpected = big.load_state_dict(new, strict=False)
    if missing or unexpected:
        raise SystemExit(f"grow: state does not map (missing {missing[:3]}, unexpected {unexpected[:3]})")
    big.tie_weights()
    big.eval()
    return big


def max_logit_gap(a, b, seed: int = 0) -> float:
    """Largest |logit| difference between two Sudoku models on noised canvases of real puzzles."""
    import random

    import torch
    from models.sudoku.puzzles import make_puzzle
    from models.sudoku.vocab import CANVAS, EOS_ID, VOCAB_SIZE, build_tokenizer, render_prompt

    tok = build_tokenizer()
    g = torch.Generator().manual_seed(seed)
    gap = 0.0
    for k in range(2):
        puzzle, solution = make_puzzle(random.Random(seed + k), 32)
        prompt = torch.tensor([tok.encode(render_prompt(puzzle)).ids])
        clean = torch.tensor([[tok.token_to_id(ch) for ch in solution] + [EOS_ID]])
        canvas = torch.where(torch.rand(1, CANVAS, generator=g) < 0.5,
                             torch.randint(0, VOCAB_SIZE, (1, CANVAS), generator=g), clean)
        sc = torch.randn(1, CANVAS, VOCAB_SIZE, generator=g) * 3
        with torch.no_grad():
            la, lb = (m(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc).logits for m in (a, b))
        gap = max(gap, (la - lb).abs().max().item())
    return gap


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", required=True, help="checkpoint folder to grow (e.g. models/sudoku)")
    ap.add_argument("--out", required=True, help="folder to write (must not exist)")
    ap.add_argument("--scale", type=float, default=0.05,
                    help="the copies' output norms as a share of their source's, in [0, 1] (0: exact)")
    ap.add_argument("--init-steps", type=int, default=None,
                    help="steps already trained into --init's weights, when it has no train_state.json")
    ap.add_argument("--init-minutes", type=float, default=None,
                    help="minutes already trained into --init's weights, when it has no train_state.json")
    args = ap.parse_args(argv)
    if not 0.0 <= args.scale <= 1.0:
        raise SystemExit(f"--scale {args.scale}: must lie in [0, 1]")

    from models.sudoku.checkpoint import save, trained_counts

    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"--out {out}: already exists; name a new folder")
    init = Path(args.init)
    if not (init / "config.json").is_file():
        raise SystemExit(f"--init {init}: no config.json; name a checkpoint folder")
    counts = trained_counts(init, args.init_steps, args.init_minutes)

    import torch
    from transformers import DiffusionGemmaForBlockDiffusion
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(init, dtype=torch.float32, use_safetensors=True).eval()
    big = grow(model, args.scale)
    gap = max_logit_gap(model, big)
    if args.scale == 0 and gap > 1e-5:
        raise SystemExit(f"grow: the grown model's logits differ by {gap:.2e} from {init}'s; nothing written")
    save(big, out, {**counts, "grown_from": str(init), "grown_scale": args.scale})
    n = big.config.text_config.num_hidden_layers
    print(f"{out}: {n} layers, {sum(p.numel() for p in big.parameters()):,} parameters, copies at scale {args.scale}, "
          f"logits within {gap:.1e} of {init}'s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
