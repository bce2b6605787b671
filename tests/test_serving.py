"""serving/service.py through a real `bentoml serve` process on 127.0.0.1 with a tiny exported model.

One server per module (ResNet-18 DeepLabV3+ exported at 64x64): every endpoint's output, adaptive batching
under concurrent requests, and every kind of bad input (4xx JSON, server still healthy afterwards).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from agmm_deploy.export.onnx import export_onnx
from agmm_deploy.contract import ModelMeta
from agmm_deploy.model import ModelConfig, build_model
from serving.launch import free_port, serve_command, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
NUM_CLASSES = 21  # pascal
MAX_PIXELS = 1_000_000
MAX_UPLOAD_BYTES = 300_000
MAX_INPUTS = 64  # 150x230 on the 64x64 model is 45 tiles
READ_TIMEOUT_S = 4


def _serve_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGMM_")}
    env.update(BENTOML_DO_NOT_TRACK="True", BENTOML_HOME=str(tmp / "bentoml"), **extra)
    return env


def _encode(array: np.ndarray, fmt: str, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height (what a decompression bomb looks like)."""
    png = bytearray(_encode(_rgb(8, 8), "PNG"))
    png[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature(8)+length(4)+type(4)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig.pascal(backbone="resnet18", stem="torchvision", output_stride=16))
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export_onnx(model, ModelMeta.for_dataset("pascal", (SIZE, SIZE)), path, height=SIZE, width=SIZE)
    return path


def _start(tiny_model: Path, tmp: Path, **settings: str) -> tuple[subprocess.Popen, str]:
    """`bentoml serve` of the tiny model with the test limits; (process, base URL)."""
    env = _serve_env(tmp, AGMM_MODEL=str(tiny_model), AGMM_MAX_PIXELS=str(MAX_PIXELS),
                     AGMM_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES), AGMM_MAX_INPUTS=str(MAX_INPUTS),
                     AGMM_READ_TIMEOUT_S=str(READ_TIMEOUT_S), **settings)
    port = free_port()
    try:
        return start_server(port, tmp / "serve.log", env, timeout_s=180), f"http://127.0.0.1:{port}"
    except RuntimeError as err:
        pytest.fail(str(err))


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """(base URL, log file) of `bentoml serve` started in the project root (bentofile.yaml names the service)."""
    tmp = tmp_path_factory.mktemp("serve")
    process, url = _start(tiny_model, tmp, AGMM_MAX_LATENCY_MS="60000")
    try:
        yield url, tmp / "serve.log"
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def served_closed(tiny_model, tmp_path_factory):
    """(base URL, log file) of a server whose API documents are closed (AGMM_API_DOCS=0)."""
    tmp = tmp_path_factory.mktemp("serve-closed")
    process, url = _start(tiny_model, tmp, AGMM_API_DOCS="0")
    try:
        yield url, tmp / "serve.log"
    finally:
        stop_server(process)


def _post_image(url: str, data: bytes, route: str = "segment", filename: str = "x.png", **kwargs):
    return requests.post(f"{url}/{route}", files={"image": (filename, data)}, timeout=60, **kwargs)


