"""Giving a worker's freed memory back to the system (glibc malloc keeps what the request threads free).

    release_memory()                  # malloc_trim(0): every arena's free pages back to the kernel, now
    start_release_thread(every_s=10)  # the same from a daemon thread, every 10 s (a few ms each on a 1 GiB heap)
    MALLOC_ENV                        # glibc settings for the workers' environment (read at process start)

Where the service calls it: ``AgmmSegmenter.__init__`` (serving/service.py), right after
``self.batcher = self._start_batcher()``, keeps ``self.memory_release = start_release_thread()``; and the
``envs`` of its ``@bentoml.service`` hold ``MALLOC_ENV`` (``[{"name": k, "value": v} for k, v in
MALLOC_ENV.items()]``, in place of the MALLOC_ARENA_MAX entry alone). Both are needed: the settings keep most
large buffers out of the heaps, the thread hands back what still ends up freed inside them.

Why the memory stays: glibc gives each thread an arena (MALLOC_ARENA_MAX caps them) and returns freed memory to
the kernel only from the top of a heap. Decoded images, their float tiles and PNG encodes are freed in another
order than they were made, so the freed space lies inside the heaps. And glibc's mmap threshold is dynamic:
freeing one mmap'd buffer raises it to that buffer's size (up to 32 MiB), after which buffers of up to that
size come from the heaps instead of their own mappings, where a free would have unmapped them. Setting
MALLOC_MMAP_THRESHOLD_ fixes the threshold; malloc_trim(0) releases the free pages inside every heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# glibc tunables for the workers, read once when a process starts (so they go in its environment, never
# os.environ at run time). 256 KiB: an image row block or a small tile stays in the heaps, any decoded image
# or float tile (a 128x128 tile of 21 float32 planes is 1.3 MiB) gets its own mapping, unmapped on free.
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "2",
    "MALLOC_MMAP_THRESHOLD_": str(256 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024),
}


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


def release_memory() -> MemoryRelease:
    """Hands the free pages of every malloc arena back to the kernel (glibc ``malloc_trim(0)``).

    Safe from any thread at any time: glibc locks each arena while it walks it, so a request thread allocating
    meanwhile waits for that arena only (a few ms for a 1 GiB heap). Live buffers are untouched.
    """
    before, start = rss_bytes(), time.perf_counter()
    trimmed = bool(_LIBC.malloc_trim(0)) if _LIBC is not None else None
    return MemoryRelease(before, rss_bytes(), trimmed, time.perf_counter() - start)


def start_release_thread(every_s: float = 10.0) -> threading.Thread | None:
    """Calls release_memory() every ``every_s`` seconds from a daemon thread; None (and no thread) without glibc.

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
