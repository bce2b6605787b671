"""The service's batcher: the model inputs of concurrent requests (letterboxed canvases and sliding-window
tiles) run together, counted in model inputs, with a deadline per request and fair turns between images.

A request arrives as ``agmm_deploy.inference.Tiles`` (its image already decoded, checked and priced at the
door). One worker thread drains the queue in the manner of Triton's dynamic batcher, waiting at most ``wait_s``
for more inputs while a batch is not full, and runs each batch with ``agmm_deploy.inference.run_slices``.

Admission, in model inputs (what /info reports as ``admission``):

- Turns: a batch of ``max_batch_size`` inputs is filled round-robin over the queued images, one input each per
  turn, so an image of 1 input runs in the next batch beside tiled images of 32 instead of behind them. A tiled
  image spans several batches; several images share one.
- Admission: ``submit`` refuses an image at once with ``Overloaded`` (503 + Retry-After) when the inputs that
  would run before its last one, at most its own count from each image of *other* requests, would take longer
  than ``max_latency_s``. A request's own images never count against it, so every request within the door's
  limits is admitted on an idle server (a /segment_batch of 2 images of 32 inputs each included).
- Deadline: an image that has not started by its deadline (``max_latency_s`` after admission, plus the time
  of the batch that may be running then) is dropped with ``Overloaded``; work whose caller went away (client disconnected, request cancelled) is dropped silently.
  Neither is ever run.

Each finished request gets its ``Tiles`` at once, the model's outputs gathered at the image's size; the
request's own thread takes the label map from them, so that the worker starts the next batch instead of
post-processing this one (on a CPU, the model would otherwise wait for the argmax of every image of the batch,
and the handlers for the slowest of them).

Why not BentoML's adaptive batching (``@bentoml.api(batchable=True)``): its dispatcher counts requests, not
model inputs, so a 352-tile photo and a 1-canvas thumbnail weigh the same in a batch of ``max_batch_size``; it
fits its latency model per request, so after a burst of tiled requests it overestimates everyone's cost and
holds lone requests back; and it answers overload with a bare 503 "An unexpected error has occurred". It also
takes its inputs through a serialisation round trip (base64 images in JSON), which this path has no use for.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from agmm_deploy.inference import Tiles

logger = logging.getLogger("bentoml.agmm_deploy")

Slices = list[tuple[Tiles, int, int]]


class Overloaded(Exception):
    """The request cannot be served within its deadline; ``retry_after_s`` is when the queue should have room."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Result:
    tiles: Tiles  # done: every model output added; ``tiles.labels()`` is the label map on the device
    batch_size: int  # model inputs in the batch that ran this image's last input


ADMISSION = {
    "unit": "model inputs (1 letterboxed canvas, or an image's sliding-window tiles)",
    "turns": "round-robin over queued images, one input each per turn, max_batch_size inputs per batch",
    "refused_when": "the inputs that would run before an image's last one (at most its own count from each image "
                    "of other requests) would take longer than max_latency_ms: 503 with Retry-After",
    "own_images": "a request's own images never count against it: every request within the limits is admitted on "
                  "an idle server",
    "deadline": "an image not started within max_latency_ms of its admission (plus one batch's time, for the batch "
                "running then) is answered 503",
}


@dataclass(eq=False)
class _Job:
    tiles: Tiles
    deadline: float  # time.monotonic() by which its first input must have started
    request: object  # the request it belongs to (its images never count against each other)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    sent: int = 0  # inputs handed to a batch so far

    @property
    def remaining(self) -> int:
        return self.tiles.count - self.sent