def _mask(response: requests.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def test_info_reports_model_and_backend(server, tiny_model):
    from agmm_deploy.runtime import load_runner

    info = requests.post(f"{server}/info", timeout=30).json()
    runner = load_runner(tiny_model)  # what this machine runs the model with (device auto, as the server)
    assert (info["backend"], info["device"]) == (runner.backend, str(runner.device))
    assert info["precision"] == "fp32"
    assert info["input_size"] == [SIZE, SIZE]
    assert len(info["classes"]) == NUM_CLASSES == len(info["palette"])
    assert info["max_pixels"] == MAX_PIXELS and info["max_upload_bytes"] == MAX_UPLOAD_BYTES
    assert info["max_inputs"] == MAX_INPUTS and info["read_timeout_s"] == READ_TIMEOUT_S
    assert info["max_batch_size"] >= 1 and info["max_latency_ms"] == 60000 and info["max_batch_images"] >= 1


def test_info_answers_get_as_post(server):
    """A read is a GET (a browser, `curl URL/info`); BentoML routes endpoints for POST only, the door maps it."""
    got = requests.get(f"{server}/info", timeout=30)
    assert got.status_code == 200, got.text
    assert got.json() == requests.post(f"{server}/info", timeout=30).json()
    assert requests.put(f"{server}/info", timeout=30).status_code == 405  # other methods stay refused


def _inputs_run(url: str) -> float:
    """The server's count of model inputs run so far: the sum of its agmm_batch_inputs histogram on /metrics."""
    found = re.search(r"^agmm_batch_inputs_sum(?:\{[^}]*\})? (\S+)$", requests.get(f"{url}/metrics", timeout=30).text,
                      flags=re.MULTILINE)
    assert found, "/metrics has no agmm_batch_inputs histogram"
    return float(found.group(1))


def test_batch_inputs_metric_counts_every_input_before_the_answer_goes_out(server):
    """Read right after each answer, agmm_batch_inputs has counted exactly that image's model inputs (a tiled
    150x230 photo is 45 inputs on the 64x64 model, a 64x64 one is 1): a batch is counted before its answers
    leave, so a load test reading /metrics after its last answer misses nothing."""
    from agmm_deploy.inference import input_count

    for h, w in ((150, 230), (SIZE, SIZE), (150, 230)):
        before = _inputs_run(server)
        _mask(_post_image(server, _encode(_rgb(h, w, seed=3), "PNG")))
        assert _inputs_run(server) - before == input_count(h, w, (SIZE, SIZE))


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return _encode(_rgb(20, 40, seed=5), "JPEG", exif=exif.tobytes())


@pytest.mark.parametrize("name,data,size", [
    ("rgb jpeg", _encode(_rgb(100, 150, seed=1), "JPEG"), (150, 100)),
    ("rgba png", np.dstack([_rgb(37, 53, seed=2), np.full((37, 53), 128, np.uint8)]), (53, 37)),
    ("gray 16-bit png", np.arange(45 * 70, dtype=np.uint16).reshape(45, 70) * 20, (70, 45)),
    ("webp", _encode(_rgb(64, 200, seed=3), "WEBP"), (200, 64)),
    ("tiff", _encode(_rgb(300, 90, seed=4), "TIFF"), (90, 300)),
    ("exif-rotated jpeg", _exif_rotated_jpeg(), (20, 40)),
])
def test_segment_returns_palette_mask_at_original_size(server, name, data, size):
    if isinstance(data, np.ndarray):
        data = _encode(data, "PNG")
    mask = _mask(_post_image(server, data))
    assert mask.mode == "P", name
    assert mask.size == size, f"{name}: mask {mask.size}, image {size}"
    labels = np.asarray(mask)
    assert labels.max() < NUM_CLASSES, name
    palette = mask.getpalette()[:6]
    assert palette == [0, 0, 0, 128, 0, 0]  # VOC background, aeroplane


def test_served_mask_equals_agmm_predict(server, tiny_model):
    """Small images are letterboxed and large ones tiled at full resolution, exactly as agmm-predict does."""
    from agmm_deploy.inference import segment_image
    from agmm_deploy.runtime import load_runner

    runner = load_runner(tiny_model)  # on the device the server uses (auto), as agmm-predict would run there
    for h, w in [(40, 50), (150, 230)]:  # fits the 64x64 input / larger than it on both axes
        rgb = _rgb(h, w, seed=h)
        served = np.asarray(_mask(_post_image(server, _encode(rgb, "PNG"))))
        local = segment_image(runner, rgb)
        assert served.shape == (h, w)
        assert (served == local).mean() > 0.999, f"{h}x{w}: served and agmm-predict masks differ"


def test_segment_json_fractions_match_mask(server):
    data = _encode(_rgb(90, 120, seed=7), "PNG")
    body = _post_image(server, data, route="segment_json").json()
    assert body["height"] == 90 and body["width"] == 120
    assert len(body["classes"]) == NUM_CLASSES
    fractions = np.array([body["fractions"][c] for c in body["classes"]])
    assert fractions.sum() == pytest.approx(1.0, abs=1e-9)
    labels = np.asarray(_mask(_post_image(server, data)))
    expected = np.bincount(labels.ravel(), minlength=NUM_CLASSES) / labels.size
    np.testing.assert_allclose(fractions, expected, atol=1e-12)


def test_overlay_blends_image_and_class_colours(server):
    rgb = _rgb(50, 80, seed=8)
    data = _encode(rgb, "PNG")
    plain = requests.post(f"{server}/overlay", files={"image": ("x.png", data)}, data={"alpha": "0"}, timeout=60)
    assert np.array_equal(np.asarray(_mask(plain).convert("RGB")), rgb)  # alpha 0: the image itself
    coloured = np.asarray(_mask(requests.post(f"{server}/overlay", files={"image": ("x.png", data)},
                                              data={"alpha": "1"}, timeout=60)))
    colours = np.asarray(_mask(_post_image(server, data)).convert("RGB"))
    assert coloured.shape == (50, 80, 3)
    assert np.array_equal(coloured, colours)  # alpha 1: the palette colours of the mask


def test_concurrent_requests_are_batched(server):
    data = _encode(_rgb(64, 64, seed=9), "PNG")

    def one(_):
        response = _post_image(server, data)
        return response.status_code, int(response.headers.get("x-agmm-batch-size", 0))

    results = []
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for _ in range(3):
            results += list(pool.map(one, range(16)))
    assert all(status == 200 for status, _ in results), results
    assert max(size for _, size in results) > 1, results

    metrics = requests.get(f"{server}/metrics", timeout=30).text
    buckets = {le: float(v) for le, v in re.findall(r'agmm_batch_inputs_bucket\{le="([^"]+)"[^}]*\} (\S+)', metrics)}
    assert buckets["+Inf"] - buckets["1.0"] > 0, f"no batch larger than 1 in /metrics: {buckets}"


def test_segment_batch_keeps_good_images_when_one_is_bad(server):
    good = base64.b64encode(_encode(_rgb(30, 40, seed=10), "PNG")).decode()
    response = requests.post(f"{server}/segment_batch", json={"images": [good, "not base64!"]}, timeout=60)
    assert response.status_code == 200, response.text
    first, second = response.json()
    assert (first["height"], first["width"], first["error"]) == (30, 40, None)
    assert "base64" in second["error"]


def _chunked(data: bytes):
    for i in range(0, len(data), 64 * 1024):
        yield data[i:i + 64 * 1024]


BAD_INPUTS = {
    "empty body": (dict(), 415, "multipart/form-data"),
    "form-urlencoded body": (dict(data={"image": "x.png"}), 415, "multipart/form-data"),
    "url instead of a file": (dict(files={"image": (None, "http://127.0.0.1:1/x.png")}), 400, "file upload"),
    "two images": (dict(files=[("image", ("a.png", _encode(_rgb(8, 8), "PNG"))),
                               ("image", ("b.png", _encode(_rgb(8, 8), "PNG")))]), 400, "one file upload"),
    "empty file": (dict(files={"image": ("x.png", b"")}), 400, "empty"),
    "not an image": (dict(files={"image": ("x.png", b"hello, this is text" * 20)}), 400, "could not be decoded"),
    "truncated png": (dict(files={"image": ("x.png", _encode(_rgb(200, 200), "PNG")[:5000])}), 400, "truncated"),
    "decompression bomb": (dict(files={"image": ("x.png", _png_claiming(30_000, 30_000))}), 400, "bomb"),
    "over pixel limit": (dict(files={"image": ("x.png", _png_claiming(1100, 1000))}), 400, "limit is 1000000"),
    "over byte limit": (dict(files={"image": ("x.png", os.urandom(400_000))}), 413, "limit"),
    "just over byte limit": (dict(files={"image": ("x.png", os.urandom(MAX_UPLOAD_BYTES + 1))}), 413, "limit"),
    "over byte limit, chunked": (dict(data=_chunked(os.urandom(400_000)),
                                      headers={"Content-Type": "multipart/form-data; boundary=x"}), 413, "limit"),
    "wrong field name": (dict(files={"file": ("x.png", _encode(_rgb(20, 20), "PNG"))}), 400, "'image'"),
    "unknown extra field": (dict(files={"image": ("x.png", _encode(_rgb(8, 8), "PNG")), "extra": ("y", b"\x89")}),
                            400, "'image'"),
    "alpha out of range": (dict(route="overlay", files={"image": ("x.png", _encode(_rgb(8, 8), "PNG"))},
                                data={"alpha": "2"}), 400, "alpha='2' is not a number in [0, 1]"),
    "alpha sent as a file": (dict(route="overlay", files={"image": ("x.png", _encode(_rgb(8, 8), "PNG")),
                                                          "alpha": ("a.txt", b"0.5")}), 400, "alpha (file)"),
    "multipart to segment_batch": (dict(route="segment_batch", files={"image": ("x.png", b"x")}), 415, "JSON"),
    "wrong json to segment_batch": (dict(route="segment_batch", json={"images": "x"}), 400, "images"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_4xx_json_and_server_stays_healthy(server, case):
    kwargs, status, text = BAD_INPUTS[case]
    kwargs = dict(kwargs)
    route = kwargs.pop("route", "segment")
    response = requests.post(f"{server}/{route}", timeout=60, **kwargs)
    assert response.status_code == status, f"{case}: {response.status_code} {response.text[:300]}"
    assert "error" in response.json() and text in response.text, f"{case}: {response.text[:300]}"
    assert requests.get(f"{server}/readyz", timeout=10).status_code == 200
    assert requests.get(f"{server}/livez", timeout=10).status_code == 200
    assert _mask(_post_image(server, _encode(_rgb(16, 24), "PNG"))).size == (24, 16)


# ---------------------------------------------------------------- issue 15: hostile input and overload, item by item

def _still_serving(url: str) -> None:
    """A good request is answered with its mask afterwards (the requests timeout bounds "in normal time")."""
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
    assert _mask(_post_image(url, _encode(_rgb(16, 24), "PNG"))).size == (24, 16)


def _refused(response: requests.Response, status: int, *sentence: str) -> None:
    assert response.status_code == status, f"{response.status_code} {response.text[:300]}"
    message = response.json()["error"]
    assert all(part in message for part in sentence), message


def _multipart(*parts: bytes, boundary: bytes = b"agmm") -> tuple[bytes, dict[str, str]]:
    """A hand-written multipart/form-data body from raw parts (headers + blank line + data)."""
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts) + b"--" + boundary + b"--\r\n"
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}


def test_item1_thin_images_are_priced_and_refused_before_any_work(server):
    """376-byte 1x100000 and 8 KB 1x900000 PNGs: 413 naming the input limit, at once, never a 504/503."""
    for width in (100_000, 900_000):
        _refused(_post_image(server, _encode(np.zeros((1, width, 3), np.uint8), "PNG")), 413,
                 f"1 pixels", "sliding-window tiles", f"the limit is {MAX_INPUTS} model inputs", "AGMM_MAX_INPUTS")
    _still_serving(server)


def test_item2_every_image_has_a_cost_limit_and_a_burst_of_costly_ones_leaves_no_trace(server):
    """A photo of 100s of tiles is refused with 413; a burst of images at the limit is served, and afterwards a
    lone small request is served as before (the batcher prices inputs, not requests)."""
    info = requests.post(f"{server}/info", timeout=30).json()
    photo = _encode(np.full((768, 1024, 3), 90, np.uint8), "JPEG")
    _refused(_post_image(server, photo), 413, "1024x768", f"the limit is {info['max_inputs']} model inputs per image")
    costly = _encode(_rgb(150, 230, seed=1), "PNG")  # 45 tiles, under the limit of 64
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _post_image(server, costly), range(8)))
    for response in responses:  # served, or (on a machine too slow for the deadline) refused with the sentence
        if response.status_code != 200:
            _refused(response, 503, "the server is busy")
    assert any(response.status_code == 200 for response in responses)
    _still_serving(server)


