"""Chat templates get a work budget (issue "Hardening, second pass", item 2): a template that loops,
recurses or builds without bound is refused with one line after a bounded amount of work, counted by
tracing (a wall-clock alarm is only a safety net), and real conversations still fit."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import dgport.tokenizer as tokenizer_mod
from dgport.errors import DgportError
from dgport.tokenizer import ChatTokenizer
from test_untrusted_files import deadline, one_line


def _template_folder(tmp_path: Path, checkpoints, template: str) -> Path:
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoints["tiny"] / name, folder / name)
    (folder / "chat_template.jinja").write_text(template)
    return folder


class WorkGuard:
    """Counts Python line and call events while a template renders (work, not time); past `limit`
    it raises, so an unbudgeted template fails the test instead of hanging it."""

    def __init__(self, limit: int):
        self.limit, self.events = limit, 0

    def __call__(self, frame, event, arg):
        self.events += 1
        if self.events > self.limit:
            raise AssertionError(f"no refusal after {self.limit} traced events")
        return self

    def __enter__(self):
        sys.settrace(self)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)


HOSTILE = [
    ("nested huge ranges", "{% for i in range(10**9) %}{% for j in range(10**9) %}{% endfor %}{% endfor %}"),
    ("nested ranges", "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"),
    ("loops without calls", "{% set s = 'abcdefghij' %}" + "{% for x in s %}" * 9 + "{% endfor %}" * 9),
    ("exponential macros", "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                           "{{ f(60) }}"),
    ("unbounded recursion", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"),
    ("string multiplication", "{{ 'x' * 10**13 }}"),
    ("list multiplication", "{{ ['x' * 1000] * 10**7 }}"),
    ("huge power", "{{ 2 ** (2 ** 24) }}"),
    ("huge width", "{{ 'x' | center(10**13) }}"),
    ("huge method width", "{{ 'x'.ljust(10**13) }}"),
    ("doubling concatenation", "{% set ns = namespace(s='xx') %}{% for i in range(64) %}"
                               "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"),
    ("replace amplification", "{{ ('x' * 5000) | replace('', 'y' * 5000) }}"),
    ("join amplification", "{% set s = 'x' * 50000 %}{{ [" + ", ".join(["s"] * 30) + "] | join(s) }}"),
    ("output amplification", "{% set s = 'x' * 1000 %}{% for i in range(99999) %}{% for j in range(999) %}"
                             "{{ s }}{% endfor %}{% endfor %}"),
]


@pytest.mark.parametrize("template", [h[1] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_template_is_refused_within_a_bounded_amount_of_work(checkpoints, tmp_path, monkeypatch,
                                                                      template):
    """Budgets made small (setattr works on any tree), then every template is refused with one line
    after at most a bounded number of traced Python events."""
    monkeypatch.setattr(tokenizer_mod, "MAX_TEMPLATE_STEPS", 20_000, raising=False)
    monkeypatch.setattr(tokenizer_mod, "MAX_TEMPLATE_CHARS", 1 << 20, raising=False)
    tok = ChatTokenizer(_template_folder(tmp_path, checkpoints, template))
    with deadline(120), WorkGuard(3_000_000):
        with pytest.raises(DgportError) as e:
            tok.render([{"role": "user", "content": "hi"}])
    msg = one_line(e)
    assert msg.startswith("chat template"), msg


def test_default_budget_refuses_and_real_conversations_fit(checkpoints, tmp_path):
    from models.fixtures import CHAT_TEMPLATE

    tok = ChatTokenizer(_template_folder(tmp_path, checkpoints, HOSTILE[1][1]))
    with deadline(120), WorkGuard(200_000_000):
        with pytest.raises(DgportError, match="chat template: .*work budget"):
            tok.render([{"role": "user", "content": "hi"}])
    (tmp_path / "tok" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    tok = ChatTokenizer(tmp_path / "tok")
    long = [{"role": ("user", "assistant")[i % 2], "content": f"message {i} " + "w" * 2000} for i in range(2000)]
    text = tok.render(long)  # 2000 turns, 4 MB: far past any context, still within the budget
    assert text.count("<|turn>") == 2001 and len(text) > 4_000_000
