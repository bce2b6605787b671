"""The local engine: one process keeps the model busy while a thread pool decodes and encodes around it.

Decoding runs ahead of the model (up to a few batches of images in flight), the model runs ``batch_size`` model
inputs of many images at a time (letterboxed canvases and sliding-window tiles alike), and each finished label
map is encoded and written atomically on the pool while the next batch runs. PIL and zlib release the GIL, so
the threads overlap with the model's own.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np

from agmm_deploy.bulk import Job, default_batch_size
from agmm_deploy.bulk.inputs import Input
from agmm_deploy.bulk.stages import FAILED, ModelInfo, decode_input, segment_each, write_outputs
from agmm_deploy.inference import input_count
from agmm_deploy.runtime import Runner


def run(job: Job, runner: Runner, info: ModelInfo, todo: list[Input],
        progress: bool = True) -> Iterator[tuple[Input, dict]]:
    """(input, row fields) for every input of ``todo``, as each is written or fails."""
    from tqdm import tqdm

    batch_size = job.batch_size or default_batch_size(runner.device.type)
    workers = job.workers or os.cpu_count() or 1
    lookahead = max(2 * batch_size, 2 * workers)  # decoded images waiting for the model, at most
    pending = iter(todo)
    decodes: deque[tuple[Input, Future]] = deque()
    writes: deque[tuple[Input, tuple[int, int], int, Future]] = deque()

    def written(entry: Input, size: tuple[int, int], inputs: int, future: Future) -> tuple[Input, dict]:
        return entry, dict(height=size[0], width=size[1], inputs=inputs, **future.result())

    with ThreadPoolExecutor(workers, thread_name_prefix="agmm-bulk") as pool, \
            tqdm(total=len(todo), desc="predict", unit="img", disable=not progress) as bar:
        def read_ahead() -> None:
            while len(decodes) < lookahead and (entry := next(pending, None)) is not None:
                decodes.append((entry, pool.submit(decode_input, entry, job.max_pixels)))

        read_ahead()
        while decodes:
            group: list[tuple[Input, np.ndarray]] = []
            inputs = 0
            while decodes and inputs < batch_size:
                entry, future = decodes.popleft()
                read_ahead()
                image, failure = future.result()
                if failure is not None:
                    bar.update()
                    yield entry, failure
                    continue
                group.append((entry, image))
                inputs += input_count(image.shape[0], image.shape[1], runner.input_size, job.overlap)
            for (entry, image), result in zip(group, segment_each(runner, [im for _, im in group], batch_size, job.overlap)):
                if isinstance(result, str):
                    writes.append((entry, image.shape[:2], 0, _done(dict(status=FAILED, error=result))))
                    continue
                labels, used = result
                writes.append((entry, image.shape[:2], used, pool.submit(
                    write_outputs, job.out, entry.key, labels, info, image=image if job.overlay else None,
                    alpha=job.alpha)))
            while writes and (writes[0][3].done() or len(writes) > lookahead):
                bar.update()
                yield written(*writes.popleft())
        while writes:
            bar.update()
            yield written(*writes.popleft())


def _done(value: dict) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