def test_item3_bad_images_are_refused_at_the_door_while_good_work_is_queued(server):
    good = _encode(_rgb(150, 230, seed=2), "PNG")
    bad = b"hello, this is text" * 20

    def one(i):
        response = _post_image(server, bad if i % 2 else good)
        return i % 2, response.status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    assert {status for is_bad, status in results if is_bad} == {400}, results
    assert {status for is_bad, status in results if not is_bad} == {200}, results
    _still_serving(server)


def test_item4_text_in_the_file_field_never_reaches_a_url_download(server):
    """`filename="` in another header of the part, and a URL as the text: 400, and the URL is never fetched."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.png"
        body, headers = _multipart(b'Content-Disposition: form-data; name="image"\r\nX-Note: filename="x.png"'
                                   b"\r\n\r\n" + url.encode())
        _refused(requests.post(f"{server}/segment", data=body, headers=headers, timeout=60), 400,
                 "expected one file upload in a multipart field named 'image'", "image (text)")
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    _still_serving(server)


def test_item5_odd_but_valid_requests_are_served_and_over_limit_batches_named(server):
    png = _encode(_rgb(20, 30), "PNG")
    assert _mask(_post_image(server, png, filename="x" * 300 + ".png")).size == (30, 20)  # too long for a path
    body, headers = _multipart(b"Content-Disposition: form-data; name=image; filename=x.png\r\n"  # RFC 7578: token
                               b"Content-Type: image/png\r\n\r\n" + png)
    assert _mask(requests.post(f"{server}/segment", data=body, headers=headers, timeout=60)).size == (30, 20)
    info = requests.post(f"{server}/info", files={"image": ("x.png", png)}, timeout=30)  # a body /info ignores
    assert info.status_code == 200 and info.json()["input_size"] == [SIZE, SIZE]
    limit = info.json()["max_batch_images"]
    images = [base64.b64encode(_encode(_rgb(8, 8, seed=i), "PNG")).decode() for i in range(limit + 1)]
    _refused(requests.post(f"{server}/segment_batch", json={"images": images}, timeout=60), 413,
             f"got {limit + 1} images; the limit is {limit} per request", "AGMM_MAX_BATCH_IMAGES")
    answered = requests.post(f"{server}/segment_batch", json={"images": images[:limit]}, timeout=60)
    assert answered.status_code == 200 and len(answered.json()) == limit
    _still_serving(server)


def test_item6_slow_uploads_are_dropped_with_408(server):
    """1 byte per 0.5 s: answered 408 once AGMM_READ_TIMEOUT_S has passed, and the connection closed."""
    import socket
    import time
    from urllib.parse import urlsplit

    body, headers = _multipart(b'Content-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
                               + _encode(_rgb(20, 30), "PNG"))
    host, port = urlsplit(server).hostname, urlsplit(server).port
    head = (f"POST /segment HTTP/1.1\r\nHost: {host}\r\nContent-Type: {headers['Content-Type']}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(head)
        answer = b""
        for byte in body:  # stops as soon as the server has answered
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(0.5)
            try:
                answer = sock.recv(65536)
            except socket.timeout:
                continue
            finally:
                sock.settimeout(60)
            break
        while answer and (chunk := sock.recv(65536)):  # the server closes the connection after its answer
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"408", answer[:300]
    assert f"did not arrive within {READ_TIMEOUT_S} s (AGMM_READ_TIMEOUT_S)".encode() in answer
    _still_serving(server)


def test_item6_a_client_leaving_mid_upload_leaves_no_request_behind(tiny_model, tmp_path):
    """A client that sends half of its body and closes: its request ends at once (one 499 line in the log), and
    `bentoml serve` stops promptly on SIGTERM. It used to hold the request task for BentoML's whole traffic timeout
    (90 s), which the server waited for before it stopped."""
    import signal
    import socket
    import time
    from urllib.parse import urlsplit

    process, url = _start(tiny_model, tmp_path)
    try:
        image = _encode(_rgb(20, 30), "PNG")
        body, headers = _multipart(b'Content-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
                                   + image)
        host, port = urlsplit(url).hostname, urlsplit(url).port
        head = (f"POST /segment HTTP/1.1\r\nHost: {host}\r\nContent-Type: {headers['Content-Type']}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(head + body[:len(body) // 2])
        _still_serving(url)
    except BaseException:
        stop_server(process)
        raise
    start = time.perf_counter()
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        stop_server(process)  # SIGKILL for what is left
        pytest.fail("bentoml serve did not stop within 15 s of SIGTERM after a client left mid-upload")
    assert time.perf_counter() - start < 15
    text = (tmp_path / "serve.log").read_text(errors="replace")
    assert "/segment refused with 499: the client closed the connection after" in text


def test_item7_user_errors_are_one_log_line_without_upload_content_and_the_api_document_is_closed(served_closed):
    url, log = served_closed
    assert requests.get(f"{url}/docs.json", timeout=10).status_code == 404
    _refused(requests.get(f"{url}/", timeout=10), 404, "/segment")
    for path in ("/docs", "/schema.json", "/docs/static/swagger-ui.css"):  # closed with it: every document
        _refused(requests.get(f"{url}{path}", timeout=10), 404, "AGMM_API_DOCS=0", "/segment_batch (JSON)")
    marker = b"careless-user-upload-" + os.urandom(4).hex().encode()
    _refused(_post_image(url, marker * 10, filename="secret-name.png"), 400, "could not be decoded")
    _still_serving(url)
    text = log.read_text(errors="replace")
    assert "refused with 400: the image could not be decoded" in text
    assert marker.decode() not in text and "secret-name" not in text
    assert "Traceback" not in text, text[text.index("Traceback") - 500:][:3000]


def test_overload_is_a_503_with_a_sentence_and_retry_after(tiny_model, tmp_path):
    """Work that would wait past the deadline is refused with 503 + Retry-After (never BentoML's bare 500/503),
    and a lone request is served normally once the burst is over."""
    process, url = _start(tiny_model, tmp_path, AGMM_MAX_LATENCY_MS="20", AGMM_MAX_BATCH_SIZE="4")
    try:
        costly = _encode(_rgb(150, 230, seed=3), "PNG")  # 45 inputs: 24 of them are seconds of work in all
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(lambda _: _post_image(url, costly), range(24)))
        assert {r.status_code for r in responses} <= {200, 503}, [r.text for r in responses]
        busy = [r for r in responses if r.status_code == 503]
        assert busy, "24 concurrent requests of 45 inputs each should not fit a 20 ms wait"
        for response in busy:
            _refused(response, 503, "the server is busy", "AGMM_MAX_LATENCY_MS")
            assert int(response.headers["Retry-After"]) >= 1
        _still_serving(url)
    finally:
        stop_server(process)


def test_refuses_to_start_without_a_model(tmp_path):
    result = subprocess.run(
        serve_command(free_port()),
        cwd=ROOT, env=_serve_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("No model to serve: set AGMM_MODEL="), result.stderr


def test_model_from_the_bentoml_store(tiny_model, tmp_path):
    script = (
        "import shutil, sys, bentoml\n"
        "with bentoml.models.create('agmm-tiny') as m:\n"
        "    shutil.copy(sys.argv[1], m.path_of('model.onnx'))\n"
        "from serving.service import resolve_model_path\n"
        "print(resolve_model_path())\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tiny_model)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=_serve_env(tmp_path, AGMM_BENTO_MODEL="agmm-tiny:latest"))
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.name == "model.onnx" and str(tmp_path / "bentoml" / "models") in str(path)


def test_bentoml_build_makes_a_bento_that_bentoml_serve_serves(tiny_model, tmp_path):
    """Offline (lock_packages: false, no uv needed), then `bentoml serve <tag>` from outside the checkout."""
    env = _serve_env(tmp_path)
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag", "."], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (bento,) = (tmp_path / "bentoml" / "bentos" / "agmm_segmenter").glob("*/bento.yaml")
    src = bento.parent / "src"
    assert (src / "serving" / "service.py").is_file() and (src / "agmm_deploy" / "runtime" / "ort.py").is_file()
    assert not (src / "tests").exists()
    requirements = (bento.parent / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime-gpu" in requirements and "bentoml" in requirements
    assert "nvidia/cuda" in (bento.parent / "env" / "docker" / "Dockerfile").read_text()

    tag = f"agmm_segmenter:{bento.parent.name}"
    port = free_port()
    (tmp_path / "run").mkdir()
    # Without the checkout on PYTHONPATH: the Bento's own src/ holds the service and the library.
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    process = start_server(port, tmp_path / "run" / "serve.log", {**env, "AGMM_MODEL": str(tiny_model)}, bento=tag)
    try:
        url = f"http://127.0.0.1:{port}"
        assert _mask(_post_image(url, _encode(_rgb(40, 50), "PNG"))).size == (50, 40)
    finally:
        stop_server(process)


# ---------------------------------------------------------------- issue 10: which artifact a model folder serves

@pytest.fixture(scope="module")
def model_folder(tiny_model, tmp_path_factory) -> Path:
    """An export folder as agmm-export leaves it: model.onnx, model.int8.onnx (ONNX Runtime), model.int8.xml + .bin
    (OpenVINO, where installed), parity.json, and an artifact that missed its gates (model.bad.onnx.failed)."""
    import importlib.util
    import shutil

    from agmm_deploy.export.parity import generated_images, set_aside
    from agmm_deploy.export.precision import convert_precision
    from agmm_deploy.transforms import normalize

    folder = tmp_path_factory.mktemp("export")
    shutil.copy(tiny_model, folder / "model.onnx")
    meta = ModelMeta.for_dataset("pascal", (SIZE, SIZE))
    calib = normalize(generated_images(meta, 2, (SIZE, SIZE)), meta.mean, meta.std)
    convert_precision(folder / "model.onnx", folder / "model.int8.onnx", "int8", calib, runtime="onnxruntime")
    if importlib.util.find_spec("openvino") and importlib.util.find_spec("nncf"):
        convert_precision(folder / "model.onnx", folder / "model.int8.xml", "int8", calib, runtime="openvino")
    shutil.copy(folder / "model.int8.onnx", folder / "model.bad.onnx")
    set_aside([folder / "model.bad.onnx"])
    (folder / "parity.json").write_text('{"passed": false}\n')
    return folder


def _choose(monkeypatch, **env: str):
    from serving.service import choose_model

    for name in ("AGMM_MODEL", "AGMM_BENTO_MODEL", "AGMM_PRECISION", "AGMM_MODEL_FILE", "AGMM_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return choose_model()


def test_a_model_folder_serves_its_fp32_artifact_unless_told_otherwise(model_folder, monkeypatch):
    has_openvino = (model_folder / "model.int8.xml").is_file()
    choice = _choose(monkeypatch, AGMM_MODEL=str(model_folder))
    assert (choice.path.name, choice.chosen_by, choice.folder) == ("model.onnx", "the default (fp32)", model_folder)
    # The others, each with the setting that serves it: the first int8 by precision, the second by its name.
    int8_onnx = "model.int8.onnx (int8, onnxruntime, cpu) -> " + (
        "AGMM_MODEL_FILE=model.int8.onnx" if has_openvino else "AGMM_PRECISION=int8")
    assert int8_onnx in choice.others
    assert "model.bad.onnx.failed (missed its parity gates; never served)" in choice.others
    if has_openvino:
        assert "model.int8.xml (int8, openvino, cpu) -> AGMM_PRECISION=int8" in choice.others

    int8 = _choose(monkeypatch, AGMM_MODEL=str(model_folder), AGMM_PRECISION="int8")
    assert int8.path.name == ("model.int8.xml" if has_openvino else "model.int8.onnx")
    assert int8.chosen_by == "AGMM_PRECISION=int8"
    assert "model.onnx (fp32, onnxruntime, any) -> no setting (the default)" in int8.others
    named = _choose(monkeypatch, AGMM_MODEL=str(model_folder), AGMM_MODEL_FILE="model.int8.onnx", AGMM_PRECISION="int8")
    assert (named.path.name, named.chosen_by) == ("model.int8.onnx", "AGMM_MODEL_FILE=model.int8.onnx")
    alone = _choose(monkeypatch, AGMM_MODEL=str(model_folder / "model.int8.onnx"), AGMM_PRECISION="int8")
    assert (alone.path.name, alone.chosen_by, alone.folder) == ("model.int8.onnx", "AGMM_MODEL", None)


@pytest.mark.parametrize("env,error,sentence", [
    ({"AGMM_PRECISION": "fp16"}, FileNotFoundError, "AGMM_PRECISION=fp16, but it holds no fp16 artifact in "),
    ({"AGMM_MODEL_FILE": "model.bad.onnx.failed"}, FileNotFoundError,
     "AGMM_MODEL_FILE=model.bad.onnx.failed is not a servable file of {folder} (it missed its parity gates)"),
    ({"AGMM_MODEL_FILE": "model.int8.onnx", "AGMM_PRECISION": "fp32"}, ValueError,
     "AGMM_MODEL_FILE=model.int8.onnx is int8, not AGMM_PRECISION=fp32; unset one of them"),
    ({"AGMM_MODEL_FILE": "model.int8.onnx", "AGMM_MODEL": "{folder}/model.onnx"}, ValueError,
     "AGMM_MODEL_FILE=model.int8.onnx picks a file within a model folder, but AGMM_MODEL={folder}/model.onnx"),
    ({"AGMM_PRECISION": "fp32", "AGMM_MODEL": "{folder}/model.int8.onnx"}, ValueError,
     "AGMM_MODEL={folder}/model.int8.onnx is int8, not AGMM_PRECISION=fp32"),
])
def test_a_choice_the_folder_cannot_meet_is_refused_with_its_choices(model_folder, monkeypatch, env, error, sentence):
    env = {"AGMM_MODEL": str(model_folder), **{k: v.format(folder=model_folder) for k, v in env.items()}}
    with pytest.raises(error) as raised:
        _choose(monkeypatch, **env)
    message = str(raised.value)
    assert sentence.format(folder=model_folder) in message, message
    if env["AGMM_MODEL"] == str(model_folder):
        assert "model.int8.onnx (int8, onnxruntime, cpu) -> AGMM_" in message  # the choices, listed


def test_a_folder_without_fp32_is_never_served_at_another_precision_unasked(model_folder, tmp_path, monkeypatch):
    import shutil

    shutil.copy(model_folder / "model.int8.onnx", tmp_path / "model.int8.onnx")
    with pytest.raises(FileNotFoundError, match=r"no AGMM_PRECISION \(the default is fp32\), but it holds no fp32 "
                                                r"artifact in .*model.int8.onnx \(int8, onnxruntime, cpu\) -> "
                                                r"AGMM_PRECISION=int8"):
        _choose(monkeypatch, AGMM_MODEL=str(tmp_path))
    assert _choose(monkeypatch, AGMM_MODEL=str(tmp_path), AGMM_PRECISION="int8").path.name == "model.int8.onnx"


def test_saving_something_that_is_no_export_folder_exits_2_with_a_sentence(model_folder, tmp_path, capsys):
    from serving.artifacts import main

    assert main([str(model_folder / "model.onnx"), "--name", "x"]) == 2
    assert "model.onnx is not a folder; expected the agmm-export --out folder" in capsys.readouterr().err
    assert main([str(tmp_path), "--name", "x"]) == 2  # empty: refused before the store is touched
    assert f"{tmp_path} holds no artifact to serve" in capsys.readouterr().err


def test_bentoml_serve_refuses_to_start_on_a_choice_the_folder_cannot_meet(model_folder, tmp_path):
    result = subprocess.run(serve_command(free_port()), cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=_serve_env(tmp_path, AGMM_MODEL=str(model_folder), AGMM_PRECISION="fp16"))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"AGMM_PRECISION=fp16, but it holds no fp16 artifact in {model_folder}; it holds: "
                           "model.onnx (fp32, onnxruntime, any) -> no setting (the default); "), result.stderr[-2000:]


def test_an_export_folder_goes_into_the_store_with_every_precision_and_serves_the_one_asked(model_folder, tmp_path):
    """python -m serving.artifacts copies the artifacts, their companions and parity.json (not the .failed file);
    `bentoml serve` of the entry runs the int8 model asked for, says so on /info and lists the others in its log."""
    from serving.launch import serving

    result = subprocess.run([sys.executable, "-m", "serving.artifacts", str(model_folder), "--name", "agmm-tiny"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=_serve_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "AGMM_BENTO_MODEL=agmm-tiny:" in result.stdout and "AGMM_PRECISION=int8" in result.stdout
    (entry,) = (tmp_path / "bentoml" / "models" / "agmm-tiny").glob("*/model.yaml")
    expected = sorted(p.name for p in model_folder.iterdir() if not p.name.endswith(".failed"))
    assert sorted(p.name for p in entry.parent.iterdir() if p.name != "model.yaml") == expected
    has_openvino = "model.int8.bin" in expected

    with serving(None, tmp_path, timeout_s=120, AGMM_BENTO_MODEL="agmm-tiny:latest", AGMM_PRECISION="int8") as url:
        info = requests.get(f"{url}/info", timeout=30).json()
        assert (info["precision"], info["chosen_by"]) == ("int8", "AGMM_PRECISION=int8")
        assert info["model"] == ("model.int8.xml" if has_openvino else "model.int8.onnx")
        assert info["backend"] == ("openvino-cpu" if has_openvino else "onnxruntime-cpu") and info["device"] == "cpu"
        assert any(line.startswith("model.onnx (fp32, onnxruntime, any) -> ") for line in info["other_artifacts"])
        assert _mask(_post_image(url, _encode(_rgb(40, 50), "PNG"))).size == (50, 40)
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "(chosen by AGMM_PRECISION=int8)" in log
    assert "other artifacts in" in log and "model.onnx (fp32, onnxruntime, any) -> no setting (the default)" in log


# ---------------------------------------------------------------- issue 20: the OpenAPI document and Swagger UI

def _document(url: str) -> dict:
    response = requests.get(f"{url}/docs.json", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    return response.json()


def test_the_openapi_document_validates_and_holds_every_route_the_door_accepts(server):
    from openapi_spec_validator import validate

    from serving.api import ROUTES

    document = _document(server)
    validate(document)
    assert document["info"]["title"] == "agmm_segmenter"
    for route in ROUTES:
        assert set(document["paths"][route.path]) == {m.lower() for m in route.methods}, route.path
        for method in route.methods:
            responses = document["paths"][route.path][method.lower()]["responses"]
            assert {"200", *map(str, route.refusals)} == set(responses), route.path
    overlay = document["paths"]["/overlay"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert overlay["required"] == ["image"] and overlay["properties"]["image"]["format"] == "binary"
    assert overlay["properties"]["alpha"]["maximum"] == 1
    assert "BentoML" not in str(document["paths"].get("/segment"))  # ours, not BentoML's generated view
    error = document["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert document["paths"]["/segment"]["post"]["responses"]["413"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"}


def _example(schema: dict, components: dict, image: bytes):
    """A value that meets ``schema`` (required properties only), for a request built from the document."""
    if "$ref" in schema:
        return _example(components[schema["$ref"].rsplit("/", 1)[1]], components, image)
    if schema.get("type") == "object":
        return {name: _example(schema["properties"][name], components, image) for name in schema.get("required", [])}
    if schema.get("type") == "array":
        return [_example(schema["items"], components, image)]
    if schema.get("format") == "byte":
        return base64.b64encode(image).decode()
    if schema.get("format") == "binary":
        return image
    return schema.get("default", 0.5)


def test_a_request_built_from_the_document_succeeds_for_every_operation(server):
    """Each operation of /docs.json: its path, method, content type and required fields, nothing else known."""
    document = _document(server)
    components = document["components"]["schemas"]
    image = _encode(_rgb(30, 40, seed=11), "PNG")
    for path, operations in document["paths"].items():
        if path.startswith("/label-studio/"):
            continue  # Label Studio's bodies, served against a stand-in Label Studio in test_label_studio_backend
        for method, operation in operations.items():
            kwargs = {}
            if "requestBody" in operation:
                ((content_type, media),) = operation["requestBody"]["content"].items()
                body = _example(media["schema"], components, image)
                if content_type == "multipart/form-data":
                    kwargs["files"] = {name: ("x.png", value) if isinstance(value, bytes) else (None, str(value))
                                       for name, value in body.items()}
                else:
                    assert content_type == "application/json"
                    kwargs["json"] = body
            response = requests.request(method.upper(), f"{server}{path}", timeout=60, **kwargs)
            assert response.status_code == 200, f"{method} {path}: {response.status_code} {response.text[:300]}"
            expected = next(iter(operation["responses"]["200"]["content"]))
            assert response.headers["content-type"].split(";")[0] == expected, f"{method} {path}"


def test_swagger_ui_at_docs_loads_only_local_assets(server):
    page = requests.get(f"{server}/docs", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    references = re.findall(r'(?:src|href|url)\s*[:=]\s*"([^"]+)"', page.text)
    assert references and not re.search(r"https?://|//cdn", page.text), page.text
    for reference in references:
        assert reference.startswith("/"), reference  # served by this server
        loaded = requests.get(f"{server}{reference}", timeout=30)
        assert loaded.status_code == 200 and loaded.content, reference
    assert requests.get(f"{server}/docs/static/../settings.py", timeout=30).status_code == 404
    assert requests.get(f"{server}/", timeout=30, allow_redirects=False).headers["location"] == "/docs"


# ---------------------------------------------------------------- issue 20: bentofile.yaml follows pyproject.toml

# pyproject dependencies the service never imports: export, training, bulk prediction and reporting tools.
NOT_SERVED = {"onnxscript", "onnxslim", "tqdm", "tensorboard", "matplotlib", "pyarrow"}


def test_bentofile_packages_agree_with_pyproject():
    """Every package the Bento installs is a dependency (or extra) of pyproject.toml with the same specifier, or
    an exact pin inside its range; every dependency the service imports is in the Bento; the artifacts a served
    folder may hold (model.int8.xml) have their runtime there."""
    import tomllib

    import yaml
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {}
    for text in project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]:
        requirement = Requirement(text)
        declared.setdefault(requirement.name, requirement)
    bento = {Requirement(t).name: Requirement(t) for t in yaml.safe_load((ROOT / "bentofile.yaml").read_text())[
        "python"]["packages"]}
    for name, requirement in bento.items():
        assert name in declared, f"bentofile.yaml installs {name}, which pyproject.toml does not declare"
        pins = [s.version for s in requirement.specifier if s.operator == "=="]
        if pins:
            assert declared[name].specifier.contains(pins[0]), f"{requirement} is outside pyproject's {declared[name]}"
        else:
            assert requirement.specifier == declared[name].specifier, f"bentofile {requirement}, pyproject " \
                                                                      f"{declared[name]}"
    dependencies = {Requirement(t).name for t in project["dependencies"]}
    assert dependencies - NOT_SERVED - set(bento) == set(), "pyproject dependencies missing from bentofile.yaml"
    assert "openvino" in bento  # runs model.int8.xml, the default int8 artifact of an export folder


# ---------------------------------------------------------------- issue 20: the settings, read once

@pytest.mark.parametrize("variable,value,expected", [
    ("AGMM_MAX_INPUTS", "many", "a whole number >= 1"),
    ("AGMM_MAX_PIXELS", "0", "a whole number >= 1"),
    ("AGMM_READ_TIMEOUT_S", "-3", "a number of seconds > 0"),
    ("AGMM_DEVICE", "tpu", "auto | cpu | cuda"),
    ("AGMM_API_DOCS", "maybe", "1 or 0"),
])
def test_a_bad_setting_is_refused_naming_the_variable_and_what_it_takes(variable, value, expected):
    from serving.settings import SettingsError, read_settings

    with pytest.raises(SettingsError) as raised:
        read_settings({variable: value})
    assert str(raised.value).startswith(f"{variable}={value!r} cannot be used: it takes {expected}")


def test_settings_are_one_frozen_object_with_a_row_per_variable():
    import dataclasses

    from serving.settings import SETTINGS_TABLE, ServeSettings, read_settings

    settings = read_settings({"AGMM_MAX_INPUTS": "7", "AGMM_API_DOCS": "0", "AGMM_MAX_LATENCY_MS": "250"})
    assert (settings.max_inputs, settings.api_docs, settings.max_latency_ms, settings.max_batch_size) == (
        7, False, 250, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.max_inputs = 8
    variables = [row[0] for row in SETTINGS_TABLE]
    assert len(variables) == len(set(variables)) == len(dataclasses.fields(ServeSettings))
    assert set(settings.by_variable()) == set(variables)
    # Every AGMM_* variable serving/ mentions is a row of the table, but the Label Studio backend's AGMM_LS_*,
    # which LabelStudioSettings.from_env reads (and /info reports under "training").
    text = "".join(p.read_text() for p in (ROOT / "serving").glob("*.py"))
    mentioned = set(re.findall(r"\bAGMM_[A-Z0-9_]+[A-Z0-9]", text))
    backend = {name for name in mentioned if name.startswith("AGMM_LS_")}
    assert mentioned - backend <= set(variables), mentioned - backend - set(variables)
    from_env = (ROOT / "serving" / "label_studio.py").read_text().split("def from_env", 1)[1].split("def describe")[0]
    assert all(name in from_env for name in backend), backend


def test_info_reports_every_setting_and_the_log_holds_them(served):
    url, log = served
    info = requests.get(f"{url}/info", timeout=30).json()
    assert info["settings"]["AGMM_MAX_INPUTS"] == MAX_INPUTS and info["settings"]["AGMM_MAX_LATENCY_MS"] == 60000
    assert info["settings"]["AGMM_API_DOCS"] is True
    assert f"AGMM_MAX_INPUTS={MAX_INPUTS}" in log.read_text(errors="replace")


def test_bentoml_serve_refuses_a_bad_setting_with_its_sentence(tiny_model, tmp_path):
    result = subprocess.run(serve_command(free_port()), cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=_serve_env(tmp_path, AGMM_MODEL=str(tiny_model), AGMM_MAX_UPLOAD_BYTES="20MB"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(
        "AGMM_MAX_UPLOAD_BYTES='20MB' cannot be used: it takes a whole number >= 1"), result.stderr[-2000:]


# ---------------------------------------------------------------- issue 21: headers, connections, admission

HEADER_TIMEOUT_S = 2
MAX_CONNECTIONS = 100
GUARD_LATENCY_MS = 150


@pytest.fixture(scope="module")
def guarded(tiny_model, tmp_path_factory):
    """A server with a short header deadline, a small connection cap and a short wait: what a hostile or busy
    client meets, at sizes a test can reach."""
    tmp = tmp_path_factory.mktemp("serve-guarded")
    process, url = _start(tiny_model, tmp, AGMM_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
                          AGMM_MAX_CONNECTIONS=str(MAX_CONNECTIONS), AGMM_MAX_LATENCY_MS=str(GUARD_LATENCY_MS))
    try:
        yield url
    finally:
        stop_server(process)


def _closed(sock, wait_s: float) -> bool:
    """Whether the server has closed ``sock`` (EOF, after any answer) within ``wait_s``."""
    import socket
    import time

    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except socket.timeout:
            return False
        except OSError:  # reset
            return True
    return False


def test_silent_and_trickling_header_connections_are_closed_within_the_deadline_while_good_work_is_served(guarded):
    """200 connections (the cap is 100): half send nothing, half a header byte every 0.5 s. Each is closed within
    the header deadline (408 for those that sent part of a request); a good request is served meanwhile."""
    import socket
    import threading
    import time
    from urllib.parse import urlsplit

    host, port = urlsplit(guarded).hostname, urlsplit(guarded).port
    start = time.monotonic()
    silent = [socket.create_connection((host, port), timeout=10) for _ in range(100)]
    trickling = [socket.create_connection((host, port), timeout=10) for _ in range(100)]
    header = b"POST /segment HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    stop = threading.Event()

    def trickle():
        for byte in header:
            for sock in trickling:
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    pass
            if stop.wait(0.5):
                return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        _still_serving(guarded)  # a good request beside them
        assert all(_closed(sock, HEADER_TIMEOUT_S + 3 - (time.monotonic() - start)) for sock in silent + trickling)
        assert time.monotonic() - start < HEADER_TIMEOUT_S + 3
    finally:
        stop.set()
        thread.join()
        for sock in silent + trickling:
            sock.close()
    guard = requests.get(f"{guarded}/info", timeout=30).json()["connections"]
    assert guard["header_timeout_s"] == HEADER_TIMEOUT_S and guard["max_connections"] == MAX_CONNECTIONS
    assert guard["closed_header_deadline"] + guard["closed_over_cap"] >= 200, guard
    _still_serving(guarded)


def test_a_trickled_request_gets_a_408_sentence_when_its_header_deadline_passes(guarded):
    import socket
    from urllib.parse import urlsplit

    with socket.create_connection((urlsplit(guarded).hostname, urlsplit(guarded).port), timeout=10) as sock:
        sock.sendall(b"GET /info HTTP/1.1\r\nHost: x\r\n")  # never the blank line that ends the headers
        sock.settimeout(HEADER_TIMEOUT_S + 3)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert f"headers did not arrive within {HEADER_TIMEOUT_S} s (AGMM_HEADER_TIMEOUT_S)".encode() in answer


def test_after_a_413_for_its_content_length_the_server_stops_reading(server):
    """Content-Length 1e15: answered 413 at once and the connection closed, not read on to its end."""
    import socket
    from urllib.parse import urlsplit

    with socket.create_connection((urlsplit(server).hostname, urlsplit(server).port), timeout=10) as sock:
        sock.sendall(b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: 1000000000000000\r\n\r\n" + b"x" * 65536)
        sock.settimeout(10)
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        sent = 0
        with pytest.raises(OSError):  # the server closed its end: sending fails long before 1e15 bytes
            while sent < 1 << 30:
                sent += sock.send(b"x" * (1 << 20))
    assert sent < 256 << 20, f"the server read {sent} bytes after its 413"
    _still_serving(server)


def test_json_nested_2000_deep_is_a_400_at_once(server):
    import time

    start = time.perf_counter()
    response = requests.post(f"{server}/segment_batch", data=b'{"images": ' + b"[" * 2000 + b"]" * 2000 + b"}",
                             headers={"Content-Type": "application/json"}, timeout=60)
    _refused(response, 400, "the JSON body nests deeper than", '{"images": [')
    assert time.perf_counter() - start < 5
    _still_serving(server)


def test_a_batch_of_two_32_input_images_is_served_on_an_idle_server(guarded):
    """Each image alone is within every limit; the request's own images never count against each other."""
    from agmm_deploy.inference import input_count

    assert input_count(65, 373, (SIZE, SIZE)) == 32
    images = [base64.b64encode(_encode(_rgb(65, 373, seed=i), "PNG")).decode() for i in range(2)]
    for _ in range(3):
        response = requests.post(f"{guarded}/segment_batch", json={"images": images}, timeout=120)
        assert response.status_code == 200, response.text[:300]
        assert [(r["height"], r["width"], r["error"]) for r in response.json()] == [(65, 373, None)] * 2


def test_cheap_requests_keep_flowing_beside_a_client_sending_32_input_images_back_to_back(guarded):
    """Two clients send 32-input images back to back; a 64x64 client beside them gets >= 90 % served."""
    import threading
    import time

    costly, cheap = _encode(_rgb(65, 373, seed=1), "PNG"), _encode(_rgb(SIZE, SIZE, seed=2), "PNG")
    stop = threading.Event()
    costly_statuses: list[int] = []

    def hog():
        while not stop.is_set():
            costly_statuses.append(_post_image(guarded, costly).status_code)

    hogs = [threading.Thread(target=hog, daemon=True) for _ in range(2)]
    for thread in hogs:
        thread.start()
    try:
        time.sleep(1)
        statuses = []
        for _ in range(20):
            statuses.append(_post_image(guarded, cheap).status_code)
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in hogs:
            thread.join()
    assert statuses.count(200) >= 18, statuses
    assert 200 in costly_statuses and set(costly_statuses) <= {200, 503}
    admission = requests.get(f"{guarded}/info", timeout=30).json()["admission"]
    assert "round-robin" in admission["turns"] and "never count against it" in admission["own_images"]


# ---------------------------------------------------------------- issue 21 item 1: priced before decoding

def _scan_bomb(scans: int, size: int = 2896) -> bytes:
    """A size x size progressive JPEG whose smallest refinement scan is repeated until it has ``scans`` scans."""
    image = Image.new("RGB", (size, size), (120, 130, 140))
    data = _encode(np.asarray(image), "JPEG", progressive=True, quality=80)
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    bounds = list(zip(starts, starts[1:] + [len(data) - 2]))
    first, end = min(bounds[1:], key=lambda b: b[1] - b[0])  # the smallest scan after the first
    return data[:end] + data[first:end] * (scans - len(starts)) + data[end:]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _ico_hiding_png(side: int = 9000) -> bytes:
    """An ICO whose directory says 256x256 but whose entry is the header of a side x side PNG."""
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
           + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + _png_chunk(b"IEND", b""))
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22)  # 0 = 256 in an ICO directory
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def _worker_rss_mib(process: subprocess.Popen) -> float:
    """The resident memory of the server's worker (the process that decodes), from /proc/<pid>/status."""
    import psutil

    workers = [p for p in psutil.Process(process.pid).children(recursive=True)
               if "_bentoml_impl.worker" in " ".join(p.cmdline())]
    assert len(workers) == 1, [p.cmdline() for p in workers]
    status = Path(f"/proc/{workers[0].pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, flags=re.MULTILINE).group(1)) / 1024


@pytest.fixture(scope="module")
def priced(tiny_model, tmp_path_factory):
    """(process, URL) of a server with the default pixel limits (8 Mpx an image, the derived request budget) and
    room for many tiles, so that big images reach the pricing of their decoding rather than the input limit."""
    tmp = tmp_path_factory.mktemp("serve-priced")
    env = _serve_env(tmp, AGMM_MODEL=str(tiny_model), AGMM_MAX_INPUTS="100000")
    port = free_port()
    process = start_server(port, tmp / "serve.log", env, timeout_s=180)
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)


