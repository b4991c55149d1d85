"""What a checkpoint declares about its own prompts, and checks of its answers.

A checkpoint (and every export of it: the file travels with the tokenizer files) may carry a
`dgport` section in `tokenizer_config.json`, beside the chat template that defines its prompt format:

    "dgport": {"task": "sudoku", "check_prompts": ["53..7....", ...]}

`task` names a checker for the answers (`sudoku`: the answer must be a valid solution that keeps
every given); `check_prompts` are the prompts `dgport check` uses when given none (a Sudoku model
cannot read English questions). The section is untrusted input like the rest of the folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DgportError

TASKS = ("sudoku",)
SINGLE_TURN = ("sudoku",)  # tasks whose model answers one prompt and was never trained on a conversation
MAX_CHECK_PROMPTS = 16


@dataclass(frozen=True)
class Declaration:
    task: str | None = None
    check_prompts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Verdict:
    task: str
    ok: bool
    summary: str  # one line for a person

    def as_dict(self) -> dict:
        return {"task": self.task, "ok": self.ok, "summary": self.summary}


def declared(folder) -> Declaration:
    """The `dgport` section of FOLDER/tokenizer_config.json (empty when there is none)."""
    from . import safe_files

    path = Path(folder) / "tokenizer_config.json"
    if not os.path.lexists(path):
        return Declaration()
    config = safe_files.read_json(path, safe_files.model_root(folder), DgportError,
                                  "replace it with the model's own file")
    if not isinstance(config, dict):
        raise DgportError(f"{path}: not a JSON object; the tokenizer files are damaged")
    section = config.get("dgport")
    if section is None:
        return Declaration()
    if not isinstance(section, dict):
        raise DgportError(f"{path}: 'dgport' must be an object with 'task' and/or 'check_prompts'")
    task = section.get("task")
    if task is not None and task not in TASKS:
        raise DgportError(f"{path}: dgport.task {task!r} is unknown; this dgport checks: {', '.join(TASKS)}")
    prompts = section.get("check_prompts", [])
    if (not isinstance(prompts, list) or len(prompts) > MAX_CHECK_PROMPTS
            or not all(isinstance(p, str) and p.strip() for p in prompts)):
        raise DgportError(f"{path}: dgport.check_prompts must be a list of at most {MAX_CHECK_PROMPTS} "
                          "non-empty strings")
    return Declaration(task, tuple(prompts))


def answer_template(task: str, prompt: str):
    """The canvas template a task's answer follows (a dgport.Template), or None when the task has none.
    Sudoku: every given digit fixed where the grid has it, a one-position hole for each blank (the
    answer can then never change a given). `prompt` must be a puzzle the model's template accepts."""
    from .canvas_template import Hole, Template

    if task == "sudoku":
        from .models.sudoku.puzzles import normalize

        puzzle = normalize(prompt)
        if len(puzzle) != 81 or any(ch not in "123456789." for ch in puzzle):
            raise DgportError("not a Sudoku puzzle: give the 81 cells row by row, digits 1-9 and . or 0 for a blank")
        return Template([Hole(1) if ch == "." else ch for ch in puzzle])
    return None


def check_answer(task: str, prompt: str, answer: str) -> Verdict:
    """Judge a model's answer to `prompt` by the rules of `task`."""
    if task == "sudoku":
        return _sudoku(prompt, answer)
    raise DgportError(f"unknown task {task!r}")


def _sudoku(prompt: str, answer: str) -> Verdict:
    from .models.sudoku.puzzles import conflicts, is_valid_solution, normalize

    puzzle = normalize(prompt)
    grid = "".join(answer.split())
    if is_valid_solution(puzzle, grid):
        return Verdict("sudoku", True, f"a valid solution (keeps all {sum(c != '.' for c in puzzle)} givens)")
    if len(grid) != 81 or any(ch not in "123456789" for ch in grid):
        return Verdict("sudoku", False, f"not a solution: the answer is not 81 digits 1-9 (it has {len(grid)} "
                                        "characters)")
    changed = sum(1 for p, a in zip(puzzle, grid) if p != "." and p != a)
    bad = len(conflicts(grid))
    parts = [f"{bad} of 81 cells repeat a digit in their row, column or box"] if bad else []
    if changed:
        parts.append(f"{changed} given{'s' if changed != 1 else ''} changed")
    return Verdict("sudoku", False, "not a solution: " + "; ".join(parts))
