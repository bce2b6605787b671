"""Header floods against a real `bentoml serve`: N connections that send nothing or trickle their headers.

Opens ``--silent`` connections that never send a byte and ``--trickling`` ones that send a header byte every
``--trickle-s`` seconds, then, while they are open, times good /segment requests; reports when the server closed
each flood connection (the header deadline, AGMM_HEADER_TIMEOUT_S, or the cap AGMM_MAX_CONNECTIONS) and the
good requests' latencies.

    python benchmarks/header_flood.py MODEL --silent 1000 --trickling 1000 --header-timeout-s 10
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import selectors
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.launch import serving  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("header_flood", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="an artifact or an agmm-export folder to serve")
    parser.add_argument("--silent", type=int, default=1000, help="connections that send nothing")
    parser.add_argument("--trickling", type=int, default=1000, help="connections that trickle their headers")
    parser.add_argument("--trickle-s", type=float, default=2.0, help="seconds between header bytes")
    parser.add_argument("--header-timeout-s", type=float, default=10.0, help="AGMM_HEADER_TIMEOUT_S")
    parser.add_argument("--max-connections", type=int, default=1000, help="AGMM_MAX_CONNECTIONS")
    parser.add_argument("--good", type=int, default=10, help="good requests sent while the flood is open")
    return parser


def flood(url: str, args: argparse.Namespace) -> dict:
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    socks = []
    for i in range(args.silent + args.trickling):
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.setblocking(False)
        socks.append(sock)
    trickling = socks[args.silent:]
    opened_s = time.monotonic() - start
    closed_at: dict[int, float] = {}
    stop = threading.Event()

    def trickle() -> None:
        header = b"POST /segment HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        for byte in header:
            for sock in trickling:
                if sock.fileno() not in closed_at:
                    try:
                        sock.send(bytes([byte]))
                    except OSError:
                        pass
            if stop.wait(args.trickle_s):
                return

    def watch() -> None:
        selector = selectors.DefaultSelector()
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while len(closed_at) < len(socks) and not stop.is_set():
            for key, _ in selector.select(timeout=0.5):
                try:
                    data = key.fileobj.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    closed_at[key.fileobj.fileno()] = time.monotonic() - start
                    selector.unregister(key.fileobj)

    threads = [threading.Thread(target=trickle, daemon=True), threading.Thread(target=watch, daemon=True)]
    for thread in threads:
        thread.start()
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buffer, format="PNG")
    latencies = []
    for _ in range(args.good):
        t = time.perf_counter()
        response = requests.post(f"{url}/segment", files={"image": ("x.png", buffer.getvalue())}, timeout=60)
        latencies.append((response.status_code, round(time.perf_counter() - t, 3)))
        time.sleep(0.2)
    deadline = start + opened_s + args.header_timeout_s + 10
    while len(closed_at) < len(socks) and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join()
    info = requests.get(f"{url}/info", timeout=30).json()
    for sock in socks:
        sock.close()
    times = sorted(closed_at.values())
    return {"connections": len(socks), "opened_in_s": round(opened_s, 2), "closed": len(times),
            "still_open": len(socks) - len(times),
            "closed_by_s": {"p50": round(times[len(times) // 2], 2) if times else None,
                            "max": round(times[-1], 2) if times else None},
            "good_requests": latencies, "guard": info["connections"]}


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * (args.silent + args.trickling) + 1024)),
                                                hard))
    with tempfile.TemporaryDirectory() as tmp:
        with serving(args.model, Path(tmp), AGMM_HEADER_TIMEOUT_S=str(args.header_timeout_s),
                     AGMM_MAX_CONNECTIONS=str(args.max_connections)) as url:
            print(json.dumps(flood(url, args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
