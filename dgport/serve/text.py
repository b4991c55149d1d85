"""Text: content vs thought channel, stop strings, deltas that never split a character.

The app calls a TextStream on a worker thread (decoding the answer so far is linear in its length).
The stop-string search is incremental: each call scans only the text added since the last one plus
the longest stop string's length - 1 characters before it, so a whole answer costs time linear in
its length, however many deltas it arrives in."""

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
        self.stop_at = 0  # where the content ends, once a stop string was found
        self.searched = 0  # content[:searched] was searched: no stop string starts in it, but for the last
        self.longest = max((len(s) for s in stop), default=0)  # longest - 1 characters

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
        if self.stopped:
            end = self.stop_at
        elif self.stop:
            start = max(0, self.searched - self.longest + 1)  # a stop string starting before this was seen whole
            window = content[start:]
            for s in self.stop:
                at = window.find(s)
                if at != -1 and start + at < end:
                    end = start + at
                    self.stopped, self.stop_at = True, end
            self.searched = len(content)
        if not self.stopped and not final:
            for s in self.stop:  # bounded by the stop strings' lengths (MAX_STOP_CHARS), not the text's
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

    def feed(self, ids, final: bool = False) -> tuple[str, str]:
        """add(ids), then deltas(final): one call for the app to run off the event loop."""
        self.add(ids)
        return self.deltas(final)