def test_a_batch_of_16_bit_pngs_over_the_request_budget_is_refused_before_decoding(priced):
    """16 copies of a 19 KB 16-bit 4096x2048 PNG: each within the per-image limits, 134 Mpx and 268 MB of samples
    together; 413 with the budget's sentence at once, the worker's RSS where it was (it decoded none)."""
    import time

    process, url = priced
    info = requests.get(f"{url}/info", timeout=30).json()
    png = _encode(np.zeros((2048, 4096), np.uint16), "PNG")
    body = {"images": [base64.b64encode(png).decode()] * 16}
    _mask(_post_image(url, _encode(_rgb(16, 24), "PNG")))  # warm
    before = _worker_rss_mib(process)
    started = time.perf_counter()
    response = requests.post(f"{url}/segment_batch", json=body, timeout=60)
    elapsed = time.perf_counter() - started
    _refused(response, 413, "this segment_batch request holds 16 image(s) of 134217728 pixels and 268435456 decoded "
             f"bytes together; the budget is {info['max_request_pixels']} pixels", "16-bit",
             "AGMM_MAX_REQUEST_PIXELS")
    after = _worker_rss_mib(process)
    print(f"16 x 16-bit 4096x2048 refused in {elapsed:.2f} s; worker RSS {before:.0f} -> {after:.0f} MiB")
    assert elapsed < 5 and after - before < 200
    assert (info["max_request_pixels"], info["max_decoded_bytes"]) == (4 * 8 * 1024 * 1024, 16 * 8 * 1024 * 1024)


