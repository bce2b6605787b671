"""What the load benchmark (serve_load.py) sends: the traffic mixes, and how each kind of request is made.

A ``Probe`` is one kind of request: what it is, what a correct server answers it with, and how to send it.
The three traffics of serve_load.py are lists of probes that the clients go through in turn:

- model-size: one synthetic photo at the model input size.
- mixed: photos of realistic sizes (``MIXED_SIZES``), letterboxed or tiled by the server.
- hostile: good images of sizes around the model input, bad images and bad requests (``hostile_probes``),
  clients that drop mid-upload; serve_load.py adds clients that upload one byte at a time.

Image sizes are width x height, as photos are named (a 2048x1024 street frame); the model input is height x
width, as /info reports it (a 512x1024 Cityscapes model).
"""

from __future__ import annotations

import io
import math
import select
import socket
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import requests
from PIL import Image

from agmm_deploy.transforms import sliding_window_tiles

# What a correct server answers, per probe:
GOOD = "good"      # a valid image it must segment: 200
BAD = "bad"        # an image or request it must refuse: any 4xx
ODD = "odd"        # valid but unusual (a 300-character file name): 200 or a 4xx, never a 5xx
CLIENT = "client"  # the client misbehaves (drops the connection, trickles bytes): the server may answer or not

# Outcomes that are not an HTTP status.
TIMEOUT = "timeout"        # no answer within the client's timeout
CONN_ERROR = "conn error"  # the connection failed or was closed without an answer
DROPPED = "dropped"        # the client closed the connection mid-upload, as it meant to
HELD = "held"              # a slow upload the server was still holding when the run ended

Status = int | str  # an HTTP status, or one of the outcomes above


@dataclass(frozen=True)
class SizeClass:
    """Photos of one size in a traffic mix; ``weight`` of them per round of the mix."""

    name: str
    width: int
    height: int
    weight: int = 1

    @property
    def label(self) -> str:
        return f"{self.name} {self.width}x{self.height}"


# A realistic mix: phone photos, street frames (Cityscapes 2048x1024 on a 512x1024 model), thumbnails and
# larger photos. Images larger than the model input along either axis are cut into sliding-window tiles.
MIXED_SIZES = (
    SizeClass("small", 320, 240, 2),
    SizeClass("photo", 640, 480, 4),
    SizeClass("street", 2048, 1024, 1),
    SizeClass("large", 1600, 1200, 1),
)


def parse_mix(text: str) -> tuple[SizeClass, ...]:
    """'small=320x240*2,street=2048x1024' -> size classes (width x height, optional *weight)."""
    classes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            name, size = item.split("=")
            size, _, weight = size.partition("*")
            width, height = (int(v) for v in size.lower().split("x"))
            classes.append(SizeClass(name, width, height, int(weight or 1)))
        except ValueError:
            raise ValueError(f"cannot read {item!r} in --mix {text!r}; expected name=WIDTHxHEIGHT or "
                             "name=WIDTHxHEIGHT*weight, comma-separated (e.g. photo=640x480*4,street=2048x1024)")
    if not classes or min(c.width for c in classes) < 1 or min(c.height for c in classes) < 1 \
            or min(c.weight for c in classes) < 1:
        raise ValueError(f"--mix {text!r} names no usable size class; sizes and weights must be >= 1")
    return tuple(classes)


def tile_count(width: int, height: int, input_hw: tuple[int, int]) -> int:
    """Model inputs the server runs for one image: 1 if it fits the input (letterbox), else its sliding windows."""
    th, tw = input_hw
    return 1 if height <= th and width <= tw else len(sliding_window_tiles(height, width, (th, tw)))


