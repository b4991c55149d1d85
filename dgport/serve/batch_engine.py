"""Continuous batching (`dgport serve --max-batch N`, N > 1): the worker denoises up to N requests
together. Between two denoising steps it admits waiting requests (their prompts encoded into rows of
their own), drops cancelled ones, and answers finished ones; each request's tokens are those of its
own run with its seed (dgport.batch). Prefix reuse keeps the last finished request's row: a new
request whose prompt extends it starts from a copy of that row's cache (with the same images in it: see
serve/image_plan.py). A request's images go through the vision tower when it is admitted."""

import queue
import time

from ..batch import BatchLoop
from ..errors import DgportError
from ..loop import check_context, fresh_seed, make_rng
from .engine import Engine, Job, failed, shutting_down
from .image_plan import for_cached_row, images_after


class BatchEngine(Engine):
    def __init__(self, model, max_queue: int, max_batch: int):
        self.max_batch = max_batch
        self.kept: int | None = None  # the backend row that `state` describes (prefix reuse)
        self.active: list[Job] = []  # the jobs in the batch (read by shutdown() from other threads)
        super().__init__(model, max_queue)

    def _cached_len(self) -> int:
        return -1 if self.kept is None else self.gen.backend.row_cache_len(self.kept)

    def shutdown(self) -> None:
        super().shutdown()
        for job in list(self.active):
            job.cancel.set()

    def _run(self) -> None:
        loop = BatchLoop(self.gen.backend, self.max_batch)
        while True:
            while len(loop) < self.max_batch:
                if not len(loop):
                    self.busy = False  # idle until a request comes (every finished one is counted)
                try:
                    job = self.queue.get(block=not len(loop))
                except queue.Empty:
                    break
                if job is None:  # close(): the batch was already cancelled by shutdown()
                    for entry in list(loop.entries):
                        self._cancel(loop, entry)
                    return
                if job.cancel.is_set():  # its client left while it waited
                    self.cancelled += 1
                elif self.closing:  # taken before shutdown() emptied the queue
                    shutting_down(job)
                else:
                    self._admit(loop, job)
            for entry in list(loop.entries):
                if entry.tag.cancel.is_set() or self.closing:
                    self._cancel(loop, entry)
            self.busy = bool(loop.entries)
            if not loop.entries:
                continue
            rows = [e for e in loop.entries if e.row.denoising or e.pending]
            started = time.perf_counter()
            try:
                finished = loop.step()
            except Exception as e:  # noqa: BLE001  (the backend failed: every request in the batch gets it)
                for entry in list(loop.entries):
                    loop.remove(entry)
                    self._end(entry.tag, error=e)
                continue
            took = time.perf_counter() - started
            for entry in rows:
                entry.tag.step_s.append(took)
            for entry in finished:
                self._finish(loop, entry)

    def _admit(self, loop: BatchLoop, job: Job) -> None:
        plan, gen = job.plan, self.gen
        job.started = time.perf_counter()
        self.active.append(job)
        try:
            ids, n, m = self._prompt(plan)
            settings = gen.settings(plan.max_new_tokens, **plan.overrides)
            settings.validate()
            check_context(gen.config, n, len(ids) - n, settings.max_new_tokens)
            job.seed = fresh_seed(plan.seed)
            job.ids, job.n, job.settings = ids, n, settings

            def on_step(event):
                if plan.drafts:
                    job.post(("step", event.canvas_index, event.step, float(event.temperature),
                              event.argmax.tolist(), int(event.accepted.sum())))

            def on_canvas(event):
                job.post(("canvas", event.canvas_index, event.tokens.tolist(), event.steps, event.finished))

            images = for_cached_row(images_after(plan, m), ids, n, gen.backend)  # (the vision tower runs here)
            job.post(("start", ids, n))
            loop.add(ids, settings, make_rng(job.seed), plan.template, on_step, on_canvas, tag=job,
                     copy_of=self.kept if n else None, cached=n, images=images)
        except Exception as e:  # noqa: BLE001
            self._end(job, error=e)

    def _cancel(self, loop: BatchLoop, entry) -> None:
        loop.remove(entry)
        self._end(entry.tag, cancelled=True)

    def _finish(self, loop: BatchLoop, entry) -> None:
        job = entry.tag
        if entry.error is not None:
            loop.close(entry)
            self._end(job, error=entry.error)
            return
        result = self.gen._result(entry.row.result, job.ids, job.settings, job.seed)
        done, state = self._outcome(job.plan, job.ids, job.n, result)
        if self.kept is not None:
            self.gen.backend.close_row(self.kept)
        self.kept, self.state = entry.backend_row, state  # the newest answer's row: the next prefix to reuse
        steps = len(job.step_s)
        timings = self.gen.backend.timings.as_dict()
        self._end(job, done={**done, "ms_per_step": 1000 * sum(job.step_s) / max(steps, 1),
                             "ms_per_encode": timings["ms_per_encode"],
                             "queue_ms": 1000 * (job.started - job.queued_at),
                             "generate_ms": 1000 * (time.perf_counter() - job.started)})

    def _end(self, job: Job, done: dict | None = None, error: Exception | None = None, cancelled: bool = False):
        if done is not None:
            job.post(("done", done))
        elif cancelled:
            if self.closing:
                shutting_down(job)
            else:
                self.cancelled += 1
                job.post(("cancelled",))
        else:
            failed(job, error if isinstance(error, Exception) else DgportError(str(error)))
        if job in self.active:
            self.active.remove(job)
        self.served += 1
        self.durations.append(time.perf_counter() - (job.queued_at if job.started is None else job.started))