class Batcher:
    """Batches model inputs across requests on one worker thread.

    Args:
        run_batch: runs the inputs of the given slices together (``run_slices`` with the runner) and returns
            how many ran.
        max_batch_size: most model inputs in one batch.
        max_latency_s: how long a request may wait for the work queued ahead of it.
        wait_s: how long a batch that is not full waits for more inputs (0: run what is there).
        seconds_per_input: the first estimate of the time per model input (from the warm-up); then a running
            mean of the batches' measured times.
    """

    def __init__(self, run_batch: Callable[[Slices], int], *, max_batch_size: int, max_latency_s: float,
                 wait_s: float, seconds_per_input: float, on_batch: Callable[[int], None] | None = None) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_s
        self.wait_s = wait_s
        self.seconds_per_input = seconds_per_input
        self.on_batch = on_batch
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_inputs = 0  # inputs of queued jobs not yet handed to a batch
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="agmm-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the request side (event loop thread)

    def submit(self, tiles: Tiles, request: object = None) -> concurrent.futures.Future:
        """Queues one image's inputs; raises Overloaded when the work of other requests that would run before
        its last input outlasts its deadline (module docstring). ``request``: a key shared by the images of one
        request (None: the image is a request of its own)."""
        request = object() if request is None else request
        with self._cond:
            ahead = sum(min(job.remaining, tiles.count) for job in self._queue if job.request is not request)
            wait = ahead * self.seconds_per_input
            if wait > self.max_latency_s:
                retry = max(1, math.ceil(wait))
                raise Overloaded(f"the server is busy: {ahead} model inputs of other requests would run before "
                                 f"this image's last one, about {wait:.1f} s of work, over the "
                                 f"{self.max_latency_s * 1000:.0f} ms a request may wait (AGMM_MAX_LATENCY_MS). "
                                 f"Retry in {retry} s.", retry)
            # Its first input may also have to wait for the batch running now, which nothing can shorten.
            running_s = self.max_batch_size * self.seconds_per_input
            job = _Job(tiles, deadline=time.monotonic() + self.max_latency_s + running_s, request=request)
            self._queue.append(job)
            self._queued_inputs += tiles.count
            self._cond.notify()
        return job.future

    async def segment(self, tiles: Tiles, request: object = None) -> Result:
        """One image's model outputs, all added; cancelling the awaiting task drops its queued work."""
        return await asyncio.wrap_future(self.submit(tiles, request))

    def replace_run_batch(self, run_batch: Callable[[Slices], int]) -> None:
        """Runs every batch from the next one on with ``run_batch`` (a new model); the batch running now, if
        any, finishes with the old one. Queued work is kept: its inputs must fit the new model (the caller
        checks the input size and normalisation)."""
        with self._cond:
            self.run_batch = run_batch

    def queued_inputs(self) -> int:
        with self._cond:
            return self._queued_inputs

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the worker thread

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                end = time.monotonic() + self.wait_s
                while self._queued_inputs < self.max_batch_size and not self._closed:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                slices = self._take()
                run_batch = self.run_batch  # taken with the batch: a new model starts at a batch boundary
            if slices:
                self._run(slices, run_batch)

    def _take(self) -> Slices:
        """Up to max_batch_size inputs, round-robin over the queued images (one input each per turn, earlier
        images first within a turn); drops cancelled jobs and those past their deadline. Under the lock."""
        now = time.monotonic()
        for job in list(self._queue):
            if job.future.done():  # cancelled by its caller: the client went away
                self._drop(job)
            elif job.sent == 0 and now > job.deadline:
                self._drop(job)  # it could not start in time: refuse it now rather than run it late
                retry = max(1, math.ceil(self._queued_inputs * self.seconds_per_input))
                _settle(job.future, error=Overloaded(
                    f"the server is busy: this image could not start within the {self.max_latency_s * 1000:.0f} "
                    f"ms a request may wait (AGMM_MAX_LATENCY_MS). Retry in {retry} s.", retry))
        share = dict.fromkeys(self._queue, 0)  # inputs of each job in this batch
        taken = 0
        while taken < self.max_batch_size:
            turn = [job for job in share if share[job] < job.remaining][:self.max_batch_size - taken]
            if not turn:
                break
            for job in turn:
                share[job] += 1
            taken += len(turn)
        slices: Slices = []
        for job, count in share.items():
            if count:
                slices.append((job, job.sent, job.sent + count))
                job.sent += count
                self._queued_inputs -= count
                if job.remaining == 0:
                    self._queue.remove(job)
        return slices

    def _drop(self, job: _Job) -> None:
        self._queue.remove(job)
        self._queued_inputs -= job.remaining

    def _run(self, slices: list[tuple[_Job, int, int]], run_batch: Callable[[Slices], int]) -> None:
        start = time.perf_counter()
        jobs = list(dict.fromkeys(job for job, _, _ in slices))
        try:
            with torch.inference_mode():
                count = run_batch([(job.tiles, a, b) for job, a, b in slices])
        except Exception as err:  # the model failed: every job in the batch gets the error, the worker goes on
            logger.exception("the model failed on a batch of %d inputs", sum(b - a for _, a, b in slices))
            for job in jobs:
                with self._cond:
                    if job in self._queue:
                        self._drop(job)
                _settle(job.future, error=RuntimeError(f"the model failed on this image's batch ({err})"))
            return
        elapsed = time.perf_counter() - start
        # A running mean over batches: the queue's wait estimates follow the load actually seen.
        self.seconds_per_input = 0.8 * self.seconds_per_input + 0.2 * elapsed / count
        # Counted before any answer goes out: a client that has its answer and then reads /metrics finds its batch
        # there (counted after, the last batch of a load test was missing from a reading taken right after it).
        if self.on_batch is not None:
            self.on_batch(count)
        for job in jobs:
            if job.tiles.done:
                tiles, job.tiles = job.tiles, None  # the caller holds the only reference from here on
                _settle(job.future, result=Result(tiles, count))


def _settle(future: concurrent.futures.Future, result: Result | None = None,
            error: BaseException | None = None) -> None:
    """Sets a result or an error unless the caller cancelled the future meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
