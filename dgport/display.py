"""What a person sees: answer text without the thought channel, and the live canvas view."""
from __future__ import annotations

import numpy as np


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
        out, hidden = [], False
        for t in ids:
            t = int(t)
            if t == self.pad_id:
                continue
            if not self.show_thinking and t == self.open_id:
                hidden = True
            elif not self.show_thinking and t == self.close_id:
                hidden = False
            elif not hidden:
                out.append(t)
        return out

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
    """A rich renderable of the draft canvas: accepted positions bright, renoised ones dim."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.title = ""
        self.pieces: list[tuple[str, str]] = []

    def update(self, event) -> None:
        self.title = (f"canvas {event.canvas_index + 1}  step {event.step + 1}  T={event.temperature:.3f}  "
                      f"accepted {int(np.sum(event.accepted))}/{event.accepted.size}  "
                      f"mean entropy {float(np.mean(event.entropy)):.3f}")
        self.pieces = []
        for tok_id, ok in zip(event.argmax.tolist(), event.accepted.tolist()):
            piece = self.tok.decode([tok_id], skip_special_tokens=False)
            self.pieces.append((piece, "bold green" if ok else "dim"))

    def __rich__(self):
        from rich.panel import Panel
        from rich.text import Text

        body = Text()
        for piece, style in self.pieces:
            body.append(piece, style=style)
        return Panel(body, title=self.title, border_style="cyan")
