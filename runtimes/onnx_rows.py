"""Rows (dgport.backend.RowBackend) on the ONNX backend: many independent requests denoised in one
batched call of the export's own denoise-step graph.

- A row owns its cache (per layer [K, V] OrtValues [1, kv, L, d] on the backend's device, extended by
  the encoder like the single-row cache, which it never touches) and a reference to its next
  self-conditioning signal: slice i of the [b, C, H] `next_sc_embeds` of the last batch it stepped in.
  OrtValues are never written in place (every graph returns new ones), so `open_row(copy_of=r)`
  shares r's tensors: a copy at no cost.
- `denoise_rows` stacks the rows' caches into one batch cache, each left-padded with zeros to the
  longest per layer (the graphs mask keys whose implied position is negative: exactly the padding;
  docs/GRAPH_CONTRACT.md), and keeps it while the same rows step with unchanged caches (keyed by the
  rows and their lengths). The batch's `next_sc_embeds` is the next step's input as is while the same
  rows step and none starts a canvas; otherwise the signals are gathered from the rows' references,
  zeros for fresh rows. One row alone reads its own cache and signal: nothing is copied.
- The stacking and gathering are tiny ONNX graphs built here with the `onnx` package (Concat, Cast,
  ConstantOfShape, Gather, shape arithmetic) and run on the backend's execution provider with IO
  binding, so on CUDA no cache-sized tensor or signal crosses to the host.
- Exports written before rows (no `"rows": true` in the manifest's onnx entry) denoise their rows one
  single-row call at a time: the same outputs, no speed-up; said once through `logging`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from dgport.backend import StepOutput, row_encode_inputs, row_step_inputs
from dgport.errors import DgportError

log = logging.getLogger("dgport.runtimes.onnx")

FLOAT, INT64 = 1, 7  # onnx.TensorProto.FLOAT / INT64


@dataclass
class _Row:
    kv: list  # per layer [K, V] OrtValues [1, kv, L, d]
    length: int = 0  # positions encoded
    sc: tuple | None = None  # (OrtValue [b, C, H], i): the next signal is slice i of a batch's output


@dataclass
class _Batch:
    """The stacked cache of the last denoise_rows call, reused while the same rows step again."""
    rows: tuple
    lengths: tuple  # each row's cache length when the stack was built
    kv: list  # per layer [K, V] [b, kv, P, d], left-padded
    sc: object | None = None  # the last step's next_sc_embeds [b, C, H] (row i's at index i)


def _graph_model(nodes, name: str, inputs, outputs, inits=()):
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def stack_graph(groups: int, b: int, elem: int):
    """`groups` tensors of b rows each, x{g}_{i} [1, heads, L_i, d] -> y{g} [b, heads, max L_i, d]: every
    row left-padded with zeros along axis 2 (zeros made as fp32 and cast: no kernel needs the element
    type but Cast and Concat, which every execution provider has for bf16)."""
    from onnx import helper, numpy_helper

    vi = helper.make_tensor_value_info
    consts = {n: numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("c0", [0]), ("c2", [2]), ("c3", [3]), ("c4", [4]))}
    nodes, inputs, outputs = [], [], []
    for g in range(groups):
        xs = [f"x{g}_{i}" for i in range(b)]
        inputs += [vi(x, elem, [1, f"h{g}", f"l{g}_{i}", f"d{g}"]) for i, x in enumerate(xs)]
        for x in xs:
            nodes += [helper.make_node("Shape", [x], [f"{x}_s"]),
                      helper.make_node("Slice", [f"{x}_s", "c2", "c3"], [f"{x}_len"])]
        nodes.append(helper.make_node("Max", [f"{x}_len" for x in xs], [f"p{g}"]))
        parts = []
        for x in xs:
            nodes += [helper.make_node("Sub", [f"p{g}", f"{x}_len"], [f"{x}_pad"]),
                      helper.make_node("Slice", [f"{x}_s", "c0", "c2"], [f"{x}_head"]),
                      helper.make_node("Slice", [f"{x}_s", "c3", "c4"], [f"{x}_tail"]),
                      helper.make_node("Concat", [f"{x}_head", f"{x}_pad", f"{x}_tail"], [f"{x}_zs"], axis=0),
                      helper.make_node("ConstantOfShape", [f"{x}_zs"], [f"{x}_z32"],
                                       value=helper.make_tensor("zero", FLOAT, [1], [0.0]))]
            zero = f"{x}_z32"
            if elem != FLOAT:
                nodes.append(helper.make_node("Cast", [zero], [f"{x}_z"], to=elem))
                zero = f"{x}_z"
            nodes.append(helper.make_node("Concat", [zero, x], [f"{x}_padded"], axis=2))
            parts.append(f"{x}_padded")
        nodes.append(helper.make_node("Concat", parts, [f"y{g}"], axis=0))
        outputs.append(vi(f"y{g}", elem, [b, f"h{g}", f"p{g}", f"d{g}"]))
    return _graph_model(nodes, f"dgport_stack_{b}", inputs, outputs, consts.values())


def gather_graph(sources: int, elem: int):
    """Rows `index` [n] of the sources s0.. ([b_j, C, H]) concatenated along axis 0 -> y [n, C, H]."""
    from onnx import helper

    vi = helper.make_tensor_value_info
    names = [f"s{j}" for j in range(sources)]
    nodes = [helper.make_node("Concat", names, ["all"], axis=0)] if sources > 1 else []
    nodes.append(helper.make_node("Gather", ["all" if sources > 1 else names[0], "index"], ["y"], axis=0))
    inputs = [vi(n, elem, [f"b{j}", "C", "H"]) for j, n in enumerate(names)] + [vi("index", INT64, ["n"])]
    return _graph_model(nodes, f"dgport_gather_{sources}", inputs, [vi("y", elem, ["n", "C", "H"])])


class RowsMixin:
    """The RowBackend methods of OnnxBackend (runtimes/onnx.py), on its sessions and device."""

    def _init_rows(self, threads: int) -> None:
        self._rows: dict[int, _Row] = {}
        self._next_row = 0
        self._stacked: _Batch | None = None
        self._rows_batched = bool(self.entry.get("rows"))  # graphs that mask left padding, [B] temperatures
        self._rows_said = False
        self._util_threads = threads
        self._utils: dict = {}  # (kind, count) -> session
        self._row_zero_sc = None
        self._rows_logits = None

    # ------------------------------------------------------------------ protocol
    def open_row(self, copy_of: int | None = None) -> int:
        if copy_of is None:
            cfg = self.config
            new = _Row([[self._empty((1, cfg.kv_heads[i], 0, cfg.head_dims[i])) for _ in range(2)]
                        for i in range(cfg.num_layers)])
        else:
            src = self._row(copy_of)
            new = _Row([list(kv) for kv in src.kv], src.length)  # immutable OrtValues: shared is copied
        rid = self._next_row
        self._next_row += 1
        self._rows[rid] = new
        return rid

    def close_row(self, row: int) -> None:
        self._row(row)
        del self._rows[row]
        if self._stacked is not None and row in self._stacked.rows:
            self._stacked = None  # its stack holds the closed row's cache

    def row_cache_len(self, row: int) -> int:
        return self._row(row).length

    def encode_row(self, row: int, ids: np.ndarray, positions: np.ndarray, image_embeds=None) -> None:
        r = self._row(row)
        ids, positions = row_encode_inputs(ids, positions)
        r.kv = self._encode_cache(r.kv, ids, positions, self._image_embeds(ids, image_embeds))
        r.length += ids.shape[1]
        if self._stacked is not None and row in self._stacked.rows:
            self._stacked = None  # stale now (its key no longer matches): free it before the next stack

    def denoise_rows(self, rows, canvas, positions, temperatures, uniforms, fresh, classes=None) -> StepOutput:
        """`classes` [b, C]: the rows' token classes (rows of the set_token_masks table; vocabulary
        constraints), or None (unconstrained)."""
        lengths = tuple(self._row(r).length for r in rows)
        rows, canvas, positions, temperatures, uniforms, fresh = row_step_inputs(
            rows, lengths, canvas, positions, temperatures, uniforms, fresh)
        if not self._rows_batched:
            return self._rows_one_by_one(rows, canvas, positions, temperatures, uniforms, fresh, classes)
        batch = self._stacked
        if batch is None or batch.rows != rows or batch.lengths != lengths:
            self._stacked = None  # free the old stack before making the new one
            batch = self._stacked = _Batch(rows, lengths, self._stack(rows))
        if batch.sc is not None and not fresh.any() and batch.sc.shape()[1] == canvas.shape[1]:
            sc = batch.sc  # the same rows again: the last step's signal as is
        else:
            sc = self._gather_sc(rows, fresh, canvas.shape[1])
        outs = self._step(batch.kv, canvas, positions, temperatures, uniforms, sc,
                          self._constraint(classes, canvas.shape))
        batch.sc = outs["next_sc_embeds"]
        for i, r in enumerate(rows):
            self._rows[r].sc = (batch.sc, i)
        self._rows_logits = outs.get("logits")
        return StepOutput(outs["argmax_ids"].numpy(), outs["entropy"].numpy(), outs["sampled_ids"].numpy())

    # ------------------------------------------------------------------ inspection (tests)
    @property
    def last_rows_logits(self) -> np.ndarray | None:
        """The last denoise_rows call's logits [b, C, V] fp32 (parity exports only; copied on request)."""
        return None if self._rows_logits is None else self._rows_logits.numpy()

    def row_sc_numpy(self, row: int) -> np.ndarray | None:
        """The row's next self-conditioning signal [1, C, H] as float32 (a copy), or None."""
        ref = self._row(row).sc
        return None if ref is None else self._host_f32(ref[0])[ref[1]:ref[1] + 1]

    # ------------------------------------------------------------------ internals
    def _row(self, row) -> _Row:
        try:
            return self._rows[row]
        except (KeyError, TypeError):
            raise DgportError(f"no ONNX row {row!r} (open one with open_row; closed rows are forgotten)") from None

    def _rows_one_by_one(self, rows, canvas, positions, temperatures, uniforms, fresh, classes=None) -> StepOutput:
        """An export from before rows: one single-row call per row (the same outputs, no speed-up)."""
        if not self._rows_said:
            self._rows_said = True
            log.warning("%s was exported before batched rows (its manifest has no \"rows\": true): denoise_rows "
                        "runs one call per row (correct, no speed-up); export again for batched steps",
                        self.export.path)
        outs = []
        for i, r in enumerate(rows):
            sc = self._gather_sc((r,), fresh[i:i + 1], canvas.shape[1])
            con = self._constraint(None if classes is None else np.asarray(classes)[i:i + 1], canvas[i:i + 1].shape)
            o = self._step(self._rows[r].kv, canvas[i:i + 1], positions[i:i + 1], temperatures[i:i + 1].reshape(()),
                           uniforms[i:i + 1], sc, con)
            self._rows[r].sc = (o["next_sc_embeds"], 0)
            outs.append(o)
        self._rows_logits = None
        return StepOutput(*(np.concatenate([o[k].numpy() for o in outs], axis=0)
                            for k in ("argmax_ids", "entropy", "sampled_ids")))

    def _util(self, kind: str, count: int):
        key = (kind, count)
        if key not in self._utils:
            ort = self._ort
            elem = {"fp32": FLOAT, "fp16": 10, "bf16": 16}[self.dtype]
            model = stack_graph(2 * self.config.num_layers, count, elem) if kind == "stack" else \
                gather_graph(count, elem)
            so = ort.SessionOptions()
            if self._util_threads:
                so.intra_op_num_threads = self._util_threads
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            self._utils[key] = ort.InferenceSession(model.SerializeToString(), so, providers=self._providers())
        return self._utils[key]

    def _stack(self, rows: tuple) -> list:
        """The rows' caches as one batch cache, per layer [K, V] [b, kv, P, d], each row left-padded."""
        kvs = [self._rows[r].kv for r in rows]
        if len(rows) == 1:
            return kvs[0]
        sess = self._util("stack", len(rows))
        io = sess.io_binding()
        n = self.config.num_layers
        for g in range(2 * n):
            for i, kv in enumerate(kvs):
                io.bind_ortvalue_input(f"x{g}_{i}", kv[g // 2][g % 2])
            io.bind_output(f"y{g}", *self._dev)
        sess.run_with_iobinding(io)
        ys = io.get_outputs()
        return [[ys[2 * i], ys[2 * i + 1]] for i in range(n)]

    def _gather_sc(self, rows: tuple, fresh: np.ndarray, C: int):
        """The rows' signals as one [b, C, H] batch: each row's slice of the batch output it last stepped
        in, zeros where it starts a canvas (or has no signal yet)."""
        H = self.config.hidden_size
        if self._row_zero_sc is None or tuple(self._row_zero_sc.shape()) != (1, C, H):
            self._row_zero_sc = self._empty((1, C, H))
        sources, offsets, index = [], [], []
        for r, f in zip(rows, fresh):
            ref = self._rows[r].sc
            if f or ref is None:
                ref = (self._row_zero_sc, 0)
            elif ref[0].shape()[1] != C:
                raise DgportError(f"row {r}'s self-conditioning signal is for a canvas of {ref[0].shape()[1]} "
                                  f"positions, this canvas has {C}: start its canvas with fresh=True")
            for j, s in enumerate(sources):
                if s is ref[0]:
                    break
            else:
                j = len(sources)
                offsets.append(offsets[-1] + sources[-1].shape()[0] if sources else 0)
                sources.append(ref[0])
            index.append(offsets[j] + ref[1])
        if len(sources) == 1 and index == list(range(sources[0].shape()[0])):
            return sources[0]  # already the batch, in order
        sess = self._util("gather", len(sources))
        io = sess.io_binding()
        for j, s in enumerate(sources):
            io.bind_ortvalue_input(f"s{j}", s)
        io.bind_cpu_input("index", np.asarray(index, np.int64))
        io.bind_output("y", *self._dev)
        sess.run_with_iobinding(io)
        return io.get_outputs()[0]
