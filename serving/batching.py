"""Request batching for the server: requests that wait while a batch runs go together into the next.

One worker thread owns the model. It takes the first waiting request, adds every other waiting
request while the batch stays within ``max_batch_rows`` rows (a request has ``n`` rows), and runs
them as one :meth:`Engine.generate_jobs` call: one forward pass per step for all of them, each with its
own settings, stop strings, stream and seed (a seeded request draws the same random numbers alone or
batched; its answers are identical unless the batch shape changes the logits' rounding, as GPU kernels may).
A request that would overflow the batch waits for the next one; a single request larger than the
limit runs alone. This is static batching: a batch finishes before the next one starts.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future

from .engine import Engine, Job

DEFAULT_MAX_BATCH_ROWS = 32


class Batcher:
    def __init__(self, engine: Engine, max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS):
        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be at least 1")
        self.engine = engine
        self.max_batch_rows = max_batch_rows
        self._waiting: collections.deque[tuple[Job, Future]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0  # batches run, and the largest one (rows): for logs and tests
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._loop, name="mateconv-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._waiting.append((job, fut))
            self._cond.notify()
        return fut

    def close(self) -> None:
        with self._cond:
            self._closed = True
            while self._waiting:
                self._waiting.popleft()[1].cancel()
            self._cond.notify()

    def _next_batch(self) -> list[tuple[Job, Future]] | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            batch = [self._waiting.popleft()]
            rows = _rows(batch[0][0])
            while self._waiting and rows + _rows(self._waiting[0][0]) <= self.max_batch_rows:
                job, fut = self._waiting.popleft()
                batch.append((job, fut))
                rows += _rows(job)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch = [(job, fut) for job, fut in batch if fut.set_running_or_notify_cancel()]
            if not batch:
                continue
            self.batches += 1
            self.largest_batch = max(self.largest_batch, sum(_rows(job) for job, _ in batch))
            try:
                results = self.engine.generate_jobs([job for job, _ in batch])
            except Exception as e:  # the whole batch failed: every request hears why
                for _, fut in batch:
                    fut.set_exception(e)
                continue
            for (_, fut), res in zip(batch, results):
                if isinstance(res, Exception):  # this request alone could not run (e.g. a bad seed)
                    fut.set_exception(res)
                else:
                    fut.set_result(res)


def _rows(job: Job) -> int:
    return len(job.prompts) * job.n
