"""serving/memory.py: release_memory() gives freed heap pages back, where glibc keeps them after threads free."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import anyio
import numpy as np
import pytest

from serving.memory import has_malloc_trim, release_memory, rss_bytes, start_release_thread

ROOT = Path(__file__).resolve().parents[1]
needs_glibc = pytest.mark.skipif(not has_malloc_trim(), reason="no glibc here: malloc_trim does not exist, "
                                 "release_memory() only reports")

# In a fresh process (its heaps are its own): 4 threads each make 800 buffers of 64 KiB (under glibc's mmap
# threshold, so they come from the arenas' heaps), then all but every 50th and the last are freed. The kept
# ones pin each heap's top, so glibc cannot shrink the heaps on its own: ~200 MiB freed stays resident.
FRAGMENT = textwrap.dedent("""
    import json, threading
    from serving.memory import release_memory, rss_bytes

    kept = []
    def work():
        buffers = [b"x" * 65536 for _ in range(800)]
        kept.extend(buffers[::50] + buffers[-1:])
        del buffers
    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    freed = rss_bytes()
    result = release_memory()
    print(json.dumps({"freed": freed, "before": result.rss_before, "after": result.rss_after,
                      "trimmed": result.trimmed, "kept": len(kept)}))
""")


@needs_glibc
def test_release_memory_gives_back_what_threads_freed_inside_the_heaps():
    done = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "MALLOC_ARENA_MAX": "2"})
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert row["trimmed"] is True
    # ~196 MiB were freed inside the heaps; at least half of it must leave the process.
    assert row["before"] - row["after"] > 100 * 2**20, row


def test_release_memory_reports_and_never_fails():
    result = release_memory()
    assert result.trimmed in (True, False) if has_malloc_trim() else result.trimmed is None
    assert result.seconds >= 0
    assert result.rss_before > 0 and result.rss_after > 0 and rss_bytes() > 0


@needs_glibc
def test_release_thread_is_a_daemon_and_refuses_a_period_that_is_no_period():
    thread = start_release_thread(every_s=3600)
    assert thread.daemon and thread.is_alive()
    with pytest.raises(ValueError, match="every_s"):
        start_release_thread(every_s=0)



def test_release_memory_frees_the_image_a_refusal_from_a_decode_thread_keeps_in_a_cycle():
    """The service decodes in anyio's threads; a refusal raised there keeps its frames (and the decoded image)
    in a cycle through the asyncio Future that carried it, which only the cyclic collector frees."""
    images = []

    def decode() -> None:
        image = np.ones((64, 64, 3), np.uint8)
        images.append(weakref.ref(image))
        raise ValueError("over the limit")

    async def refused() -> None:
        try:
            await anyio.to_thread.run_sync(decode)
        except ValueError:
            pass

    gc.disable()  # a worker's collector runs rarely; here never, so the test sees what an idle worker holds
    try:
        anyio.run(refused)
        # Until it runs its next job, an anyio worker thread keeps its last one (the Future) in a local; the
        # loop stops its threads as it closes, each in its own time.
        for thread in threading.enumerate():
            if thread.name == "AnyIO worker thread":
                thread.join(timeout=10)
        assert images[0]() is not None, "no cycle held the image: release_memory's gc.collect() may be unneeded"
        release_memory(collect=False)
        assert images[0]() is not None
        release_memory()
        assert images[0]() is None
    finally:
        gc.enable()
