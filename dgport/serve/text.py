"""Text: content vs thought channel, stop strings, deltas that never split a character."""

from ..display import split_channel

CHANNEL_NAME = "thought\n"


class TextStream:
    def __init__(self, tokenizer, pad_id: int, chat: bool, stop: list[str]):
        self.tok = tokenizer
        self.pad_id = pad_id
        self.chat = chat
        self.stop = stop
        self.open_id = tokenizer.tok.token_to_id("<|channel>")
        self.close_id = tokenizer.tok.token_to_id("<channel|>")
        self.ids: list[int] = []
        self.sent_content = 0
        self.sent_reasoning = 0
        self.stopped = False

    def add(self, ids) -> None:
        self.ids.extend(int(t) for t in ids if int(t) != self.pad_id)

    def _split(self, final: bool = True) -> tuple[str, str]:
        if not self.chat:
            return self.tok.decode(self.ids), ""
        content, thought = split_channel(self.ids, self.open_id, self.close_id)
        reasoning = self.tok.decode(thought)
        if reasoning.startswith(CHANNEL_NAME):  # the channel's name, as Gemma 4 writes it: not reasoning
            reasoning = reasoning[len(CHANNEL_NAME):]
        elif not final and CHANNEL_NAME.startswith(reasoning):
            reasoning = ""  # may still become the name: hold it back
        return self.tok.decode(content), reasoning

    def deltas(self, final: bool = False) -> tuple[str, str]:
        """(content, reasoning) added since the last call. Text that may be the start of a stop string
        is held back until it is known; at a stop string the content ends and `stopped` is set."""
        content, reasoning = self._split(final)
        if not final:
            content, reasoning = content.rstrip("\ufffd"), reasoning.rstrip("\ufffd")
        end = len(content)
        for s in self.stop:
            at = content.find(s)
            if at != -1 and at < end:
                end = at
                self.stopped = True
        if not self.stopped and not final:
            for s in self.stop:
                for k in range(min(len(s) - 1, len(content)), 0, -1):
                    if content.endswith(s[:k]):
                        end = min(end, len(content) - k)
                        break
        c = content[self.sent_content:end] if end > self.sent_content else ""
        r = reasoning[self.sent_reasoning:]
        self.sent_content = max(self.sent_content, end)
        self.sent_reasoning = len(reasoning)
        return c, r

    def text(self) -> tuple[str, str]:
        return self._split()

