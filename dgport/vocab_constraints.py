"""Vocabulary constraints for canvas-template holes: which tokens each hole position may hold.

A constrained hole (`Hole(n, kind)`, kind one of the classes below) gives each of its positions a
*class*; a class is a set of allowed token ids. The step loop sends the backend a small table of
allowed-token masks (bool [K, V], row 0 allows everything: fixed positions and free holes) once per
generation, and per step one class index per canvas position; the backend applies the mask to the
logits on its device (docs/GRAPH_CONTRACT.md, vocabulary constraints). The committed tokens are the
argmax canvas, always an allowed token, then the hole's `finish` (host, O(hole)) makes what per-position
sets cannot express hold: a number's leading zeros are dropped, a choice becomes one of its members.

Tokens are judged by their text (the tokenizer's decoding of each id alone); special tokens are never
allowed in a constrained position. The "end" of a hole is PAD or an EOS id (dropped from the text, so
a hole may end early)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import DgportError

MAX_CLASSES = 4096  # rows of one mask table (each distinct position class of a template)
MAX_CHOICES = 256  # members of one choice
DIGITS = "0123456789"


class ConstraintError(DgportError):
    """A constrained template this tokenizer or model cannot enforce."""


# ---------------------------------------------------------------------------- hole kinds (tokenizer-free)

@dataclass(frozen=True)
class StringChars:
    """JSON string content: no quote, backslash or control character. `one_char`: only tokens of one
    character, so n positions hold at most n characters (a string's maxLength)."""
    one_char: bool = False


@dataclass(frozen=True)
class IntegerDigits:
    """An optional minus sign, then one to n - 1 digits (leading zeros dropped at commit)."""


@dataclass(frozen=True)
class FractionDigits:
    """One to n digits (after a fixed decimal point)."""


@dataclass(frozen=True)
class Choice:
    """Exactly one of `members` (texts), each tokenized as a fixed text is: the hole has as many
    positions as the longest."""
    members: tuple[str, ...]

    def __post_init__(self):
        if not 2 <= len(self.members) <= MAX_CHOICES or not all(isinstance(m, str) and m for m in self.members):
            raise ConstraintError(f"a choice has 2 to {MAX_CHOICES} non-empty texts (got {len(self.members)})")


KINDS = (StringChars, IntegerDigits, FractionDigits, Choice)


def finished(kind) -> bool:
    """Whether a hole of this kind has a finish at commit (Constraint.finish)."""
    return isinstance(kind, (IntegerDigits, Choice))


# ---------------------------------------------------------------------------- the tokenizer's token classes

class TokenTexts:
    """Per-token facts of a tokenizer (computed once per tokenizer, in one batch decode)."""

    def __init__(self, tokenizer):
        tok = tokenizer.tok
        n = tok.get_vocab_size(with_added_tokens=True)
        texts = tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        special = np.zeros(n, bool)
        for i, t in tok.get_added_tokens_decoder().items():
            if t.special and i < n:
                special[i] = True
        self.size = n
        self.texts = texts
        bad = np.array([any(c in '"\\' or ord(c) < 0x20 for c in t) for t in texts], bool)
        self.clean = ~bad & ~special
        self.one_char = self.clean & np.array([len(t) == 1 for t in texts], bool)
        self.digit = np.full(n, -1, np.int64)  # the digit a token writes (-1: not a digit token)
        for i, t in enumerate(texts):
            if len(t) == 1 and t in DIGITS and not special[i]:
                self.digit[i] = int(t)
        self.minus = np.array([t == "-" for t in texts], bool) & ~special

    def check_numbers(self) -> None:
        """Numbers need a token for each digit alone and for '-' alone."""
        for d in range(10):
            if not (self.digit == d).any():
                raise ConstraintError(f"this tokenizer has no token for the digit {d} alone; numbers cannot be "
                                      "constrained with it")
        if not self.minus.any():
            raise ConstraintError("this tokenizer has no token for '-' alone; numbers cannot be constrained with it")


def token_texts(tokenizer) -> TokenTexts:
    cached = getattr(tokenizer, "_dgport_token_texts", None)
    if cached is None:
        cached = TokenTexts(tokenizer)
        tokenizer._dgport_token_texts = cached
    return cached


# ---------------------------------------------------------------------------- a template's constraint

@dataclass
class HoleFinish:
    start: int  # template position
    n: int
    kind: object
    members: list = field(default_factory=list)  # Choice: each member's ids padded with -1 (end) to n


@dataclass
class Constraint:
    """The classes of a template's positions: `keys[c]` describes class c (class 0: any token), built by
    Template.layout. `masks(V, pad, eos)` is the [K, V] table the backend applies."""
    texts: TokenTexts
    keys: list = field(default_factory=lambda: [("any",)])
    finishes: list = field(default_factory=list)
    _index: dict = field(default_factory=dict)

    def class_of(self, key) -> int:
        if key not in self._index:
            if len(self.keys) >= MAX_CLASSES:
                raise ConstraintError(f"the template needs more than {MAX_CLASSES} token classes")
            self._index[key] = len(self.keys)
            self.keys.append(key)
        return self._index[key]

    def hole_classes(self, kind, n: int, member_ids=None) -> list[int]:
        """The class of each of a hole's n positions."""
        if isinstance(kind, StringChars):
            return [self.class_of(("text", kind.one_char, True))] * n
        if isinstance(kind, (IntegerDigits, FractionDigits)):
            self.texts.check_numbers()
        if isinstance(kind, IntegerDigits):
            return [self.class_of(("sign",)), self.class_of(("digit", False))] + \
                [self.class_of(("digit", True))] * (n - 2)
        if isinstance(kind, FractionDigits):
            return [self.class_of(("digit", False))] + [self.class_of(("digit", True))] * (n - 1)
        if isinstance(kind, Choice):
            out = []
            for i in range(n):
                ids = frozenset(int(m[i]) for m in member_ids if m[i] >= 0)
                out.append(self.class_of(("ids", ids, any(m[i] < 0 for m in member_ids))))
            return out
        raise ConstraintError(f"unknown hole kind {type(kind).__name__}")

    def masks(self, V: int, pad_id: int, eos_ids) -> np.ndarray:
        """bool [K, V]: row c allows class c's tokens (ids the tokenizer does not have: never)."""
        t = self.texts
        n = min(V, t.size)
        out = np.zeros((len(self.keys), V), bool)
        ends = [i for i in (pad_id, *eos_ids) if 0 <= i < V]
        for c, key in enumerate(self.keys):
            row = out[c]
            if key[0] == "any":
                row[:] = True
                continue
            if key[0] == "text":
                row[:n] = (t.one_char if key[1] else t.clean)[:n]
                end = key[2]
            elif key[0] == "sign":
                row[:n] = t.minus[:n]
                end = True
            elif key[0] == "digit":
                row[:n] = t.digit[:n] >= 0
                end = key[1]
            else:  # ("ids", ids, end)
                row[[i for i in key[1] if i < V]] = True
                end = key[2]
            if end:
                row[ends] = True
            if not row.any():
                raise ConstraintError(f"no token of this model's vocabulary fits a {key[0]} position")
        return out

    def digit(self, token: int) -> int:
        return int(self.texts.digit[token]) if 0 <= token < self.texts.size else -1

    def finish(self, tokens: np.ndarray, start: int, pad_id: int, before=()) -> None:
        """Make each constrained hole that ends or continues in this canvas (tokens [C], template
        positions start..) valid as a whole, in place, given `before` (the tokens committed before this
        canvas: a hole that began in an earlier canvas keeps what it committed there). An integer's
        leading zeros become PAD (after a committed lone 0, later digits do); a choice becomes the member
        closest to what was written among those that agree with its committed part."""
        C = tokens.size
        for f in self.finishes:
            lo, hi = max(f.start, start), min(f.start + f.n, start + C)
            if lo >= hi:
                continue
            seg = tokens[lo - start:hi - start]
            done = [int(t) for t in before[f.start:lo]]  # this hole's committed part
            if isinstance(f.kind, IntegerDigits):
                past = [self.digit(t) for t in done[1:] if self.digit(t) >= 0]
                digits = [i for i in range(seg.size) if lo + i > f.start and self.digit(seg[i]) >= 0]
                if past == [0]:  # a committed lone zero: nothing may follow it
                    seg[digits] = pad_id
                elif not past:
                    for i in digits[:-1]:  # leading zeros, keeping the last digit
                        if self.digit(seg[i]) != 0:
                            break
                        seg[i] = pad_id
            elif isinstance(f.kind, Choice):
                k = lo - f.start
                wrote = np.where(seg == pad_id, -1, seg)
                done = np.asarray([-1 if t == pad_id else t for t in done], np.int64)
                fits = [j for j, m in enumerate(f.members) if (m[:k] == done).all()]
                best = max(fits, key=lambda j: (int((f.members[j][k:k + seg.size] == wrote).sum()), -j))
                part = f.members[best][k:k + seg.size]
                seg[:] = np.where(part < 0, pad_id, part)


def check_masks(masks, V: int) -> np.ndarray:
    """A backend's token-mask table: bool [K, V], 1 <= K <= MAX_CLASSES, row 0 allowing every token."""
    masks = np.ascontiguousarray(masks)
    if masks.dtype != np.bool_ or masks.ndim != 2 or masks.shape[1] != V or not 1 <= masks.shape[0] <= MAX_CLASSES:
        raise DgportError(f"token masks must be bool [K, {V}] with 1 <= K <= {MAX_CLASSES} "
                          f"(got {masks.dtype} {masks.shape})")
    if not masks.any(axis=1).all():
        raise DgportError("every token-mask row must allow at least one token")
    return masks


def check_classes(classes, shape: tuple, rows: int | None) -> np.ndarray:
    """A step's token classes: int64 of the canvas' shape, each in [0, rows of the mask table)."""
    if rows is None:
        raise DgportError("token classes without token masks: call set_token_masks first")
    classes = np.ascontiguousarray(classes, dtype=np.int64)
    if classes.shape != tuple(shape) or (classes.size and (classes.min() < 0 or classes.max() >= rows)):
        raise DgportError(f"token classes must be integers in [0, {rows}) shaped like the canvas {tuple(shape)}")
    return classes
