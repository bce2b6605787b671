"""Giving a worker's freed memory back: what refused requests leave in reference cycles, and what glibc keeps.

    release_memory()                  # gc.collect(), then malloc_trim(0): every arena's free pages to the kernel
    start_release_thread(every_s=10)  # the same from a daemon thread, every 10 s

Where the service calls it: ``AgmmSegmenter.__init__`` (serving/service.py), right after
``self.batcher = self._start_batcher()``: ``self.memory_release = start_release_thread()``. The service's
``MALLOC_ARENA_MAX=2`` (its ``envs``, which `bentoml serve` gives the workers) stays as it is.

Why a worker's memory stays up after a burst (benchmarks/soak.py measures it):
- A Refusal raised in the decode thread (``anyio.to_thread.run_sync``) travels through an asyncio Future; the
  Future holds the exception, whose traceback holds the frames, whose locals hold the decoded image and the
  upload: a reference cycle. Only Python's cyclic collector frees it, and a worker allocates few container
  objects, so a full collection comes rarely and never while idle: 16 refused 4096x2048 images (one
  /segment_batch of 16-bit PNGs) keep 384 MiB until then. ``gc.collect()`` frees them.
- What is freed goes back to glibc's heaps, which return memory to the kernel only from their top; decoded
  images, tiles and PNG encodes are freed in another order than they were made, so the free space lies inside
  the heaps. ``malloc_trim(0)`` gives the free pages inside every heap back.
An idle anyio worker thread also keeps its last job (the Future, so the exception) in a local until its next
job, which no collection frees; ``_decode`` should drop the decoded image before it raises a Refusal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MemoryRelease:
    """One release_memory() call: this process's RSS before and after (bytes), and what malloc_trim said
    (True: it gave pages back; False: nothing to give; None: no glibc here, nothing was tried)."""

    rss_before: int
    rss_after: int
    trimmed: bool | None
    seconds: float


def _libc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is another (musl, macOS), which has no malloc_trim."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def has_malloc_trim() -> bool:
    """Whether this process runs on glibc, where release_memory() can do anything."""
    return _LIBC is not None


def rss_bytes() -> int:
    """This process's resident set size (VmRSS of /proc/self/status); 0 where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release_memory(collect: bool = True) -> MemoryRelease:
    """Frees what only reference cycles still hold (``gc.collect()``), then hands the free pages of every malloc
    arena back to the kernel (glibc ``malloc_trim(0)``).

    Safe from any thread at any time: the collection holds the GIL (tens of ms in a worker with torch loaded);
    glibc locks each arena while it walks it, so a thread allocating meanwhile waits for that arena only (a few
    ms for a 1 GiB heap). Live buffers are untouched.

    Args:
        collect: run a full garbage collection first. Without it, the image buffers that cycles hold (the
            frames of a refused request's traceback) stay: an idle server allocates nothing, so Python's
            generational collector never gets to the oldest generation on its own.
    """
    before, start = rss_bytes(), time.perf_counter()
    if collect:
        gc.collect()
    trimmed = bool(_LIBC.malloc_trim(0)) if _LIBC is not None else None
    return MemoryRelease(before, rss_bytes(), trimmed, time.perf_counter() - start)


def start_release_thread(every_s: float = 10.0) -> threading.Thread | None:
    """Calls release_memory() (collection and trim) every ``every_s`` seconds from a daemon thread; None (and no
    thread) without glibc.

    Periodic rather than after each request: a trim between two requests of a burst would only give back pages
    the next request takes again; every 10 s bounds the memory held after a burst to 10 s of it.
    """
    if _LIBC is None:
        return None
    if every_s <= 0:
        raise ValueError(f"every_s={every_s!r}: expected seconds > 0 between two releases (e.g. 10)")

    def release_forever() -> None:
        while True:
            time.sleep(every_s)
            release_memory()

    thread = threading.Thread(target=release_forever, name="agmm-release-memory", daemon=True)
    thread.start()
    return thread
