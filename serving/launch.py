"""Start and stop a real `bentoml serve` of serving/service.py on 127.0.0.1 (demo, tests, load benchmark)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil  # a BentoML dependency

ROOT = Path(__file__).resolve().parents[1]  # bentofile.yaml lives here: `bentoml serve` finds the service


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(port: int, bento: str | None = None) -> list[str]:
    """The `bentoml serve` command line for 127.0.0.1:port: of the project root, or of a built Bento's tag."""
    return [sys.executable, "-m", "bentoml", "serve", *([bento] if bento else []), "--host", "127.0.0.1", "--port",
            str(port)]


def start_server(port: int, log: Path, env: dict[str, str], timeout_s: float = 180,
                 bento: str | None = None) -> subprocess.Popen:
    """Starts `bentoml serve` with ``env`` (AGMM_MODEL=... and friends), its output in ``log``.

    ``bento``: a built Bento's tag to serve instead of the project root; it runs from ``log``'s folder, so that
    nothing of the checkout can stand in for what the Bento lacks.

    Returns the process once /readyz answers 200; raises RuntimeError with the log's tail if the server exits
    first or is not ready within ``timeout_s``.
    """
    env = {**env, "BENTOML_DO_NOT_TRACK": "True"}
    with open(log, "wb") as out:
        # Its own session, so stop_server can signal the CLI and the arbiter as one process group.
        process = subprocess.Popen(serve_command(port, bento), cwd=log.parent if bento else ROOT, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return process
            except (urllib.error.URLError, OSError):  # not listening yet, or busy loading the model
                pass
            time.sleep(0.5)
        raise RuntimeError(f"bentoml serve was not ready after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
    except BaseException:
        if process.poll() is None:
            stop_server(process)
        raise


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (CLI and arbiter); then SIGKILL to whatever of its tree is left."""
    children = psutil.Process(process.pid).children(recursive=True)  # workers run in their own groups
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for child in psutil.wait_procs(children, timeout=10)[1]:
        child.kill()


@contextlib.contextmanager
def serving(model: Path | None, folder: Path, timeout_s: float = 180, **env: str) -> Iterator[str]:
    """A real `bentoml serve` of ``model`` (a file or a model folder) for the length of a with-block; yields its
    base URL.

    The server gets this process's environment without any AGMM_* setting (so an outer one cannot leak in),
    plus AGMM_MODEL (unless ``model`` is None: then ``env`` names it, e.g. AGMM_BENTO_MODEL), ``env``, and its
    own BentoML home and log in ``folder`` (servers sharing a home share and wipe each other's Prometheus files;
    a store entry saved with BENTOML_HOME=folder/bentoml is found there).
    """
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("AGMM_")}
    server_env.update(BENTOML_HOME=str(folder / "bentoml"), **({"AGMM_MODEL": str(model)} if model else {}), **env)
    port = free_port()
    process = start_server(port, folder / "serve.log", server_env, timeout_s=timeout_s)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)
