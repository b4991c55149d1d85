"""What the encoder graphs (encoder, and the quantized exports' joint step) take for images.

    image_embeds [S, H] float32, optional (default [0, H]): the soft tokens of the image-token positions
    of this call, in row-major order over input_ids [B, T] (transformers' masked_scatter order).

With S > 0 every position whose id is the image token takes its row (rounded to the model dtype, as
transformers casts the tower's output to the embedding dtype) instead of E[id] * sqrt(H), and a query
and a key that are image tokens of the same contiguous run of this call may attend to each other in
every layer (transformers' blockwise overlay, OR-ed with the causal and sliding masks, when
use_bidirectional_attention is "vision"). With S == 0 (the default) both are all-false Wheres and
Ors: the text path's values are bit for bit what they were, and image-token ids in a committed canvas
embed as ordinary tokens, causally, as transformers does. The runtime checks S against the count."""
from __future__ import annotations

import numpy as np

from onnx import helper

from .onnx_builder import BOOL, FLOAT, INT64, Builder


def _i64(b: Builder, *v) -> str:
    return b.const(np.array(v, np.int64), INT64)


class ImageInputs:
    """The image_embeds input and what it changes: `embed(ids, e)` and `overlay(masks, lengths)`."""

    def __init__(self, b: Builder, hidden: int, image_token_id: int, ids: str, bidirectional: bool = True):
        self.b, self.bidirectional = b, bidirectional
        img = b.optional_input("image_embeds", FLOAT, ["image_tokens", hidden], np.zeros((0, hidden), np.float32))
        has = b.op("Greater", b.op("Size", img), b.const(np.int64(0), INT64))  # bool []
        self.is_img = b.op("And", b.op("Equal", ids, b.const(np.int64(image_token_id), INT64)), has)  # [B, T]
        self.img, self.ids = img, ids

    def embed(self, e: str) -> str:
        """The input embeddings e [B, T, H] (compute dtype) with the image positions' rows replaced."""
        b = self.b
        flat = b.op("Reshape", b.cast(self.is_img, INT64), _i64(b, -1))
        index = b.op("Reshape", b.op("CumSum", flat, b.const(np.int64(0), INT64)), b.op("Shape", self.ids))
        index = b.op("Where", self.is_img, index, b.const(np.int64(0), INT64))  # row 0: a zero row, never kept
        hidden = b.op("Slice", b.op("Shape", self.img), _i64(b, 1), _i64(b, 2))
        zero_row = b.op("ConstantOfShape", b.op("Concat", _i64(b, 1), hidden, axis=0),
                        value=helper.make_tensor("zero", FLOAT, [1], [0.0]))
        rows = b.op("Gather", b.op("Concat", zero_row, self.img, axis=0), index, axis=0)  # [B, T, H] fp32
        return b.op("Where", b.op("Unsqueeze", self.is_img, _i64(b, -1)), b.to_md(rows), e)

    def overlay(self, masks: dict, lengths: tuple[str, str]) -> dict:
        """The attention masks ([B,1,1,T,P+T] bool per layer kind) OR the image blocks among the new keys."""
        if not self.bidirectional:
            return masks
        b = self.b
        img = self.is_img
        shape = b.op("Shape", img)
        prev = b.op("Concat", b.op("ConstantOfShape", b.op("Concat", b.op("Slice", shape, _i64(b, 0), _i64(b, 1)),
                                                                _i64(b, 1), axis=0),
                                   value=helper.make_tensor("no", BOOL, [1], [False])),
                    b.op("Slice", img, _i64(b, 0), _i64(b, -1), _i64(b, 1)), axis=1)
        starts = b.op("And", img, b.op("Not", prev))
        run = b.op("CumSum", b.cast(starts, INT64), b.const(np.int64(1), INT64))  # run number, from 1
        run = b.op("Where", img, run, b.const(np.int64(0), INT64))
        q = b.op("Unsqueeze", run, _i64(b, 1, 2, 4))  # [B,1,1,T,1]
        k = b.op("Unsqueeze", run, _i64(b, 1, 2, 3))  # [B,1,1,1,T]
        same = b.op("And", b.op("Equal", q, k), b.op("Unsqueeze", img, _i64(b, 1, 2, 4)))  # [B,1,1,T,T]
        bt = b.op("Shape", img)
        out = {}
        for sliding, past in ((False, lengths[0]), (True, lengths[1])):
            dims = b.op("Concat", b.op("Slice", bt, _i64(b, 0), _i64(b, 1)), _i64(b, 1, 1),
                        b.op("Slice", bt, _i64(b, 1), _i64(b, 2)), b.op("Reshape", past, _i64(b, 1)), axis=0)
            none = b.op("ConstantOfShape", dims, value=helper.make_tensor("no", BOOL, [1], [False]))
            out[sliding] = b.op("Or", masks[sliding], b.op("Concat", none, same, axis=-1))
        return out

