"""Canvas templates: text fixed in the canvas, holes the model fills (in-filling, structured output).

A `Template` spans the answer: text parts are fixed, each `Hole(n)` is up to n positions the model
fills. The step loop puts the fixed tokens into every step's canvas, counts them as accepted without
spending the entropy budget and commits them; holes follow the reference sampler. After the template's
last position the canvas holds the first EOS id, then PAD, all fixed: the answer ends there.

Text parts are tokenized each on its own, as a rendered chat is (a special token written as text
becomes its id; no <bos> is added), so a part's tokens never merge with a neighbour's.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from .errors import DgportError
from .schema import is_int, utf8_text

MAX_HOLE = 1 << 16  # positions in one hole
MAX_PARTS = 1 << 16
MAX_POSITIONS = 1 << 20  # positions in a whole template (fixed tokens and holes)

# The text form (`dgport run --template FILE`): `{{hole:N}}` is a hole of N positions; a backslash
# right before a marker keeps it as text (`\{{hole:3}}` is the text `{{hole:3}}`).
MARKER = re.compile(r"(\\?)\{\{hole:([^}]*)\}\}")
NEAR_MARKER = re.compile(r"\{\{\s*hole\b")


class TemplateError(DgportError):
    """A template that cannot be used as given (the message names the part and what to do)."""


@dataclass(frozen=True)
class Hole:
    """Up to `n` canvas positions the model fills; PAD or EOS written there is dropped from the text.
    `kind` (dgport.vocab_constraints: StringChars, IntegerDigits, FractionDigits, Choice) constrains the
    tokens the model may write there (a Choice hole has as many positions as its longest member)."""
    n: int
    kind: object = None

    def __post_init__(self):
        if not is_int(self.n) or not 1 <= self.n <= MAX_HOLE:
            raise TemplateError(f"Hole(n): n must be an integer from 1 to {MAX_HOLE} positions (got {self.n!r})")
        if self.kind is not None:
            from .vocab_constraints import KINDS, IntegerDigits

            if not isinstance(self.kind, KINDS):
                raise TemplateError(f"Hole kind {self.kind!r}: one of dgport.vocab_constraints' hole kinds")
            if isinstance(self.kind, IntegerDigits) and self.n < 2:
                raise TemplateError("an IntegerDigits hole has a sign position and at least one digit (n >= 2)")


class Template:
    """`parts`: a list of text strings (fixed) and `Hole(n)` (filled by the model), in answer order."""

    def __init__(self, parts):
        if isinstance(parts, (str, Hole)) or not isinstance(parts, (list, tuple)):
            raise TemplateError("a template is a list of parts: text strings and dgport.Hole(n)")
        if not parts:
            raise TemplateError("the template is empty; give at least one text part or Hole(n)")
        if len(parts) > MAX_PARTS:
            raise TemplateError(f"the template has {len(parts)} parts, more than {MAX_PARTS}")
        for i, p in enumerate(parts):
            if isinstance(p, str):
                utf8_text(p, f"template part {i}")
            elif not isinstance(p, Hole):
                raise TemplateError(f"template part {i} is a {type(p).__name__}; a part is a string or dgport.Hole(n)")
        if sum(p.n for p in parts if isinstance(p, Hole)) > MAX_POSITIONS:
            raise TemplateError(f"the template's holes add up to more than {MAX_POSITIONS} positions")
        self.parts = tuple(parts)

    def __repr__(self) -> str:
        return f"Template({list(self.parts)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Template) and self.parts == other.parts

    @classmethod
    def infill(cls, suffix: str, n: int) -> "Template":
        """In-filling: one hole of up to `n` positions, then `suffix` fixed (the prompt is the prefix)."""
        if not isinstance(suffix, str) or not suffix:
            raise TemplateError("the suffix is empty; give the text that must follow the hole")
        return cls([Hole(n), suffix])

    @classmethod
    def parse(cls, text: str, where: str = "the template") -> "Template":
        """The text form: `{{hole:N}}` marks a hole of N positions, everything else is fixed text."""
        if not isinstance(text, str):
            raise TemplateError(f"{where}: a template's text form is a string")
        utf8_text(text, where)
        parts: list = []
        literal = []
        pos = 0
        for m in MARKER.finditer(text):
            _check_no_stray_marker(text[pos:m.start()], where)
            literal.append(text[pos:m.start()])
            pos = m.end()
            escaped, count = m.group(1), m.group(2)
            if escaped:
                literal.append(m.group(0)[1:])
                continue
            if not re.fullmatch(r"[0-9]{1,7}", count) or not 1 <= int(count) <= MAX_HOLE:
                raise TemplateError(f"{where}: {m.group(0)!r} at character {m.start()}: a hole is {{{{hole:N}}}} "
                                    f"with N from 1 to {MAX_HOLE}")
            if "".join(literal):
                parts.append("".join(literal))
            literal = []
            parts.append(Hole(int(count)))
        literal.append(text[pos:])
        _check_no_stray_marker(text[pos:], where)
        if "".join(literal):
            parts.append("".join(literal))
        if not any(isinstance(p, Hole) for p in parts):
            raise TemplateError(f"{where} has no hole; mark each place the model fills with {{{{hole:N}}}}")
        return cls(parts)

    @classmethod
    def from_json(cls, value, where: str = "template") -> "Template":
        """The JSON form (the server's field, a `.json` template file): a list of strings and
        {"hole": N} objects."""
        if not isinstance(value, list):
            raise TemplateError(f"{where}: must be a list of strings and {{\"hole\": N}} objects")
        parts = []
        for i, p in enumerate(value):
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and set(p) == {"hole"} and is_int(p["hole"]) and not isinstance(p["hole"], bool):
                if not 1 <= p["hole"] <= MAX_HOLE:
                    raise TemplateError(f"{where}[{i}]: a hole has 1 to {MAX_HOLE} positions (got {p['hole']})")
                parts.append(Hole(p["hole"]))
            else:
                raise TemplateError(f"{where}[{i}]: a part is a string or {{\"hole\": N}} with N a positive integer")
        return cls(parts)

    @property
    def constrained(self) -> bool:
        return any(isinstance(p, Hole) and p.kind is not None for p in self.parts)

    def layout(self, tokenizer, classes_of=None) -> "Layout":
        """The template in token ids, for the step loop (the distinct text parts in one batch call
        when the tokenizer has `encode_many`); with constrained holes, each position's token class.
        `classes_of`: a Constraint whose class numbering (and so mask table) this layout shares."""
        from . import vocab_constraints as vc

        con = None
        if self.constrained:
            con = vc.Constraint(vc.token_texts(tokenizer)) if classes_of is None else \
                vc.Constraint(classes_of.texts, classes_of.keys, _index=classes_of._index)
        texts = [p for p in self.parts if isinstance(p, str) and p]
        for p in self.parts:
            if isinstance(p, Hole) and p.kind is not None:
                texts += list(getattr(p.kind, "members", ()))
        texts = list(dict.fromkeys(texts))
        many = getattr(tokenizer, "encode_many", None)
        encoded = dict(zip(texts, many(texts) if many is not None else [tokenizer.encode(t) for t in texts]))
        ids: list[int] = []
        fixed: list[bool] = []
        holes: list[tuple[int, int]] = []
        classes: list[int] = []
        for p in self.parts:
            if isinstance(p, Hole):
                n, members = p.n, None
                if isinstance(p.kind, vc.Choice):
                    members = [encoded[m] for m in p.kind.members]
                    n = max(len(m) for m in members)
                    if n > MAX_HOLE:
                        raise TemplateError(f"a choice member is longer than {MAX_HOLE} tokens")
                    members = [np.asarray(m + [-1] * (n - len(m)), np.int64) for m in members]
                holes.append((len(ids), n))
                if con is not None:
                    classes.extend([0] * n if p.kind is None else con.hole_classes(p.kind, n, members))
                    if vc.finished(p.kind):
                        con.finishes.append(vc.HoleFinish(len(ids), n, p.kind, members or []))
                ids.extend([-1] * n)
                fixed.extend([False] * n)
            elif p:
                t = encoded[p]
                ids.extend(t)
                fixed.extend([True] * len(t))
                classes.extend([0] * len(t))
            if len(ids) > MAX_POSITIONS:
                raise TemplateError(f"the template is longer than {MAX_POSITIONS} positions")
        if not ids:
            raise TemplateError("the template's text parts tokenize to nothing; give some text or a Hole(n)")
        return Layout(np.asarray(ids, dtype=np.int64), np.asarray(fixed, dtype=bool), tuple(holes),
                      None if con is None else np.asarray(classes, np.int64), con)


def _check_no_stray_marker(text: str, where: str) -> None:
    m = NEAR_MARKER.search(text)
    if m:
        raise TemplateError(f"{where}: {text[m.start():m.start() + 16]!r}... looks like a hole but is not "
                            "{{hole:N}}; write the hole as {{hole:N}} or the text as \\{{hole:...}}")


@dataclass(frozen=True)
class Layout:
    """A template in token ids: `ids` [L] (-1 in holes), `fixed` [L], `holes` as (start, n); with
    constrained holes, each position's token class [L] (0: any token) and the Constraint."""
    ids: np.ndarray
    fixed: np.ndarray
    holes: tuple[tuple[int, int], ...]
    classes: np.ndarray | None = None
    constraint: object = None

    @property
    def length(self) -> int:
        return int(self.ids.size)

    @property
    def fixed_tokens(self) -> int:
        return int(self.fixed.sum())

    def canvases(self, canvas_length: int) -> int:
        return math.ceil(self.length / canvas_length)

    def check_budget(self, canvas_length: int, max_new_tokens: int | None) -> int:
        """The max_new_tokens a run with this template uses: whole canvases covering it. A smaller
        budget is refused (the answer ends where the template ends, never inside it)."""
        need = self.canvases(canvas_length) * canvas_length
        if max_new_tokens is not None and max_new_tokens < self.length:
            raise TemplateError(f"the template needs {self.length} positions ({self.canvases(canvas_length)} "
                                f"canvases of {canvas_length}), more than max_new_tokens {max_new_tokens}; "
                                "raise max_new_tokens or leave it unset")
        return need

    def canvas(self, k: int, canvas_length: int, eos_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Canvas k's fixed ids [C] and which positions are fixed [C]: the template's text, then after
        its end the first EOS id and PAD (fixed too)."""
        C, start = canvas_length, k * canvas_length
        ids = np.full(C, pad_id, dtype=np.int64)
        fixed = np.ones(C, dtype=bool)
        part = slice(start, min(start + C, self.length))
        n = part.stop - part.start
        ids[:n] = self.ids[part]
        fixed[:n] = self.fixed[part]
        if n < C:
            ids[n] = eos_id
        return ids, fixed

    def canvas_classes(self, k: int, canvas_length: int) -> np.ndarray | None:
        """Canvas k's token classes [C] (0 after the template's end), or None without constraints."""
        if self.classes is None:
            return None
        C, start = canvas_length, k * canvas_length
        out = np.zeros(C, np.int64)
        part = self.classes[start:start + C]
        out[:part.size] = part
        return out

    def commit(self, argmax: np.ndarray, fixed_ids: np.ndarray, fixed: np.ndarray, eos_ids, pad_id: int,
               start: int = 0, before=()) -> np.ndarray:
        """The committed canvas (its first template position `start`; `before`: the tokens committed
        before it): fixed positions hold their token;
        PAD or EOS written in a hole become PAD (dropped from the text, so a hole may come back shorter
        than its n); constrained holes get their finish (vocab_constraints.Constraint.finish)."""
        out = np.where(fixed, fixed_ids, argmax)
        dropped = ~fixed & np.isin(out, np.asarray([pad_id, *eos_ids], dtype=np.int64))
        out[dropped] = pad_id
        if self.constraint is not None:
            self.constraint.finish(out, start, pad_id, before)
        return out

    def hole_ids(self, token_ids, pad_id: int) -> list[list[int]]:
        """Each hole's committed tokens (PAD dropped)."""
        return [[int(t) for t in token_ids[s:s + n] if int(t) != pad_id] for s, n in self.holes]
