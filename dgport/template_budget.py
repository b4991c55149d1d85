"""A chat template's work budget: jinja2's immutable sandbox, metered.

A template is code from whoever made the model. The sandbox stops it touching Python internals; this
module stops it running without end or filling memory. One render has a budget of steps and of
characters (dgport/tokenizer.py: MAX_TEMPLATE_STEPS, MAX_TEMPLATE_CHARS):
  - a step: every call (functions, methods, macros, `caller()`, `loop(...)`), every filter, every
    loop iteration and every output piece. Loops are metered by rewriting the parsed template:
    each `{% for %}`'s iterable, each `~` concatenation and each output expression is wrapped in a
    call to this module's meters (referenced by import, so a template cannot rebind them);
  - characters: every string or list that output, `~`, `+`, `*`, `%`, a call or a filter builds is
    measured (lists by their items, recursively), and the ones that amplify (`'x' * n`, `center(n)`,
    `ljust(n)`, `replace`, `join`, format widths, `2 ** n`) are estimated and refused *before* they
    are built. `range` is capped at 100000 items and `lipsum` is not available.
Python's recursion limit stops unbounded macro recursion; every refusal is one line (TemplateRefused,
a DgportError). Compile-time constant folding is off for everything metered (no budget then)."""
from __future__ import annotations

import contextvars
import re

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg, pass_context
from jinja2.visitor import NodeTransformer

from .errors import DgportError

MAX_RANGE = 100_000  # jinja2's own sandbox limit
MAX_INT_BITS = 1 << 16
HERE = __name__


class TemplateRefused(DgportError):
    """The chat template went over its work budget (or recursed without end)."""


class Budget:
    __slots__ = ("steps", "chars", "max_steps", "max_chars")

    def __init__(self, max_steps: int, max_chars: int):
        self.steps = self.chars = 0
        self.max_steps, self.max_chars = max_steps, max_chars

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.max_steps:
            raise TemplateRefused(f"chat template: over its work budget of {self.max_steps} steps (calls, loop "
                                  "iterations and outputs); it loops or recurses without bound. Replace the model's "
                                  "chat template, or pass raw=True (CLI: --raw)")

    def want(self, n: int, what: str = "a value") -> None:
        """Refuse, before building it, a value of n characters (or items) the budget cannot pay for."""
        if n > self.max_chars - self.chars:
            raise TemplateRefused(f"chat template: {what} of {n} characters would go over its work budget of "
                                  f"{self.max_chars} characters built. Replace the model's chat template, or pass "
                                  "raw=True (CLI: --raw)")

    def pay(self, value, what: str = "a value"):
        n = size(value, self)
        self.want(n, what)
        self.chars += n
        return value


_current: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("dgport_template_budget", default=None)


def current() -> Budget:
    b = _current.get()
    if b is None:  # outside `render` (no caller does this): a budget of its own
        from .tokenizer import MAX_TEMPLATE_CHARS, MAX_TEMPLATE_STEPS

        b = Budget(MAX_TEMPLATE_STEPS, MAX_TEMPLATE_CHARS)
        _current.set(b)
    return b


def _int_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateRefused(f"chat template: an integer of about {bits} bits (over {MAX_INT_BITS}); replace the "
                              "model's chat template")


