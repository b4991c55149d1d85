"""A forced call of one of several tools (`tool_choice: "required"` with several tools): the function is
the model's choice, and its arguments follow that function's schema.

A canvas template is fixed before generation, and the argument skeletons of different functions differ,
so the answer is laid out in two stages that the step loop runs as one generation: first canvases of
whitespace, the call prefix `<|tool_call>call:` and the function's name (a constrained choice), filling
whole canvases; once those are committed, the chosen function's argument template (`{...}<tool_call|>`,
as a single forced call has) lays out the canvases after them. All stages share one table of token
classes, handed to the backend once. The whitespace before the call is content the answer drops."""
from __future__ import annotations

import math

import numpy as np

from .canvas_template import Hole, Layout, Template, TemplateError
from .vocab_constraints import Choice

FILL = " "


class CallSwitch:
    """Duck-typed like a canvas_template.Layout for the step loop (canvases, canvas, canvas_classes,
    commit, hole_ids, length, holes, constraint, check_budget). One per generation: it records the choice."""

    is_layout = True

    def __init__(self, tools: list[dict], tokenizer, canvas_length: int):
        from .tool_calls import CALL_OPEN, ToolError, forced_template

        C = canvas_length
        self.names = [t["function"]["name"] for t in tools]
        call = Template([f"{CALL_OPEN}call:", Hole(1, Choice(tuple(self.names)))]).layout(tokenizer)
        fill = tokenizer.encode(FILL)
        if len(fill) != 1:
            raise ToolError(f"this tokenizer writes {FILL!r} in {len(fill)} tokens; a call among several tools "
                            "needs it in one")
        pad = (-call.length) % C
        shift = lambda a, v: np.concatenate([np.full(pad, v, a.dtype), a])  # noqa: E731
        con = call.constraint
        for f in con.finishes:
            f.start += pad
        self.prefix = Layout(shift(call.ids, fill[0]), shift(call.fixed, True),
                             tuple((s + pad, n) for s, n in call.holes), shift(call.classes, 0), con)
        self.P = self.prefix.length  # whole canvases
        self.C = C
        self.options = {}
        for t in tools:
            args = forced_template(t).parts[1:]  # the function's `{...}<tool_call|>`, after `<|tool_call>call:NAME`
            self.options[t["function"]["name"]] = Template(list(args)).layout(tokenizer, classes_of=con)
        self.constraint = con
        self.chosen: str | None = None

    # -- the layout the loop reads
    def _option_len(self) -> int:
        return self.options[self.chosen].length if self.chosen else max(o.length for o in self.options.values())

    @property
    def length(self) -> int:
        return self.P + self._option_len()

    @property
    def holes(self):
        return self.prefix.holes

    def canvases(self, canvas_length: int) -> int:
        return self.P // canvas_length + math.ceil(self._option_len() / canvas_length)

    def check_budget(self, canvas_length: int, max_new_tokens) -> int:
        if max_new_tokens is not None and max_new_tokens < self.length:
            raise TemplateError(f"a call of one of these tools needs up to {self.length} positions, more than "
                                f"max_new_tokens {max_new_tokens}; raise max_new_tokens or leave it unset")
        return self.canvases(canvas_length) * canvas_length

    def _at(self, k: int):
        if k < self.P // self.C:
            return self.prefix, k
        if self.chosen is None:
            raise TemplateError("the function's arguments were asked for before its name was committed")
        return self.options[self.chosen], k - self.P // self.C

    def canvas(self, k: int, canvas_length: int, eos_id: int, pad_id: int):
        layout, j = self._at(k)
        return layout.canvas(j, canvas_length, eos_id, pad_id)

    def canvas_classes(self, k: int, canvas_length: int):
        layout, j = self._at(k)
        return layout.canvas_classes(j, canvas_length)

    def commit(self, argmax, fixed_ids, fixed, eos_ids, pad_id: int, start: int = 0, before=()):
        if start >= self.P:
            return self.options[self.chosen].commit(argmax, fixed_ids, fixed, eos_ids, pad_id, start - self.P,
                                                    list(before)[self.P:])
        out = self.prefix.commit(argmax, fixed_ids, fixed, eos_ids, pad_id, start, before)
        if start + len(out) >= self.P:  # the name is committed: its function's arguments come next
            s, n = self.prefix.holes[0]
            wrote = (list(before) + [int(t) for t in out])[s:s + n]
            f = self.prefix.constraint.finishes[0]
            for j, m in enumerate(f.members):
                if [int(t) for t in m if t >= 0] == [t for t in wrote if t != pad_id]:
                    self.chosen = self.names[j]
                    break
            else:  # the finish always writes a member; anything else is a bug
                raise TemplateError("the committed function name is none of the tools'")
        return out

    def hole_ids(self, token_ids, pad_id: int):
        head = self.prefix.hole_ids(token_ids, pad_id)
        return head + (self.options[self.chosen].hole_ids(list(token_ids)[self.P:], pad_id) if self.chosen else [])