def synthetic_photo(width: int, height: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A smooth photo-like image (gradients and rectangles), encoded as JPEG (or PNG)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    rgb = np.stack([np.sin(6 * x) * 0.5 + 0.5, np.cos(4 * y) * 0.5 + 0.5, x * y], axis=-1) * 255
    rng = np.random.default_rng(seed)
    for _ in range(12):
        x0, y0 = rng.integers(0, [max(1, width - width // 4), max(1, height - height // 4)])
        rgb[y0:y0 + max(1, height // 5), x0:x0 + max(1, width // 4)] = rng.integers(0, 256, 3)
    return _encode(rgb.astype(np.uint8), fmt)


def _encode(rgb: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class Probe:
    """One kind of request.

    Attributes:
        kind: what is sent, for the tables (e.g. "photo 640x480", "truncated png").
        expect: GOOD | BAD | ODD | CLIENT: what a correct server answers.
        send: (base url, session, timeout s) -> (status, batch size the server reports or 0).
        image: the uploaded bytes of a good image (the raw runner segments the same pixels), else None.
    """

    kind: str
    expect: str
    send: Callable[[str, requests.Session, float], tuple[Status, int]]
    image: bytes | None = None


def upload_probe(kind: str, expect: str, data: bytes, filename: str = "image.jpg", field: str = "image",
                 keep_image: bool = False) -> Probe:
    """A multipart upload of ``data`` as file field ``field`` to /segment."""
    def send(url: str, session: requests.Session, timeout: float) -> tuple[Status, int]:
        return post(session, f"{url}/segment", timeout, files={field: (filename, data, "application/octet-stream")})

    return Probe(kind, expect, send, data if keep_image else None)


def body_probe(kind: str, expect: str, body: bytes, content_type: str) -> Probe:
    """A POST to /segment with exactly this body and Content-Type (hand-built multipart, empty bodies)."""
    def send(url: str, session: requests.Session, timeout: float) -> tuple[Status, int]:
        return post(session, f"{url}/segment", timeout, data=body, headers={"Content-Type": content_type})

    return Probe(kind, expect, send)


def image_probes(sizes: tuple[SizeClass, ...]) -> list[Probe]:
    """Good uploads, one synthetic photo per size class, each repeated ``weight`` times, interleaved."""
    probes = [upload_probe(size.label, GOOD, synthetic_photo(size.width, size.height, seed=i), keep_image=True)
              for i, size in enumerate(sizes)]
    return interleave([[probe] * size.weight for probe, size in zip(probes, sizes)])


def interleave(groups: list[list[Probe]]) -> list[Probe]:
    """Round-robin over the groups until all are used: [[a, a], [b], [c, c]] -> [a, b, c, a, c]."""
    out = []
    for i in range(max(map(len, groups))):
        out += [group[i] for group in groups if i < len(group)]
    return out


def post(session: requests.Session, url: str, timeout: float, **kwargs) -> tuple[Status, int]:
    """(status, batch size from X-AGMM-Batch-Size), or TIMEOUT / CONN_ERROR when no answer came."""
    try:
        response = session.post(url, timeout=timeout, **kwargs)
    except requests.Timeout:
        return TIMEOUT, 0
    except requests.RequestException:
        return CONN_ERROR, 0
    return response.status_code, int(response.headers.get("x-agmm-batch-size", 0) or 0)


def hostile_probes(input_hw: tuple[int, int], info: dict, tile_limit: tuple[str, int] | None,
                   over_limit_tiles: int = 257) -> tuple[list[Probe], list[str]]:
    """The hostile mix: good images of sizes around the model input, and one of each bad input (issue 15).

    Args:
        input_hw: the model input (H, W).
        info: the server's /info (``max_pixels`` read if present).
        tile_limit: (the /info key, the largest tile count per image the server accepts), or None when it
            reports none; then images of ``over_limit_tiles`` tiles or more count as bad (a server should refuse
            that much work).
        over_limit_tiles: the tile count of the over-limit probe when there is no reported limit.
    Returns:
        The probes, good and bad interleaved; notes on how the tile-dependent probes were classified.
    """
    th, tw = input_hw
    limit = tile_limit[1] if tile_limit else over_limit_tiles - 1
    limit_text = f"{limit} (/info {tile_limit[0]})" if tile_limit else f"{limit} (assumed: none in /info)"
    notes = []

    def by_tiles(kind: str, width: int, height: int) -> str:
        """GOOD when the image is within the tile limit, else BAD; the kind names its tile count."""
        tiles = tile_count(width, height, input_hw)
        return f"{kind} ({tiles} tile{'s' if tiles > 1 else ''})", GOOD if tiles <= limit else BAD

    good = []
    for i, (name, width, height) in enumerate([("small", max(1, tw // 2), max(1, th // 2)),
                                               ("model-size", tw, th), ("large", 2 * tw, 2 * th)]):
        kind, expect = by_tiles(f"{name} {width}x{height}", width, height)
        good.append(upload_probe(kind, expect, synthetic_photo(width, height, seed=10 + i), keep_image=True))

    photo = synthetic_photo(max(16, tw // 2), max(16, th // 2), seed=20)
    png = synthetic_photo(max(16, tw // 2), max(16, th // 2), seed=21, fmt="PNG")
    rng = np.random.default_rng(22)
    bad = [
        upload_probe("corrupt bytes", BAD, rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes()),
        upload_probe("truncated png", BAD, png[:len(png) // 2], "image.png"),
        upload_probe("truncated jpeg", BAD, photo[:len(photo) // 2]),
        upload_probe("decompression bomb header", BAD, png_claiming(30_000, 30_000), "bomb.png"),
        upload_probe("wrong field name", BAD, photo, field="file"),
        body_probe("text instead of file", BAD, *multipart([('name="image"', b"", b"just some text")])),
        # A text field with filename= in another header: the guard must not take it for an upload (BentoML
        # would treat the text as a URL to download). Port 9 on localhost: nothing is fetched from anywhere.
        body_probe("text field, filename= elsewhere", BAD, *multipart(
            [('name="image"', b'X-Note: filename="x.png"\r\n', b"http://127.0.0.1:9/x.png")])),
        body_probe("empty body", BAD, b"", "multipart/form-data; boundary=nothing"),
        upload_probe("300-char file name", ODD, photo, "x" * 296 + ".jpg"),
        dropped_upload_probe(photo),
    ]
    strip_kind, strip_expect = by_tiles("strip 100000x1", 100_000, 1)
    bad.append(upload_probe(strip_kind, strip_expect, strip_png(100_000, 1), "strip.png"))
    notes.append(f"tile limit: {limit_text}; images with more tiles count as bad")

    # An ordinary photo that is simply too much work: just over the limit, as square as the tiles allow, and
    # within the server's pixel limit (else it would be refused as a bomb, which tests something else).
    rows = cols = math.ceil(math.sqrt(limit + 1))
    height, width = th + (rows - 1) * math.ceil(th / 3), tw + (cols - 1) * math.ceil(tw / 3)
    max_pixels = int(info.get("max_pixels") or 0)
    if max_pixels and width * height > max_pixels:
        notes.append(f"no over-limit photo: {width}x{height} for {limit + 1} tiles is over the server's "
                     f"max_pixels {max_pixels}")
    else:
        kind, expect = by_tiles(f"over tile limit {width}x{height}", width, height)
        bad.append(upload_probe(kind, expect, synthetic_photo(width, height, seed=23)))
    return interleave([good * 3, bad]), notes


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height (what a decompression bomb looks like)."""
    png = bytearray(_encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    png[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature(8) + length(4) + type(4)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def strip_png(width: int, height: int) -> bytes:
    """A real width x height grey PNG (a 100000x1 strip is a few hundred bytes)."""
    return _encode(np.full((height, width, 3), 128, np.uint8), "PNG")


def multipart(parts: list[tuple[str, bytes, bytes]], boundary: str = "agmmboundary") -> tuple[bytes, str]:
    """A hand-built multipart/form-data body: per part (Content-Disposition params, extra header lines, content).

    Returns:
        (body, Content-Type header value).
    """
    body = b""
    for disposition, extra_headers, content in parts:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n".encode() + extra_headers
                 + b"\r\n" + content + b"\r\n")
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# ------------------------------------------------------------------------ clients below the HTTP library


def upload_request(url: str, data: bytes, filename: str = "image.jpg") -> tuple[str, int, bytes]:
    """(host, port, the bytes of a complete POST /segment uploading ``data``) for a raw socket."""
    host, port = url.removeprefix("http://").split(":")
    body, content_type = multipart([(f'name="image"; filename="{filename}"',
                                     b"Content-Type: application/octet-stream\r\n", data)])
    head = (f"POST /segment HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return host, int(port), head + body


def dropped_upload_probe(data: bytes) -> Probe:
    """Sends the headers and half of an upload's body, then closes the connection."""
    def send(url: str, session: requests.Session, timeout: float) -> tuple[Status, int]:
        host, port, request = upload_request(url, data)
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                sock.sendall(request[:len(request) - len(data) // 2])
        except OSError:
            return CONN_ERROR, 0
        return DROPPED, 0

    return Probe("dropped mid-upload", CLIENT, send)


def slow_upload(url: str, data: bytes, interval: float, stop: threading.Event) -> Status:
    """Uploads ``data`` one byte per ``interval`` seconds (a slowloris) until the server answers or closes.

    Returns:
        The status the server answered with; CONN_ERROR if it closed the connection without one; HELD if it
        was still reading when ``stop`` was set (then the connection is closed here).
    """
    host, port, request = upload_request(url, data)
    try:
        with socket.create_connection((host, port), timeout=30) as sock:
            head_end = request.index(b"\r\n\r\n") + 4
            sock.sendall(request[:head_end])
            for i in range(head_end, len(request) + 1):
                readable, _, _ = select.select([sock], [], [], interval)
                if readable:  # the server answered (or closed) before the body was complete
                    return _status_line(sock)
                if stop.is_set():
                    return HELD
                if i < len(request):
                    sock.sendall(request[i:i + 1])
            return _status_line(sock)
    except OSError:
        return CONN_ERROR


def _status_line(sock: socket.socket) -> Status:
    """The status of the response arriving on ``sock`` (b'HTTP/1.1 408 ...'), CONN_ERROR if none comes."""
    sock.settimeout(30)
    try:
        head = sock.recv(64)
    except OSError:
        return CONN_ERROR
    fields = head.split(b" ", 2)
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else CONN_ERROR
