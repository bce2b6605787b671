"""Connection limits below the door: a deadline for each request's headers, a cap on open connections per worker.

The door (serving/door.py) sees a request only once its headers are complete, and BentoML 1.4 gives uvicorn
only ``backlog`` (``services.backlog``) and ``timeout_keep_alive`` (``bentoml serve --timeout-keep-alive``,
idle time after a response): not uvicorn's ``limit_concurrency`` nor its h11 options, and uvicorn has no
deadline for a request's headers at all. So a connection that sends nothing, or a header byte every few seconds,
stays open for ever, and enough of them fill the worker's file descriptors. ``GuardedH11Protocol`` is uvicorn's
h11 protocol with two limits, per worker process:

- Header deadline (AGMM_HEADER_TIMEOUT_S): from the moment a connection opens, or its previous response ends,
  the next request's headers must be complete within the deadline (the first byte included). Otherwise the
  connection is closed: with a 408 JSON sentence if some of the request came, silently if nothing did.
- Open connections (AGMM_MAX_CONNECTIONS): a connection over the cap closes the one that has waited longest for
  its headers; when every connection is busy with a request, the new one gets a 503 sentence and is closed.

``install`` names the class in uvicorn's protocol table before BentoML's worker makes its ``uvicorn.Config``
(serving/service.py calls it when the worker imports the service). A request refused by the door before its
body was read is answered with ``Connection: close`` (door.py), which makes uvicorn close the connection instead
of reading the rest of the body.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter

from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("bentoml.agmm_deploy")

# What the guard did in this worker, for /info (and the tests).
COUNTS: Counter[str] = Counter()


def _raw_response(status: str, message: str, extra: str = "") -> bytes:
    """An HTTP/1.1 response written straight to the socket (h11 cannot answer a request it has not seen)."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}"
            "connection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a cap on open connections (module docstring)."""

    header_timeout_s: float = 10.0
    max_connections: int = 1000

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._wait_for_headers()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._waiting():
            self._bytes_waiting += len(data)
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._wait_for_headers()  # first: uvicorn may start a pipelined request from here
        super().on_response_complete()

    # ------------------------------------------------------------------ the two limits

    def _wait_for_headers(self) -> None:
        self._waiting_since = self.loop.time()
        self._bytes_waiting = 0
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._check_deadline)

    def _waiting(self) -> bool:
        """Open, and between requests: no request whose headers are complete is being answered."""
        return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)

    def _check_deadline(self) -> None:
        self._deadline = None
        if not self._waiting():
            return  # a request is being answered; its response's end starts the next wait
        left = self._waiting_since + self.header_timeout_s - self.loop.time()
        if left > 0:
            self._deadline = self.loop.call_later(left, self._check_deadline)
            return
        COUNTS["closed_header_deadline"] += 1
        self._close_waiting(f"the request's headers did not arrive within {self.header_timeout_s:g} s "
                            "(AGMM_HEADER_TIMEOUT_S)")

    def _close_waiting(self, why: str) -> None:
        if self._bytes_waiting:
            self.transport.write(_raw_response("408 Request Timeout", f"{why}; {self._bytes_waiting} bytes came. "
                                               "Send the request in one go."))
        self.transport.close()

    def _make_room(self) -> None:
        """Over the cap: close the connection waiting longest for its headers, else refuse this one."""
        waiting = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol) and c._waiting()]
        if waiting:
            oldest = min(waiting, key=lambda c: c._waiting_since)
            COUNTS["closed_over_cap"] += 1
            oldest._close_waiting(f"this worker holds its limit of {self.max_connections} open connections "
                                  "(AGMM_MAX_CONNECTIONS) and this one had waited longest for a request")
            return
        COUNTS["refused_over_cap"] += 1
        self.transport.write(_raw_response(
            "503 Service Unavailable", f"this worker is answering {self.max_connections} requests, its limit of "
            "open connections (AGMM_MAX_CONNECTIONS). Retry in 1 s.", extra="retry-after: 1\r\n"))
        self.transport.close()


def install(header_timeout_s: float, max_connections: int) -> None:
    """Makes uvicorn, as BentoML starts it in this process, run GuardedH11Protocol with these limits."""
    import uvicorn.config

    GuardedH11Protocol.header_timeout_s = header_timeout_s
    GuardedH11Protocol.max_connections = max_connections
    # BentoML leaves uvicorn's ``http`` at "auto" (httptools when installed, else h11): both names mean ours.
    for name in ("auto", "h11"):
        uvicorn.config.HTTP_PROTOCOLS[name] = f"{__name__}:GuardedH11Protocol"


def connection_counts() -> dict[str, int]:
    """What the guard did so far in this worker, and its limits."""
    return {"header_timeout_s": GuardedH11Protocol.header_timeout_s,
            "max_connections": GuardedH11Protocol.max_connections,
            "closed_header_deadline": COUNTS["closed_header_deadline"], "closed_over_cap": COUNTS["closed_over_cap"],
            "refused_over_cap": COUNTS["refused_over_cap"]}
