"""What a person sees: answer text without the thought channel, and the live canvas view."""
from __future__ import annotations

import re

import numpy as np

# C0 controls but tab and newline, DEL and C1: ESC starts CSI/OSC sequences (colours, titles, hyperlinks,
# clipboard writes), BEL rings, CR overwrites what a line showed
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_text(text: str) -> str:
    """`text` safe to print on a terminal: every control character but newline and tab shown as a
    visible escape (ESC -> \\x1b), so text from a model or a manifest never drives the terminal."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def titled_table(console, title: str, **options):
    """A rich Table titled `title`; off a terminal the title is printed first as one plain line (rich
    wraps a table's title at the table's width, mid-phrase)."""
    from rich.table import Table
    from rich.text import Text

    if console.is_terminal:
        return Table(title=Text(terminal_text(title)), **options)
    console.print(Text(terminal_text(title)), soft_wrap=True)
    return Table(**options)


def split_channel(ids, open_id, close_id, pad_id=None) -> tuple[list[int], list[int]]:
    """(answer ids, thought-channel ids) of generated ids: what lies between `<|channel>` (open_id)
    and `<channel|>` (close_id) is the thought channel; PAD and the two markers are dropped."""
    answer, thought, inside = [], [], False
    for t in ids:
        t = int(t)
        if t == pad_id:
            continue
        if t == open_id:
            inside = True
        elif t == close_id:
            inside = False
        else:
            (thought if inside else answer).append(t)
    return answer, thought


class AnswerText:
    """Decodes generated ids for display. The thought channel (`<|channel>` ... `<channel|>`) is
    hidden unless `show_thinking`; special tokens and PAD are dropped. `delta()` returns the text
    added since the last call, so streaming never splits a multi-byte character."""

    def __init__(self, tokenizer, show_thinking: bool = False, pad_id: int = 0):
        self.tok = tokenizer
        self.show_thinking = show_thinking
        self.pad_id = pad_id
        self.open_id = tokenizer.tok.token_to_id("<|channel>")
        self.close_id = tokenizer.tok.token_to_id("<channel|>")
        self.ids: list[int] = []
        self._shown = ""

    def visible_ids(self, ids) -> list[int]:
        if self.show_thinking:
            return [int(t) for t in ids if int(t) != self.pad_id]
        return split_channel(ids, self.open_id, self.close_id, self.pad_id)[0]

    def text(self, ids=None) -> str:
        return self.tok.decode(self.visible_ids(self.ids if ids is None else ids))

    def add(self, ids) -> None:
        self.ids.extend(int(t) for t in ids)

    def delta(self) -> str:
        safe = self.text().rstrip("\ufffd")  # hold back a character whose bytes are not all here yet
        new = safe[len(self._shown):]
        self._shown = safe
        return new


class CanvasView:
    """A rich renderable of the draft canvas: accepted positions bright, renoised ones dim, positions a
    canvas template fixes in their own style (FIXED_STYLE)."""

    FIXED_STYLE = "bold cyan underline"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.title = ""
        self.pieces: list[tuple[str, str]] = []
        self.answer = ""  # the committed answer so far, shown under the canvas (already terminal-safe)

    def update(self, event) -> None:
        fixed = getattr(event, "fixed", None)
        fixed = [False] * event.accepted.size if fixed is None else np.asarray(fixed, dtype=bool).tolist()
        self.title = (f"canvas {event.canvas_index + 1}  step {event.step + 1}  T={event.temperature:.3f}  "
                      f"accepted {int(np.sum(event.accepted))}/{event.accepted.size}  "
                      + (f"fixed {sum(fixed)}  " if getattr(event, "fixed", None) is not None else "")
                      + f"mean entropy {float(np.mean(event.entropy)):.3f}")
        self.pieces = []
        for tok_id, ok, pinned in zip(event.argmax.tolist(), event.accepted.tolist(), fixed):
            piece = terminal_text(self.tok.decode([tok_id], skip_special_tokens=False))
            self.pieces.append((piece, self.FIXED_STYLE if pinned else "bold green" if ok else "dim"))

    def __rich__(self):
        from rich.panel import Panel
        from rich.text import Text

        from rich.console import Group

        body = Text()
        for piece, style in self.pieces:
            body.append(piece, style=style)
        panel = Panel(body, title=self.title, border_style="cyan")
        return Group(panel, Text(self.answer)) if self.answer else panel


def sudoku_grid(cells: str, givens: str = "", styles=None):
    """A rich Text 9x9 grid of 81 cell characters; givens bold, others styled per cell."""
    from rich.text import Text

    grid = Text()
    for r in range(9):
        if r and r % 3 == 0:
            grid.append("------+-------+------\n", style="dim")
        for c in range(9):
            i = 9 * r + c
            if c and c % 3 == 0:
                grid.append("| ", style="dim")
            ch = cells[i] if i < len(cells) else "."
            ch = ch if ch.isprintable() else "?"
            style = "bold" if givens and givens[i] != "." else (styles[i] if styles else "")
            grid.append(ch + " ", style=style)
        grid.append("\n")
    return grid


class SudokuView:
    """The live view of `dgport demo`: the draft canvas as a grid, accepted cells green."""

    def __init__(self, tokenizer, puzzle: str):
        self.tok = tokenizer
        self.puzzle = puzzle
        self.cells = puzzle
        self.styles = [""] * 81
        self.title = "denoising"

    def update(self, event) -> None:
        pieces = [self.tok.decode([int(t)]) for t in event.argmax.tolist()]
        cells, styles = [], []
        for piece, ok in zip(pieces, event.accepted.tolist()):
            if len(cells) == 81:
                break
            cells.append(piece if len(piece) == 1 and piece in "123456789" else "·")
            styles.append("bold green" if ok else "dim")
        self.cells = "".join(cells).ljust(81, "·")
        self.styles = styles + ["dim"] * (81 - len(styles))
        self.title = f"step {event.step + 1}  T={event.temperature:.3f}  accepted {int(event.accepted.sum())}"

    def __rich__(self):
        from rich.panel import Panel

        return Panel(sudoku_grid(self.cells, self.puzzle, self.styles), title=self.title, expand=False)
