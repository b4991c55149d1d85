"""Batched generation: many rows (independent requests) denoised together on a RowBackend.

Each row is a `dgport.loop.Row`: its own randomness stream, drawn in exactly the order a single-row
run with its seed draws it, its own stopping rule, canvas count, EOS and template, and its own KV
cache in the backend (prompts of any lengths share a batch). A step denoises every row that is
denoising in one batched backend call; a row that finishes a canvas has its committed canvas
encoded (one row at a time) and begins its next canvas in the same `step`; a finished or cancelled
row leaves the batch at once, so it costs nothing more. New rows may join between any two steps
(continuous batching, `dgport serve --max-batch`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import DgportError
from .loop import ENCODE_CHUNK, Row, check_encode_chunk


@dataclass
class Entry:
    row: Row
    backend_row: int
    encode_chunk: int = ENCODE_CHUNK
    tag: object = None  # the caller's handle (e.g. a server job)
    pending: bool = True  # `row.to_encode` is not encoded yet
    soft: np.ndarray | None = None  # the prompt's image soft tokens [S, H] still to encode (dgport.image_prompt)
    error: BaseException | None = field(default=None, repr=False)


class BatchLoop:
    """Rows denoised together, at most `max_batch` per backend call (None: all)."""

    def __init__(self, backend, max_batch: int | None = None):
        for name in ("open_row", "close_row", "encode_row", "denoise_rows"):
            if not callable(getattr(backend, name, None)):
                raise DgportError(f"this backend ({type(backend).__name__}) cannot run batched rows (no {name})")
        if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1):
            raise DgportError(f"max_batch must be a positive integer (got {max_batch!r})")
        self.backend = backend
        self.max_batch = max_batch
        self.entries: list[Entry] = []
        self._masks_of: tuple | None = None  # the constrained entries whose masks the backend's table holds
        self._offsets: dict = {}

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, prompt_ids, settings, rng, template=None, on_step=None, on_canvas=None,
            encode_chunk: int = ENCODE_CHUNK, tag=None, copy_of: int | None = None, cached: int = 0,
            images=None) -> Entry:
        """A new row generating after `prompt_ids`. `copy_of`: a backend row whose cache holds the first
        `cached` of those ids (prefix reuse): the new row starts from a copy of it. `images`
        (dgport.image_prompt.PromptImages): the prompt's images, encoded here by the vision tower."""
        check_encode_chunk(encode_chunk)
        backend_row = self.backend.open_row(copy_of)
        try:
            if copy_of is not None and self.backend.row_cache_len(backend_row) != cached:
                raise DgportError(f"row {copy_of} holds {self.backend.row_cache_len(backend_row)} positions, "
                                  f"not the {cached} the new row reuses")
            ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)[cached:]
            row = Row(ids, settings, rng, self.backend.config, cached, template, on_step, on_canvas)
            soft = None
            if images is not None:
                from .image_prompt import soft_rows

                images.encode(self.backend)
                soft = soft_rows(images, prompt_ids, cached, self.backend.vision.image_token_id)
        except BaseException:
            self.backend.close_row(backend_row)
            raise
        entry = Entry(row, backend_row, encode_chunk, tag, soft=soft)
        self.entries.append(entry)
        return entry

    def remove(self, entry: Entry, keep_row: bool = False) -> None:
        """Take a row out of the batch (finished or cancelled); its backend row is closed unless
        `keep_row` (the caller then owns it and closes it)."""
        if entry in self.entries:
            self.entries.remove(entry)
            if not keep_row:
                self.backend.close_row(entry.backend_row)

    def _encode(self, entry: Entry) -> None:
        row, chunk = entry.row, entry.encode_chunk
        if entry.soft is not None:  # the prompt with its images: blocks whole, each call its own soft tokens
            from .image_prompt import encode_prompt

            encode_prompt(lambda i, p, e: self.backend.encode_row(entry.backend_row, i, p, image_embeds=e), row.to_encode,
                          row.enc_pos, chunk, entry.soft, self.backend.vision.image_token_id)
            entry.soft = None
        else:
            for s in range(0, row.to_encode.size, chunk):
                self.backend.encode_row(entry.backend_row, row.to_encode[None, s:s + chunk],
                                        row.enc_pos[None, s:s + chunk])
        entry.pending = False
        row.begin_canvas()
        entry.pending = not row.done and not row.denoising  # a canvas with no hole: committed, encode the next

    def step(self) -> list[Entry]:
        """Encode what waits, then one denoising step of up to `max_batch` denoising rows (in the order
        they joined). Returns the entries that finished in this call (out of the batch; their backend
        rows are still open: the caller closes them with `close`, or keeps one for prefix reuse). An
        exception raised by a row's callback is recorded on its entry (`error`), which then finishes."""
        finished: list[Entry] = []
        for entry in list(self.entries):
            while entry.pending and entry.error is None:
                try:
                    self._encode(entry)
                except BaseException as e:  # noqa: BLE001  (a callback or the backend: this row only)
                    if not isinstance(e, Exception):
                        raise
                    entry.error = e
            if entry.row.done or entry.error is not None:
                self.entries.remove(entry)
                finished.append(entry)
        batch = [e for e in self.entries if e.row.denoising][:self.max_batch]
        if not batch:
            return finished
        inputs = [e.row.step_inputs() for e in batch]
        args = ([e.backend_row for e in batch],
                np.concatenate([i[0] for i in inputs]), np.concatenate([i[1] for i in inputs]),
                np.asarray([i[2] for i in inputs], dtype=np.float32), np.concatenate([i[3] for i in inputs]),
                np.asarray([e.row.fresh for e in batch]))
        classes = self._classes(batch)
        out = self.backend.denoise_rows(*args) if classes is None else self.backend.denoise_rows(*args, classes=classes)
        for i, entry in enumerate(batch):
            try:
                entry.row.after_step(out.argmax[i:i + 1], out.entropy[i:i + 1], out.sampled[i:i + 1])
            except Exception as e:  # noqa: BLE001
                entry.error = e
            if entry.error is not None or entry.row.done:
                self.entries.remove(entry)
                finished.append(entry)
            elif not entry.row.denoising:
                entry.pending = True  # committed a canvas: encode it before the next step
        return finished

    def _classes(self, batch: list[Entry]) -> np.ndarray | None:
        """The batch's token classes [b, C] (None: no row is constrained). The backend's table is the rows'
        tables stacked (one shared all-true row 0, then each constrained row's other rows), set again only
        when the constrained rows change; each row's classes are offset into it."""
        constrained = tuple(e for e in batch if e.row.masks is not None)
        if not constrained:
            return None
        held = self._masks_of
        if held is None or len(held) != len(constrained) or any(a is not b for a, b in zip(held, constrained)):
            parts, offsets, n = [constrained[0].row.masks[:1]], {}, 1
            for e in constrained:
                offsets[id(e)] = n - 1
                parts.append(e.row.masks[1:])
                n += e.row.masks.shape[0] - 1
            self.backend.set_token_masks(np.concatenate(parts))
            self._masks_of, self._offsets = constrained, offsets
        C = batch[0].row.C
        return np.stack([np.zeros(C, np.int64) if e.row.masks is None else
                         np.where(e.row.classes > 0, e.row.classes + self._offsets[id(e)], 0) for e in batch])

    def close(self, entry: Entry) -> None:
        self.backend.close_row(entry.backend_row)

    def run(self) -> None:
        """Step until every row has finished (their backend rows closed); re-raises the first row error."""
        errors = []
        try:
            while self.entries:
                for entry in self.step():
                    self.close(entry)
                    if entry.error is not None:
                        errors.append(entry.error)
        finally:
            self.release_masks()
        if errors:
            raise errors[0]

    def release_masks(self) -> None:
        """Drop the backend's token-mask table (set by constrained rows), e.g. when the batch is empty."""
        if self._masks_of is not None:
            self.backend.set_token_masks(None)
            self._masks_of, self._offsets = None, {}
