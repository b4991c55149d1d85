"""Train the Sudoku DiffusionGemma that ships in models/sudoku/ (CPU, reproducible).

    nice -n 10 python -m models.sudoku.train --out /tmp/sudoku_run --minutes 60 --threads 1

writes a complete Hugging Face checkpoint folder to --out every --save-every minutes (config.json,
model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json) and a log line per
--log-every steps, with AdamW's state in `optimizer.safetensors`; `--resume` (or `--init FOLDER`)
continues from the folder's weights and, when it has one, that optimizer state (`--fresh-optimizer`
to restart it).

Architecture: `transformers.DiffusionGemmaForBlockDiffusion`, unchanged. Data: puzzles from
`models.sudoku.puzzles` (seeds >= TRAIN_SEED_BASE, disjoint from the evaluation's small seeds),
multiplied by random Sudoku symmetries. Objective (spec §6.1): the prompt (chat template around the
puzzle) is encoded causally into a KV cache; the answer canvas (81 digits + <eos>) is corrupted with
noise level t ~ U(eps, 1) (each position replaced by a uniform random vocabulary id with prob. t) and
the decoder is trained with cross-entropy on the clean canvas at every position. Self-conditioning:
with probability 0.5 per step a first no-grad decoder pass produces logits that are fed (detached)
as `self_conditioning_logits` to the second, trained pass.

Prompt structure: the chat template starts with a fixed system turn holding 81 cell tokens
<r1c1> .. <r9c9>. Canvas position i, cell token i and puzzle character i then lie at constant
relative offsets, so RoPE attention can fetch "which cell am I" and "what is given here" for every
canvas position; the cell tokens' embeddings are initialised as row + column + box vectors.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

from models.sudoku.checkpoint import OPTIMIZER_FILE, build_model, restore_optimizer, save, trained_counts
from models.sudoku.stream import DEFAULT_GIVENS_MIX, PuzzleStream, parse_givens_mix
from models.sudoku.vocab import CANVAS, EOS_ID, VOCAB_SIZE, build_tokenizer, render_prompt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/sudoku_run")
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock training budget")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16, help="puzzles per step")
    ap.add_argument("--draws", type=int, default=2, help="noised canvases per puzzle (shared prompt cache)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=float, default=5.0, help="minutes")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--given-weight", type=float, default=1.0,
                    help="loss weight of cells given in the puzzle (blanks and <eos> weigh 1)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--moment-warmup", type=int, default=0,
                    help="first run this many steps at learning rate 0, so a fresh AdamW's moments fill before "
                         "any update (resuming a converged model without its optimizer state)")
    ap.add_argument("--fresh-optimizer", action="store_true",
                    help="ignore the optimizer.safetensors beside the weights (AdamW restarts)")
    ap.add_argument("--init", default=None,
                    help="start from this checkpoint folder's weights (e.g. models/sudoku) instead of a fresh model")
    ap.add_argument("--init-steps", type=int, default=None,
                    help="steps already trained into the weights of --init (or --resume's folder) when it has no "
                         "train_state.json: the data and noise streams continue after them")
    ap.add_argument("--init-minutes", type=float, default=None,
                    help="minutes already trained into those weights, when the folder has no train_state.json")
    ap.add_argument("--givens-mix", default=None,
                    help="givens ranges of fresh puzzles, e.g. '36-45:0.5,28-35:0.3,46-60:0.2' (default: 70%% 36-50, "
                         "20%% 26-35, 10%% 51-70)")
    ap.add_argument("--sc-temp", default=None,
                    help="TMIN,TMAX: divide the self-conditioning logits by T ~ U(TMIN, TMAX) before passing them, "
                         "as the sampler does (it passes logits / temperature; default: no division)")
    ap.add_argument("--sampler-noise", type=float, default=0.0,
                    help="probability per step of a canvas shaped like the sampler's: a no-grad pass on the "
                         "noised canvas, its entropy-bound accepted samples at temperature T kept and the rest "
                         "renoised uniformly, its logits / T as self-conditioning")
    ap.add_argument("--entropy-bound", default="1,6", help="LO,HI: accept bound ~ U(LO, HI) for --sampler-noise")
    ap.add_argument("--template-prob", type=float, default=0.0, help="probability per canvas that its givens "
                    "are clean in it, as the answer template keeps them (the sampler's budget: blanks only)")
    ap.add_argument("--sc-prob", type=float, default=0.5,
                    help="probability per step of the plain self-conditioning pass (when not --sampler-noise)")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward passes (weights fp32)")
    ap.add_argument("--steps", type=int, default=0, help="also stop after this many steps (0: only --minutes)")
    ap.add_argument("--speed-test", type=int, default=0, help="run N steps, print timings, exit")
    args = ap.parse_args(argv)

    out = Path(args.out)
    # a resumed run continues the data and noise streams where the last one stopped instead of
    # replaying them: every stream is seeded with seed + the steps already trained
    start = out if args.resume else Path(args.init) if args.init else None
    if start is not None and not (start / "config.json").is_file():
        raise SystemExit(f"{'--out' if args.resume else '--init'} {start}: no config.json; name a checkpoint folder")
    if start is None and (args.init_steps is not None or args.init_minutes is not None):
        raise SystemExit("--init-steps/--init-minutes: only with --init or --resume")
    before = trained_counts(start, args.init_steps, args.init_minutes) if start else {}
    done, done_minutes = before.get("total_steps", 0), before.get("total_minutes", 0.0)

    if args.bf16:
        from bench.bench_batch import cpu_flags

        if not {"avx512_bf16", "amx_bf16"} & set(cpu_flags().split()):
            # measured on a 2-core AMD EPYC with avx2 only: ~23 s a step with --bf16, 2.4 s without
            print("warning: --bf16 on a CPU without avx512_bf16 or amx_bf16: autocast emulates bfloat16 and "
                  "runs ~10x slower than fp32 here; leave --bf16 out", file=sys.stderr, flush=True)

    import torch
    import torch.nn.functional as F
    from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + done)
    if start is not None:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(start, dtype=torch.float32, use_safetensors=True)
    else:
        model = build_model(args.seed)
    mix = parse_givens_mix(args.givens_mix) if args.givens_mix else DEFAULT_GIVENS_MIX
    sc_temp = tuple(float(x) for x in args.sc_temp.split(",")) if args.sc_temp else None
    bound_lo, bound_hi = (float(x) for x in args.entropy_bound.split(","))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    model.config._attn_implementation = "eager"  # faster than CPU sdpa at these sizes; not saved
    model.train()
    enc = model.model.encoder
    tok = build_tokenizer()
    V, C = VOCAB_SIZE, CANVAS

    prefix_text, _, suffix_text = render_prompt("\x00").partition("\x00")
    prefix_ids = torch.tensor([tok.encode(prefix_text).ids])
    suffix_ids = tok.encode(suffix_text).ids
    digit_id = {ch: tok.token_to_id(ch) for ch in "123456789."}
    P0 = prefix_ids.shape[1]
    prompt_len = P0 + 81 + len(suffix_ids)
    assert tok.encode(render_prompt("." * 81)).ids == prefix_ids[0].tolist() + [digit_id["."]] * 81 + suffix_ids

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    if start is not None and not args.fresh_optimizer and restore_optimizer(opt, model, start):
        print(f"optimizer state restored from {start / OPTIMIZER_FILE}", flush=True)

    def lr_at(step):
        # --moment-warmup steps at lr 0 (AdamW's moments fill, the weights stay), then linear warmup
        # over --warmup steps, then cosine over the wall-clock budget (the run is time-boxed)
        if step < args.moment_warmup:
            return 0.0
        step -= args.moment_warmup
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = min(1.0, (time.time() - t_start) / budget)
        m = args.min_lr_frac
        return args.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * frac)))

    stream = PuzzleStream(args.seed + done, givens_mix=mix)
    coin = random.Random(args.seed + done + 7)  # self-conditioning coin flips
    B, R = args.batch, args.draws
    eos = torch.full((B, 1), EOS_ID)
    t_start = time.time()
    last_save = t_start
    step = 0
    ema = None
    budget = args.minutes * 60
    def state(step):
        minutes = (time.time() - t_start) / 60
        return {"step": step, "minutes": minutes, "ema_loss": ema, "total_steps": done + step,
                "total_minutes": done_minutes + minutes}

    print(f"resuming after {done} steps" if done else "fresh streams", flush=True)
    print(f"prompt {prompt_len} tokens, canvas {C}, params {sum(p.numel() for p in params):,}", flush=True)
    while True:
        elapsed = time.time() - t_start
        if elapsed > budget or (args.speed_test and step >= args.speed_test) or (args.steps and step >= args.steps):
            break
        t0, cpu0 = time.time(), time.process_time()
        batch = stream(B)
        t_data = time.time() - t0
        puzzles = torch.tensor([[digit_id[ch] for ch in p] for p, _ in batch])
        given = puzzles != digit_id["."]  # [B, 81]
        target = torch.cat([torch.tensor([[digit_id[ch] for ch in s] for _, s in batch]), eos], dim=1)  # [B, C]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)

        # encoder: fixed prefix once (batch 1), then the puzzle + suffix for the batch
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        with autocast:
            enc(input_ids=prefix_ids, past_key_values=cache, position_ids=torch.arange(P0)[None])
            cache.batch_repeat_interleave(B)
            rest = torch.cat([puzzles, torch.tensor(suffix_ids).expand(B, -1)], dim=1)
            enc(input_ids=rest, past_key_values=cache,
                position_ids=torch.arange(P0, prompt_len)[None].expand(B, -1))
        if R > 1:
            cache.batch_repeat_interleave(R)
        tgt = target.repeat_interleave(R, dim=0)
        n = B * R
        # uniform-state noise (spec §6.1)
        tlev = torch.rand(n, 1) * (1 - 1e-3) + 1e-3
        noise = torch.randint(0, V, (n, C))
        canvas = torch.where(torch.rand(n, C) < tlev, noise, tgt)
        fixed = torch.zeros(n, C, dtype=torch.bool)  # the template's positions: its givens, where drawn
        fixed[:, :81] = given.repeat_interleave(R, dim=0) & (torch.rand(n, 1) < args.template_prob)
        canvas = torch.where(fixed, tgt, canvas)
        dec_pos = torch.arange(prompt_len, prompt_len + C)[None].expand(n, -1)
        sc = None
        u = coin.random()
        mode = "plain"
        if u < args.sampler_noise:
            # what the entropy-bound sampler shows the model from its second step on: the samples it
            # accepted (possibly wrong) plus uniform renoise, and the previous logits / T
            with torch.no_grad(), autocast:
                first = model(decoder_input_ids=canvas, past_key_values=cache, decoder_position_ids=dec_pos).logits
            first = first.float()
            lo, hi = sc_temp or (1.0, 1.0)
            temp = torch.rand(n, 1, 1) * (hi - lo) + lo
            sc = first / temp
            probs = sc.softmax(-1)
            sampled = torch.multinomial(probs.view(-1, V), 1).view(n, C)
            ent = (-(probs * torch.log_softmax(sc, -1)).sum(-1)).masked_fill(fixed, 0.0)  # fixed: no budget
            sorted_e, order = ent.sort(dim=-1, stable=True)
            before_e = sorted_e.cumsum(-1) - sorted_e
            bound = torch.rand(n, 1) * (bound_hi - bound_lo) + bound_lo
            accepted = torch.zeros(n, C, dtype=torch.bool).scatter(1, order, before_e <= bound)
            canvas = torch.where(fixed, tgt, torch.where(accepted, sampled, torch.randint(0, V, (n, C))))
            mode = f"sampler(acc {accepted[:, :81].float().mean().item():.2f})"
        elif u < args.sampler_noise + (1 - args.sampler_noise) * args.sc_prob:
            with torch.no_grad(), autocast:
                sc = model(decoder_input_ids=canvas, past_key_values=cache, decoder_position_ids=dec_pos).logits
            sc = sc.float()
            mode = "sc"
            if sc_temp:
                sc = sc / (torch.rand(n, 1, 1) * (sc_temp[1] - sc_temp[0]) + sc_temp[0])
        with autocast:
            logits = model(decoder_input_ids=canvas, past_key_values=cache, decoder_position_ids=dec_pos,
                           self_conditioning_logits=sc).logits
        logits = logits.float()
        per_cell = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1), reduction="none").view(n, C)
        weight = torch.ones(n, C)
        weight[:, :81][given.repeat_interleave(R, dim=0)] = args.given_weight
        loss = (per_cell * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            pred = logits.argmax(-1)
            cell_acc = (pred[:, :81] == tgt[:, :81]).float().mean().item()
            hi = tlev[:, 0] > 0.9
            acc_hi = (pred[hi, :81] == tgt[hi, :81]).float().mean().item() if hi.any() else float("nan")
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % args.log_every == 0 or args.speed_test:
            print(f"step {step} t={time.time() - t_start:.0f}s loss {loss.item():.4f} ema {ema:.4f} "
                  f"acc {cell_acc:.3f} acc(t>0.9) {acc_hi:.3f} lr {lr_at(step):.2e} "
                  f"step_s {time.time() - t0:.2f} cpu_s {time.process_time() - cpu0:.2f} data_s {t_data:.2f} {mode}",
                  flush=True)
        if time.time() - last_save > args.save_every * 60:
            model.eval()
            save(model, out, state(step), opt)
            model.train()
            last_save = time.time()
            print(f"saved {out} at step {step}", flush=True)
    if not args.speed_test:
        model.eval()
        save(model, out, state(step), opt)
        print(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min, saved {out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
