"""Seeded Sudoku puzzles with unique solutions and a chosen number of givens (pure Python, no torch).

Grids are 81-character strings in row-major order: digits 1-9, '.' for a blank. Everything is
deterministic in its seed, so training and evaluation draw from disjoint, reproducible streams:

    puzzles = generate(seed=0, n=100, min_givens=36, max_givens=45)   # list of Puzzle
    is_valid_solution(p.puzzle, answer)                                # the evaluation's checker

`make_puzzle` fills a random solved grid by randomised backtracking, then blanks cells in a random
order, keeping a blank only while the puzzle still has exactly one solution, until `givens` cells
remain (it retries with a new grid when the greedy removal gets stuck, which only happens below
about 25 givens). `transform` applies a random Sudoku symmetry (digit relabelling, row/column
permutations inside bands/stacks, band/stack permutations, transposition); it preserves validity,
uniqueness and the number of givens, which lets training multiply a pool of generated puzzles.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

ALL = 0x3FE  # bits 1..9
# Training draws puzzles from seeds >= TRAIN_SEED_BASE; `generate(seed, n)` uses seed * 1_000_003 + k,
# so evaluation seeds 0..8 never overlap them (checked by `eval_seeds_disjoint`).
TRAIN_SEED_BASE = 10_000_000
DIGITS = "123456789"
BOX = [(r // 3) * 3 + c // 3 for r in range(9) for c in range(9)]
PEERS = []
for _i in range(81):
    _r, _c = divmod(_i, 9)
    PEERS.append(sorted({j for j in range(81) if j != _i and (j // 9 == _r or j % 9 == _c or BOX[j] == BOX[_i])}))


@dataclass(frozen=True)
class Puzzle:
    puzzle: str  # 81 chars, '.' = blank
    solution: str  # 81 digits
    givens: int
    seed: int  # the seed that reproduces it: make_puzzle(random.Random(seed), givens)


def _popcount(x: int) -> int:
    return bin(x).count("1")


def count_solutions(grid, limit: int = 2) -> int:
    """Number of completions of `grid` (81 ints, 0 = blank, or a puzzle string), up to `limit`."""
    if isinstance(grid, str):
        grid = [0 if ch in ".0" else int(ch) for ch in grid]
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    blanks = []
    for i, v in enumerate(grid):
        if v:
            bit = 1 << v
            r, c, b = i // 9, i % 9, BOX[i]
            if rows[r] & bit or cols[c] & bit or boxes[b] & bit:
                return 0
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
        else:
            blanks.append(i)
    count = 0

    def search(blanks):
        nonlocal count
        if not blanks:
            count += 1
            return
        # most constrained blank first
        best, best_n, best_cand = -1, 10, 0
        for k, i in enumerate(blanks):
            cand = ALL & ~(rows[i // 9] | cols[i % 9] | boxes[BOX[i]])
            n = _popcount(cand)
            if n < best_n:
                best, best_n, best_cand = k, n, cand
                if n <= 1:
                    break
        if best_n == 0:
            return
        i = blanks[best]
        rest = blanks[:best] + blanks[best + 1:]
        r, c, b = i // 9, i % 9, BOX[i]
        cand = best_cand
        while cand:
            bit = cand & -cand
            cand ^= bit
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            search(rest)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            if count >= limit:
                return

    search(blanks)
    return count


def random_solution(rng: random.Random) -> list[int]:
    """A uniformly shuffled solved grid (randomised backtracking fill)."""
    grid = [0] * 81
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9

    def fill(i):
        if i == 81:
            return True
        r, c, b = i // 9, i % 9, BOX[i]
        digits = list(range(1, 10))
        rng.shuffle(digits)
        for v in digits:
            bit = 1 << v
            if (rows[r] | cols[c] | boxes[b]) & bit:
                continue
            grid[i] = v
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            if fill(i + 1):
                return True
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
        grid[i] = 0
        return False

    fill(0)
    return grid


def make_puzzle(rng: random.Random, givens: int, max_tries: int = 50) -> tuple[str, str]:
    """(puzzle, solution) with exactly `givens` clues and a unique solution."""
    if not 17 <= givens <= 81:
        raise ValueError(f"givens must lie in [17, 81] (got {givens})")
    for _ in range(max_tries):
        sol = random_solution(rng)
        grid = list(sol)
        order = list(range(81))
        rng.shuffle(order)
        left = 81
        for i in order:
            if left == givens:
                break
            v = grid[i]
            grid[i] = 0
            if count_solutions(grid, 2) == 1:
                left -= 1
            else:
                grid[i] = v
        if left == givens:
            return ("".join(str(v) if v else "." for v in grid), "".join(map(str, sol)))
    raise RuntimeError(f"could not make a unique puzzle with {givens} givens in {max_tries} tries")


# Fewest givens `make_puzzle` reaches reliably: its greedy removal stops at a minimal puzzle of
# 22-27 givens (measured on 40 grids: 22 once, 23 five times), so 23 succeeds within 50 grids
# with probability ~0.9997 while 17-21 would need a different search.
MIN_GIVENS = 23


def puzzle_from_seed(s: int, min_givens: int, max_givens: int | None = None) -> Puzzle:
    """The puzzle of seed `s`: its givens count drawn uniformly in [min_givens, max_givens] from
    random.Random(s), then `make_puzzle` on the same stream (what `generate` does per puzzle)."""
    rng = random.Random(s)
    g = rng.randint(min_givens, min_givens if max_givens is None else max_givens)
    p, sol = make_puzzle(rng, g)
    return Puzzle(p, sol, g, s)


def generate(seed: int, n: int, min_givens: int = 36, max_givens: int = 45) -> list[Puzzle]:
    """`n` puzzles; puzzle k uses seed `seed * 1_000_003 + k` and a givens count drawn from it
    uniformly in [min_givens, max_givens]."""
    return [puzzle_from_seed(seed * 1_000_003 + k, min_givens, max_givens) for k in range(n)]


def conflicts(grid: str) -> list[int]:
    """Indices of the filled cells of an 81-character grid that repeat a digit in their row,
    column or box."""
    return [i for i, ch in enumerate(grid) if ch in DIGITS and any(grid[j] == ch for j in PEERS[i])]


def eval_seeds_disjoint(seed: int, n: int) -> bool:
    """True if generate(seed, n) uses no training seed."""
    return seed >= 0 and seed * 1_000_003 + n <= TRAIN_SEED_BASE


def transform(puzzle: str, solution: str, rng: random.Random) -> tuple[str, str]:
    """Apply one random Sudoku symmetry to a puzzle and its solution."""
    def perm3():
        p = [0, 1, 2]
        rng.shuffle(p)
        return p

    bands, stacks = perm3(), perm3()
    row_map = [bands[b] * 3 + x for b in range(3) for x in perm3()]
    col_map = [stacks[s] * 3 + x for s in range(3) for x in perm3()]
    digits = list(DIGITS)
    rng.shuffle(digits)
    relabel = {d: digits[k] for k, d in enumerate(DIGITS)}
    relabel["."] = "."
    flip = rng.random() < 0.5

    def apply(g):
        out = []
        for r in range(9):
            for c in range(9):
                rr, cc = row_map[r], col_map[c]
                if flip:
                    rr, cc = cc, rr
                out.append(relabel[g[rr * 9 + cc]])
        return "".join(out)

    return apply(puzzle), apply(solution)


def normalize(text: str) -> str:
    """A puzzle typed by a person -> 81 chars of 1-9/'.': drops whitespace and '|', '-', '+'
    separators; '0', '_' and '*' mean blank."""
    keep = [("." if ch in "0_*" else ch) for ch in text if ch in "123456789.0_*"]
    return "".join(keep)


def is_valid_solution(puzzle: str, answer: str) -> bool:
    """True iff `answer` is a complete valid grid (81 digits 1-9, every row, column and box a
    permutation of 1-9) that agrees with every given of `puzzle`."""
    if not isinstance(answer, str) or len(answer) != 81 or any(ch not in DIGITS for ch in answer):
        return False
    if len(puzzle) != 81:
        return False
    for p, a in zip(puzzle, answer):
        if p in DIGITS and p != a:
            return False
    full = set(DIGITS)
    for k in range(9):
        if set(answer[k * 9:(k + 1) * 9]) != full:
            return False
        if set(answer[k::9]) != full:
            return False
        br, bc = (k // 3) * 3, (k % 3) * 3
        if {answer[(br + r) * 9 + bc + c] for r in range(3) for c in range(3)} != full:
            return False
    return True
