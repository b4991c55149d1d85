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
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

from models.fixtures import BASE_GENERATION, FULL, SLIDING, save_tokenizer
from models.sudoku.puzzles import TRAIN_SEED_BASE, make_puzzle, transform


# ---------------------------------------------------------------- vocabulary and tokenizer
SPECIAL = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
    48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>',
    98: "<|think|>", 100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>",
}
VOCAB_SIZE = 192
NEWLINE_ID = 107
CELL0_ID = 108  # <r1c1> .. <r9c9> = 108 .. 188
CELLS = [f"<r{r + 1}c{c + 1}>" for r in range(9) for c in range(9)]
CHARS = list("123456789.0 abcdefghijklmnopqrstuvwxyz|-+:,")
DIGIT_IDS = None  # filled by vocab()
EOS_ID = 1
CANVAS = 82  # 81 digits + <eos>

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "<|turn>system{{ '\\n' }}" + "".join(CELLS) + "<turn|>{{ '\\n' }}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}"
    "<|turn>user{{ '\\n' }}"
    "{{ m.content | replace(' ', '') | replace('\\n', '') | replace('\\r', '') | replace('\\t', '') "
    "| replace('|', '') | replace('-', '') | replace('+', '') | replace('0', '.') | replace('_', '.') }}"
    "<turn|>{{ '\\n' }}"
    "{%- elif m.role != 'system' -%}"
    "<|turn>model{{ '\\n' }}{{ m.content | trim }}<turn|>{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|turn>model{{ '\\n' }}<|channel>thought{{ '\\n' }}<channel|>{%- endif -%}"
)


def vocab() -> dict[str, int]:
    v = {name: i for i, name in SPECIAL.items()}
    v["\n"] = NEWLINE_ID
    for k, name in enumerate(CELLS):
        v[name] = CELL0_ID + k
    free = [i for i in range(5, 98) if i not in SPECIAL]
    for ch, i in zip(CHARS, free):
        v[ch] = i
    used = set(v.values())
    for i in range(VOCAB_SIZE):
        if i not in used:
            v[f"<unused{i}>"] = i
    assert len(v) == VOCAB_SIZE and max(v.values()) == VOCAB_SIZE - 1
    return v


def build_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    v = vocab()
    tok = Tokenizer(models.WordLevel(vocab=v, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, i in sorted(v.items(), key=lambda kv: kv[1]) if t.startswith("<") and len(t) > 1])
    return tok


def write_tokenizer(out: Path) -> None:
    """tokenizer.json built here; tokenizer_config.json is the shipped one, whose chat template also
    refuses what is not a puzzle and which carries the model's dgport section (task, check prompts).
    CHAT_TEMPLATE above renders valid puzzles exactly as it does."""
    import shutil

    save_tokenizer(out, build_tokenizer(), CHAT_TEMPLATE, 4096)
    shutil.copyfile(Path(__file__).resolve().with_name("tokenizer_config.json"), out / "tokenizer_config.json")


def render_prompt(puzzle: str) -> str:
    """The chat-template rendering of one user turn (what dgport/HF produce), without jinja."""
    return ("<bos><|turn>system\n" + "".join(CELLS) + "<turn|>\n<|turn>user\n" + puzzle
            + "<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")


# ---------------------------------------------------------------- model
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


# ---------------------------------------------------------------- data
# (low, high, weight): the givens count of a fresh puzzle is drawn from these ranges. The default is
# phases 1-3's mix (mostly 36-50, some harder and some easier); `--givens-mix` changes it.
DEFAULT_GIVENS_MIX = ((36, 50, 0.70), (26, 35, 0.20), (51, 70, 0.10))


def parse_givens_mix(text: str):
    """'36-45:0.5,28-35:0.3' -> ((36, 45, 0.5), (28, 35, 0.3)); weights are normalised by their sum."""
    mix = []
    for part in text.split(","):
        rng_text, _, w = part.partition(":")
        lo, _, hi = rng_text.partition("-")
        lo, hi, w = int(lo), int(hi or lo), float(w or 1)
        if not 23 <= lo <= hi <= 80 or w <= 0:
            raise SystemExit(f"--givens-mix: bad part {part!r} (want LOW-HIGH:WEIGHT with 23 <= LOW <= HIGH <= 80)")
        mix.append((lo, hi, w))
    total = sum(w for _, _, w in mix)
    return tuple((lo, hi, w / total) for lo, hi, w in mix)


def sample_givens(rng: random.Random, mix=DEFAULT_GIVENS_MIX) -> int:
    u, acc = rng.random(), 0.0
    for lo, hi, w in mix:
        acc += w
        if u < acc:
            return rng.randint(lo, hi)
    lo, hi, _ = mix[-1]
    return rng.randint(lo, hi)


class PuzzleStream:
    """Fresh puzzles from training seeds, mixed with symmetry-transformed copies of a growing pool."""

    def __init__(self, seed: int, fresh_fraction: float = 0.25, givens_mix=DEFAULT_GIVENS_MIX):
        self.givens_mix = givens_mix
        self.rng = random.Random(TRAIN_SEED_BASE + seed)
        self.pool: list[tuple[str, str]] = []
        self.fresh_fraction = fresh_fraction
        self.next_seed = TRAIN_SEED_BASE + 1_000_000 * (seed + 1)

    def fresh(self):
        r = random.Random(self.next_seed)
        self.next_seed += 1
        p = make_puzzle(r, sample_givens(r, self.givens_mix))
        self.pool.append(p)
        return p

    def __call__(self, n: int):
        out = []
        for _ in range(n):
            if len(self.pool) < 64 or self.rng.random() < self.fresh_fraction:
                p = self.fresh()
            else:
                p = self.pool[self.rng.randrange(len(self.pool))]
            out.append(transform(*p, self.rng))
        return out


# ---------------------------------------------------------------- training
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
    ap.add_argument("--init-steps", type=int, default=0,
                    help="steps already trained into --init's weights: its data and noise streams continue after them")
    ap.add_argument("--init-minutes", type=float, default=0.0, help="minutes already trained into --init's weights")
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

    import torch
    import torch.nn.functional as F
    from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    # a resumed run continues the data and noise streams where the last one stopped instead of
    # replaying them: every stream is seeded with seed + the steps already trained
    state_file = out / "train_state.json"
    before = json.loads(state_file.read_text()) if args.resume and state_file.exists() else {}
    if args.init and not args.resume:
        before = {"total_steps": args.init_steps, "total_minutes": args.init_minutes}
    done, done_minutes = before.get("total_steps", 0), before.get("total_minutes", 0.0)
    torch.manual_seed(args.seed + done)
    if args.resume or args.init:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(out if args.resume else args.init,
                                                                dtype=torch.float32, use_safetensors=True)
    else:
        model = build_model(args.seed)
    mix = parse_givens_mix(args.givens_mix) if args.givens_mix else DEFAULT_GIVENS_MIX
    sc_temp = tuple(float(x) for x in args.sc_temp.split(",")) if args.sc_temp else None
    bound_lo, bound_hi = (float(x) for x in args.entropy_bound.split(","))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    model.config._attn_implementation = "eager"  # faster than CPU sdpa at these sizes; not saved
    model.train()
    enc = model.model.encoder
    dec_model = model.model
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
    source = out if args.resume else args.init
    if source and not args.fresh_optimizer and restore_optimizer(opt, model, Path(source)):
        print(f"optimizer state restored from {Path(source) / OPTIMIZER_FILE}", flush=True)

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
