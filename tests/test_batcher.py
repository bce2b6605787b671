"""serving/batcher.py on its own, with stand-in images: admission and turns, counted in model inputs."""

import threading

import pytest

from serving.batcher import Batcher, Overloaded


class FakeTiles:
    """An image of ``count`` model inputs; ``done`` once every input ran."""

    def __init__(self, count: int) -> None:
        self.count, self.ran = count, 0

    @property
    def done(self) -> bool:
        return self.ran == self.count


def _batcher(batches: list, gate: threading.Event | None = None, **kwargs) -> Batcher:
    def run_batch(slices):
        if gate is not None:
            gate.wait(10)
        batches.append([(tiles.count, b - a) for tiles, a, b in slices])
        for tiles, a, b in slices:
            tiles.ran += b - a
        return sum(b - a for _, a, b in slices)

    settings = dict(max_batch_size=8, max_latency_s=0.1, wait_s=0.0, seconds_per_input=0.01)
    return Batcher(run_batch, **{**settings, **kwargs})


def test_a_request_is_never_refused_for_its_own_images():
    """2 images of 32 inputs (0.32 s each at 10 ms an input, over the 0.1 s wait): one request, both admitted;
    the same image from another request is refused with the sentence."""
    gate = threading.Event()
    batcher = _batcher([], gate)
    try:
        request = object()
        futures = [batcher.submit(FakeTiles(32), request) for _ in range(2)]
        with pytest.raises(Overloaded, match="model inputs of other requests would run before this image's last"):
            batcher.submit(FakeTiles(32))
        gate.set()
        assert all(f.result(10).tiles.done for f in futures)
    finally:
        gate.set()
        batcher.close()


def test_batches_take_turns_so_a_cheap_image_runs_beside_a_tiled_one():
    """A 1-input image queued behind a 32-input one runs in the next batch, not after the 32 inputs."""
    gate, batches = threading.Event(), []
    batcher = _batcher(batches, gate, max_latency_s=10.0)
    try:
        first = batcher.submit(FakeTiles(32))  # its first batch holds the worker at the gate
        costly, cheap = batcher.submit(FakeTiles(32)), batcher.submit(FakeTiles(1))
        gate.set()
        cheap.result(10)
        costly.result(10)
        first.result(10)
        # The first batch taken once it was queued (the worker may have taken the first one before or after it).
        ran_in = next(i for i, batch in enumerate(batches) if (1, 1) in batch)
        assert ran_in <= 1 and len(batches) >= 8, batches  # 65 inputs: 9 batches of 8; the cheap one in the 1st/2nd
        assert all(sum(n for _, n in batch) == 8 for batch in batches[:-1]), batches
    finally:
        gate.set()
        batcher.close()
