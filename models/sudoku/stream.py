"""Training data: a stream of puzzles from the training seeds, with givens counts drawn from a mix of
ranges and symmetry-transformed copies of the puzzles seen so far."""
from __future__ import annotations

import random

from models.sudoku.puzzles import TRAIN_SEED_BASE, make_puzzle, transform

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
