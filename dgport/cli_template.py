"""Canvas templates on the command line: `run --template FILE`, `--suffix TEXT`, and a task model's
answer template (`--task-template`, run and demo). The templates themselves are
dgport.canvas_template's; this module reads files and turns flags into one Template or None."""
from __future__ import annotations

import json

from .canvas_template import Template, TemplateError
from .errors import DgportError

MAX_TEMPLATE_BYTES = 64 << 20  # a template spans at most 2**20 positions: far less text than this

TASK_TEMPLATE_HELP = ("Follow the answer template of the model's declared task (the Sudoku model: every given fixed "
                      "in the canvas, a one-cell hole per blank). Off by default: measured, it solves no more "
                      "puzzles (docs/sudoku.md).")


def read_template(path: str) -> Template:
    """The template in file `path`: the JSON form when its name ends in `.json`, else the text form,
    one trailing newline (`\\n` or `\\r\\n`, as editors add) dropped. Errors are one line naming the file."""
    from .schema import decode_utf8

    what = f"--template {path}"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEMPLATE_BYTES + 1)
    except OSError as e:
        raise DgportError(f"{what}: cannot read it ({e.__class__.__name__}: "
                          f"{getattr(e, 'strerror', None) or e})") from e
    if len(data) > MAX_TEMPLATE_BYTES:
        raise DgportError(f"{what} is over {MAX_TEMPLATE_BYTES >> 20} MiB; a template spans at most 2**20 positions")
    text = decode_utf8(data, what)
    try:
        if str(path).lower().endswith(".json"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise DgportError(f"{what}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); the "
                                  "JSON form is a list of strings and {\"hole\": N} objects") from None
            except RecursionError:
                raise DgportError(f"{what}: the JSON is nested too deeply; the JSON form is a flat list of "
                                  "strings and {\"hole\": N} objects") from None
            return Template.from_json(value, what)
        if text.endswith("\r\n"):
            text = text[:-2]
        elif text.endswith("\n"):
            text = text[:-1]
        return Template.parse(text, what)
    except TemplateError as e:
        if str(e).startswith(what):
            raise
        raise TemplateError(f"{what}: {e}") from None


MAX_SCHEMA_BYTES = 1 << 20


def read_json_schema(path: str) -> Template:
    """`run --json-schema FILE`: the template the file's JSON schema compiles to. A schema outside the
    supported subset is a usage error (exit 2), one line naming the keyword."""
    import click

    from .json_schema import SchemaError, compile_schema

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SCHEMA_BYTES + 1)
    except OSError as e:
        raise DgportError(f"--json-schema {path}: cannot read it ({e.__class__.__name__}: "
                          f"{getattr(e, 'strerror', None) or e})") from e
    if len(data) > MAX_SCHEMA_BYTES:
        raise click.BadParameter(f"{path} is over {MAX_SCHEMA_BYTES >> 20} MiB", param_hint="--json-schema")
    try:
        return compile_schema(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise click.BadParameter(f"{path} is not UTF-8 text", param_hint="--json-schema") from None
    except SchemaError as e:
        raise click.BadParameter(f"{path}: {e}", param_hint="--json-schema") from None


def check_flags(template_file, suffix, task_template: bool, think: bool, json_schema=None) -> None:
    """Refuse flags that contradict each other, before any model loads."""
    from .schema import utf8_text

    if json_schema is not None:
        other = ("--template" if template_file is not None else "--suffix" if suffix is not None else
                 "--task-template" if task_template else "--think" if think else None)
        if other:
            raise DgportError(f"--json-schema and {other} contradict each other: the schema is compiled into the "
                              "answer's template; drop one of them")
    if template_file is not None and suffix is not None:
        raise DgportError("give either --template FILE or --suffix TEXT, not both (--suffix is itself a template: "
                          "one hole, then TEXT)")
    given = "--template" if template_file is not None else "--suffix" if suffix is not None else None
    if task_template and given:
        raise DgportError(f"--task-template and {given} contradict each other; give one of them")
    if think and given:
        raise DgportError(f"--think cannot be used with {given}: a template fixes the answer from its first "
                          "position, where thinking mode's thought channel would go; drop one of them")
    if suffix is not None:
        utf8_text(suffix, "--suffix")
        if not suffix:
            raise DgportError("--suffix is empty; give the text that must follow the hole")


def task_template(task: str | None, prompt: str, think: bool):
    """The answer template of the model's declared task for `prompt` (--task-template). A model with no
    such task, and --think (thinking mode cannot precede a template), are refused."""
    from .task import answer_template

    template = answer_template(task, prompt) if task else None
    if template is None:
        raise DgportError("--task-template: this model declares no task with an answer template (the Sudoku "
                          "model does); give a template with --template FILE instead")
    if think:
        raise DgportError(f"--think cannot be used with --task-template: the {task} answer template fixes the "
                          "answer from its first position, where the thought channel would go; drop one of them")
    return template


def check_budget(template: Template, tokenizer, canvas_length: int, max_new_tokens: int | None, source: str) -> None:
    """Refuse --max-new-tokens shorter than the template, naming the flag and where the template came from."""
    if max_new_tokens is None:
        return
    layout = template.layout(tokenizer)  # (constrained holes: the tokenizer's token classes, computed once)
    if max_new_tokens < layout.length:
        k = layout.canvases(canvas_length)
        raise DgportError(f"--max-new-tokens {max_new_tokens} is shorter than {source}: it spans {layout.length} "
                          f"positions ({k} canvas{'es' if k != 1 else ''} of {canvas_length}); raise "
                          "--max-new-tokens or leave it out (the template sets it)")


def summary(template: Template | None, holes, default: bool) -> str:
    """The run summary's template part ("" without one), e.g. "template: 3 holes | "."""
    if template is None:
        return ""
    n = len(holes or [])
    tail = " (the task's)" if default else ""
    return f"template: {n} hole{'s' if n != 1 else ''}{tail} | "