@pytest.mark.parametrize("name, data, sentence", [
    ("progressive jpeg of 10,000 scans", lambda: _scan_bomb(10_000), "scans"),
    ("ico hiding a 9000x9000 png", lambda: _ico_hiding_png(), "says 256x256 but holds a 9000x9000"),
])
def test_decoding_bombs_are_refused_from_their_headers(priced, name, data, sentence):
    import time

    process, url = priced
    data = data()
    before = _worker_rss_mib(process)
    started = time.perf_counter()
    for route in ("segment", "segment_json", "overlay"):
        _refused(_post_image(url, data, route=route), 400, sentence)
    batch = requests.post(f"{url}/segment_batch", json={"images": [base64.b64encode(data).decode()]}, timeout=60)
    assert batch.status_code == 200 and sentence in batch.json()[0]["error"], batch.text[:300]
    elapsed = time.perf_counter() - started
    print(f"{name} refused 4 times in {elapsed:.2f} s")
    assert elapsed < 8 and _worker_rss_mib(process) - before < 200
    _still_serving(url)


def test_good_images_are_served_as_before_beside_the_budget(priced):
    """Within the budget: a 16-image batch of mixed sizes and an EXIF-rotated JPEG priced on its upright size."""
    _, url = priced
    images = [_encode(_rgb(30 + i, 40 + 2 * i, seed=i), "PNG") for i in range(16)]
    results = requests.post(f"{url}/segment_batch", json={"images": [base64.b64encode(i).decode() for i in images]},
                            timeout=120).json()
    assert [(r["height"], r["width"], r["error"]) for r in results] == [(30 + i, 40 + 2 * i, None) for i in range(16)]
    assert _mask(_post_image(url, _exif_rotated_jpeg())).size == (20, 40)