def size(value, b: Budget | None = None, depth: int = 0) -> int:
    """Characters (strings) or items (containers, counted with what they hold) of a value; each item
    visited is a step. Ints over MAX_INT_BITS are refused here."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, bool) or value is None:
        return 1
    if isinstance(value, int):
        _int_bits(value.bit_length())
        return 1
    if depth > 64:
        return 1
    if isinstance(value, dict):
        if b is not None:
            b.step(len(value))
        return len(value) + sum(size(k, b, depth + 1) + size(v, b, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        if b is not None:
            b.step(len(value))
        return len(value) + sum(size(v, b, depth + 1) for v in value)
    return 1


_NUMBER = re.compile(r"\d+")


def _widest(fmt: str) -> int:
    """The largest number in a format string (a width or precision it may pad to)."""
    widths = [m.group() for m in _NUMBER.finditer(fmt)]
    return max((10 ** 12 if len(w) > 12 else int(w) for w in widths), default=0)


def _ints(args, kwargs) -> int:
    return max((abs(v) for v in (*args, *kwargs.values()) if isinstance(v, int) and not isinstance(v, bool)),
               default=0)


def _estimate_str_call(name: str, s: str, args, kwargs, b: Budget) -> int:
    """An upper bound of what str method `name` of `s` builds (0: nothing to estimate)."""
    if name in ("ljust", "rjust", "center", "zfill"):
        return len(s) + _ints(args, kwargs)
    if name == "expandtabs":
        return len(s) * max(_ints(args, kwargs), 8)
    if name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[0], args[1]
        return len(s) + (len(s) // max(len(old), 1) + 1) * len(new)
    if name == "join" and args:
        items = args[0]
        if isinstance(items, (list, tuple)):
            return size(items, b) + len(s) * len(items)
    if name in ("format", "format_map"):
        return len(s) + _widest(s) + size(args, b) + size(kwargs, b)
    return 0


class MeteredSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        if __obj in METERS:  # the rewritten template's own meters: they count themselves
            return __obj(*args)
        b = current()
        b.step()
        owner = getattr(__obj, "__self__", None)
        if not isinstance(owner, str):  # jinja2 wraps str.format; the bound method is under __wrapped__
            owner = getattr(getattr(__obj, "__wrapped__", None), "__self__", None)
        if isinstance(owner, str):  # the str methods that build more than they are given
            b.want(_estimate_str_call(getattr(__obj, "__name__", ""), owner, args, kwargs, b), "a string")
        return b.pay(ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs))

    def call_binop(self, context, op, left, right):
        b = current()
        b.step()
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    b.want(size(seq, b) * max(n, 0), "a repetition")
            if isinstance(left, int) and isinstance(right, int):
                _int_bits(left.bit_length() + right.bit_length())
        elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            _int_bits(left.bit_length() * right)
        elif op == "+":
            b.want(size(left, b) + size(right, b), "a sum")
        elif op == "%" and isinstance(left, str):
            b.want(len(left) + _widest(left) + size(right, b), "a formatted string")
        return b.pay(self.binop_table[op](left, right))


def _filter_estimate(name: str, value, args, kwargs, b: Budget) -> int:
    if name == "center":
        return size(value, b) + _ints(args, kwargs)
    if name == "indent" and isinstance(value, str):
        return len(value) + _ints(args, kwargs) * (value.count("\n") + 1)
    if name in ("replace", "join") and isinstance(value, str):
        return _estimate_str_call(name, value, args, kwargs, b)
    if name == "join" and isinstance(value, (list, tuple)):
        sep = args[0] if args and isinstance(args[0], str) else ""
        return size(value, b) + len(sep) * len(value)
    if name == "format" and isinstance(value, str):
        return len(value) + _widest(value) + size(args, b) + size(kwargs, b)
    if name in ("string", "tojson", "pprint", "wordwrap", "urlize", "escape", "e", "forceescape"):
        return 4 * size(value, b) + _ints(args, kwargs)
    return _ints(args, kwargs)


def _metered_filter(name: str, f):
    pass_arg = _PassArg.from_obj(f)

    @pass_context  # also keeps it out of compile-time constant folding, where no budget is set
    def metered(context, value, *args, **kwargs):
        b = current()
        b.step()
        b.want(_filter_estimate(name, value, args, kwargs, b), f"the {name} filter's result")
        if pass_arg is _PassArg.context:
            out = f(context, value, *args, **kwargs)
        elif pass_arg is _PassArg.eval_context:
            out = f(context.eval_ctx, value, *args, **kwargs)
        elif pass_arg is _PassArg.environment:
            out = f(context.environment, value, *args, **kwargs)
        else:
            out = f(value, *args, **kwargs)
        return b.pay(out, f"the {name} filter's result")

    return metered


# ---------------------------------------------------------------- meters the rewritten template calls

def meter_iter(iterable):
    """A loop's iterable, one step per item."""
    b = current()
    for item in iterable:
        b.step()
        yield item


def meter_concat(*values):
    """`a ~ b ~ ...` (autoescape off: str of each, joined), measured before it is built."""
    b = current()
    texts = [v if isinstance(v, str) else str(b.pay(v)) for v in values]
    n = sum(map(len, texts))
    b.want(n, "a concatenation")
    b.chars += n
    return "".join(texts)


def meter_out(value):
    """One output piece: a step, and its size."""
    b = current()
    b.step()
    return b.pay(value, "the output")


METERS = frozenset({meter_iter, meter_concat, meter_out})


class _Meter(NodeTransformer):
    @staticmethod
    def _call(fn: str, args: list) -> nodes.Call:
        return nodes.Call(nodes.ImportedName(f"{HERE}.{fn}"), args, [], None, None)

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = self._call("meter_iter", [node.iter])
        return node

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        return self._call("meter_concat", node.nodes)

    def visit_Output(self, node):
        node = self.generic_visit(node)
        node.nodes = [self._call("meter_out", [nodes.Const(n.data) if isinstance(n, nodes.TemplateData) else n])
                      for n in node.nodes]
        return node


def _safe_range(*args):
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise TemplateRefused(f"chat template: range of {len(r)} items (over {MAX_RANGE}); replace the model's "
                              "chat template")
    return r


def _raise_exception(msg):
    """`raise_exception(...)` inside a chat template: the template's refusal, as one error line."""
    raise DgportError(f"chat template: {msg}")


def environment() -> MeteredSandbox:
    env = MeteredSandbox(trim_blocks=True, lstrip_blocks=True)
    env.filters = {name: _metered_filter(name, f) for name, f in env.filters.items()}
    env.globals.pop("lipsum", None)
    env.globals["range"] = _safe_range
    env.globals["raise_exception"] = _raise_exception
    return env


def compile_template(source: str) -> jinja2.Template:
    env = environment()
    try:
        return env.from_string(_Meter().visit(env.parse(source)))
    except jinja2.TemplateError as e:
        raise DgportError(f"chat template failed to compile: {str(e).splitlines()[0] if str(e) else e}") from None
    except (RecursionError, MemoryError):
        raise DgportError("chat template failed to compile: nested too deeply; replace the model's chat template") \
            from None


def render(template: jinja2.Template, max_steps: int, max_chars: int, **variables) -> str:
    token = _current.set(Budget(max_steps, max_chars))
    try:
        return template.render(**variables)
    except DgportError:
        raise
    except jinja2.TemplateError as e:
        raise DgportError(f"chat template failed to render: {str(e).splitlines()[0] if str(e) else e}") from None
    except RecursionError:
        raise TemplateRefused("chat template: recursion too deep (a macro calls itself without end); replace the "
                              "model's chat template") from None
    except MemoryError:
        raise TemplateRefused("chat template: ran out of memory; replace the model's chat template") from None
    except Exception as e:  # the template's own arithmetic or type errors: ZeroDivisionError, OverflowError, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise DgportError(f"chat template failed to render ({e.__class__.__name__}: {first[:200]})") from None
    finally:
        _current.reset(token)
