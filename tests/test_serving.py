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


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """Base URL of `bentoml serve` started in the project root (bentofile.yaml names the service)."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = _serve_env(tmp, AGMM_MODEL=str(tiny_model), AGMM_MAX_PIXELS=str(MAX_PIXELS),
                     AGMM_MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES), AGMM_MAX_LATENCY_MS="20000")
    try:
        process = start_server(port, tmp / "serve.log", env, timeout_s=120)
    except RuntimeError as err:
        pytest.fail(str(err))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)


def _post_image(url: str, data: bytes, route: str = "segment", filename: str = "x.png", **kwargs):
    return requests.post(f"{url}/{route}", files={"image": (filename, data)}, timeout=60, **kwargs)


def _mask(response: requests.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def test_info_reports_model_and_backend(server):
    info = requests.post(f"{server}/info", timeout=30).json()
    assert info["backend"] == ("onnxruntime-cuda" if torch.cuda.is_available() else "onnxruntime-cpu")
    assert info["precision"] == "fp32"
    assert info["input_size"] == [SIZE, SIZE]
    assert len(info["classes"]) == NUM_CLASSES == len(info["palette"])
    assert info["max_pixels"] == MAX_PIXELS and info["max_upload_bytes"] == MAX_UPLOAD_BYTES


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

    runner = load_runner(tiny_model, device="cpu")
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
    buckets = {le: float(v) for le, v in re.findall(
        r'adaptive_batch_size_bucket\{le="([^"]+)",method_name="segment_batch"[^}]*\} (\S+)', metrics)}
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


def test_bentoml_build_works_offline(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag", "."], cwd=ROOT,
                            env=_serve_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (bento,) = (tmp_path / "bentoml" / "bentos" / "agmm_segmenter").glob("*/bento.yaml")
    src = bento.parent / "src"
    assert (src / "serving" / "service.py").is_file() and (src / "agmm_deploy" / "runtime" / "ort.py").is_file()
    assert not (src / "tests").exists()
    requirements = (bento.parent / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime-gpu" in requirements and "bentoml" in requirements
    assert "nvidia/cuda" in (bento.parent / "env" / "docker" / "Dockerfile").read_text()
