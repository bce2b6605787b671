"""serving/label_studio.py, the ML backend, under a real uvicorn on 127.0.0.1 with a real tiny ONNX runner behind
``segment``, answering the request bodies a real Label Studio 1.23.2 sent (tests/data/label_studio_backend,
captured by capture.py there). A stand-in Label Studio (a thread) serves the task images and the project export
and records every request, as does a server "outside" that nothing may reach. Brush RLE is decoded by a decoder
written here from the format's description, not the one in agmm_deploy.
"""

from __future__ import annotations

import concurrent.futures
import copy
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
import torch
from PIL import Image

from agmm_deploy.contract import ModelMeta
from agmm_deploy.export.onnx import export_onnx
from agmm_deploy.inference import segment_images
from agmm_deploy.labels.annotations import LabelsError
from agmm_deploy.labels.label_studio import image_name
from agmm_deploy.labels.label_studio_api import ImageSources, image_source, match_labels, read_label_control
from agmm_deploy.labels.rasterize import polygon_pixels
from agmm_deploy.model import ModelConfig, build_model
from agmm_deploy.runtime import load_runner
from agmm_deploy.transforms import decode_image
from serving.label_studio import brush_results
from serving.launch import free_port, start_server, stop_server

from label_studio_stand_in import API_KEY, PROJECT, Recorder, label_studio_answer

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "label_studio_backend"
CLASSES = ("background", "disk", "box")
POLYGON_CONFIG = """<View><Image name="img" value="$image"/><PolygonLabels name="outline" toName="img">
<Label value="box"/><Label value="disk"/><Label value="background"/></PolygonLabels></View>"""


def captured(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def decode_rle(rle: list[int], width: int, height: int) -> np.ndarray:
    """Label Studio's brush RLE, from its description: a big-endian bit stream; a 32-bit count of values, a 5-bit
    word size - 1, four 4-bit run-length field widths - 1; then blocks of [1 bit: repeat?][2 bits: which width]
    [that many bits: run - 1][one word repeated, or run words]. The values are RGBA bytes; alpha is the mask."""
    bits = "".join(f"{byte:08b}" for byte in rle)
    pos = 0

    def take(n: int) -> int:
        nonlocal pos
        pos += n
        return int(bits[pos - n:pos], 2)

    count, word = take(32), take(5) + 1
    widths = [take(4) + 1 for _ in range(4)]
    assert count == width * height * 4, (count, width, height)
    values: list[int] = []
    while len(values) < count:
        repeat, field = take(1), widths[take(2)]
        run = take(field) + 1
        values += [take(word)] * run if repeat else [take(word) for _ in range(run)]
    return np.array(values[:count]).reshape(height, width, 4)[:, :, 3] > 0


# ---- servers ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def label_studio():
    server = Recorder(label_studio_answer)
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def outside():
    server = Recorder(lambda path, auth: (200, (DATA / "images" / "scene0.png").read_bytes()))
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(1)  # a seed whose random model predicts two classes on these images
    model = build_model(ModelConfig.for_dataset("folder", backbone="resnet18", stem="torchvision", output_stride=16,
                                                num_classes=len(CLASSES)))
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export_onnx(model, ModelMeta.for_dataset("folder", (64, 64), classes=CLASSES), path, height=64, width=64)
    return path


def start_backend(model: Path, tmp: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """tests/label_studio_backend_app.py under uvicorn on a free port; (process, base URL)."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AGMM_", "LABEL_STUDIO_"))}
    environ.update(AGMM_MODEL=str(model), AGMM_MODEL_VERSION="tiny-0", AGMM_LS_TRAIN_OUT=str(tmp / "rounds"),
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **env)
    log = open(tmp / "backend.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "label_studio_backend_app:create_app",
                                "--host", "127.0.0.1", "--port", str(port)], env=environ, cwd=tmp, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        if process.poll() is not None:
            raise RuntimeError(f"the backend exited: {(tmp / 'backend.log').read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.25)
    process.kill()
    raise RuntimeError("the backend did not start within 60 s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def backend(tiny_model, label_studio, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("backend")
    process, url = start_backend(tiny_model, tmp, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=API_KEY,
                                 AGMM_LS_MAX_TASKS="4", AGMM_LS_BATCH_TASKS="2")
    yield url
    stop(process)


def refused(response: requests.Response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    for word in words:
        assert word in error, (word, error)
    return error


# ---- protocol, with Label Studio's own request bodies ----------------------------------------------------------

@pytest.mark.parametrize("path", ["/health", "/"])
def test_health_answers_up_with_the_model_within_a_second(backend, path):
    started = time.perf_counter()
    response = requests.get(f"{backend}{path}", timeout=1)
    assert time.perf_counter() - started < 1
    assert response.json() == {"status": "UP", "model_class": "AgmmSegmenter", "model_version": "tiny-0"}


def test_setup_of_the_captured_project_returns_the_model_version_and_never_calls_its_hostname(backend, outside):
    body = captured("setup.json")
    body.update(hostname=outside.url, access_token="not-ours")  # user input: never used
    response = requests.post(f"{backend}/setup", json=body, timeout=3)
    assert response.status_code == 200 and response.json() == {"model_version": "tiny-0"}
    assert outside.requests == []


def test_setup_refuses_labels_the_model_lacks_listing_both_sides(backend):
    body = captured("setup.json")
    body["schema"] = body["schema"].replace('"disk"', '"cat"').replace('"box"', '"dog"')
    error = refused(requests.post(f"{backend}/setup", json=body, timeout=3), 422, "'cat'", "'dog'", str(list(CLASSES)))
    assert "missing" in error


def test_setup_refuses_a_config_without_brush_or_polygon_labels(backend):
    body = {**captured("setup.json"), "schema": '<View><Image name="i" value="$image"/><Choices name="c" '
                                                'toName="i"><Choice value="disk"/></Choices></View>'}
    refused(requests.post(f"{backend}/setup", json=body, timeout=3), 422, "no BrushLabels or PolygonLabels",
            "Choices")


@pytest.fixture(scope="module")
def served_masks(tiny_model):
    """What the runner itself gives for each task of the captured /predict body: task id -> (H, W) uint8."""
    runner = load_runner(tiny_model, device="cpu")
    tasks = captured("predict.json")["tasks"]
    images = [decode_image((DATA / "images" / image_name(t["data"]["image"])).read_bytes()) for t in tasks]
    return {t["id"]: m for t, m in zip(tasks, segment_images(runner, images))}


def test_predict_of_the_captured_request_gives_brush_rle_equal_to_the_segment_mask(backend, label_studio,
                                                                                    served_masks):
    body = captured("predict.json")
    before = len(label_studio.requests)
    response = requests.post(f"{backend}/predict", json=body, timeout=100)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(body["tasks"])
    for task, prediction in zip(body["tasks"], results):
        mask = served_masks[task["id"]]
        assert prediction["model_version"] == "tiny-0"
        assert {r["value"]["brushlabels"][0] for r in prediction["result"]} == {CLASSES[c] for c in np.unique(mask)}
        for result in prediction["result"]:
            assert (result["type"], result["from_name"], result["to_name"]) == ("brushlabels", "label", "image")
            assert (result["original_height"], result["original_width"]) == mask.shape
            decoded = decode_rle(result["value"]["rle"], result["original_width"], result["original_height"])
            assert (decoded == (mask == CLASSES.index(result["value"]["brushlabels"][0]))).all()
    # each task's image fetched once, from Label Studio, with its API key
    fetched = label_studio.requests[before:]
    assert sorted(p for p, _ in fetched) == sorted(t["data"]["image"] for t in body["tasks"])
    assert {a for _, a in fetched} == {f"Token {API_KEY}"}


def filled(mask: np.ndarray) -> np.ndarray:
    """The pixels of a (H, W) bool mask with its holes filled (polygons have none)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(np.zeros(mask.shape, np.uint8), contours, -1, 1, thickness=-1).astype(bool)


def test_predict_into_a_polygon_control_gives_percent_polygons_of_each_region(backend, served_masks):
    body = {**captured("predict.json"), "label_config": POLYGON_CONFIG}
    results = requests.post(f"{backend}/predict", json=body, timeout=100).json()["results"]
    for task, prediction in zip(body["tasks"], results):
        mask = served_masks[task["id"]]
        h, w = mask.shape
        drawn = {name: np.zeros(mask.shape, bool) for name in CLASSES}
        for result in prediction["result"]:
            assert (result["type"], result["from_name"], result["to_name"]) == ("polygonlabels", "outline", "img")
            points = np.array(result["value"]["points"])
            assert points.min() >= 0 and points.max() <= 100
            drawn[result["value"]["polygonlabels"][0]] |= polygon_pixels(points * [w / 100, h / 100], h, w)
        for class_id, name in enumerate(CLASSES):
            assert (drawn[name] == filled(mask == class_id)).all(), name


@pytest.mark.parametrize("url", ["{outside}/scene0.png", "{outside}/data/upload/2/e3f6c607-scene0.png",
                                 "file:///etc/passwd", "{label_studio_other_port}/data/upload/2/x.png"])
def test_a_task_image_outside_label_studio_is_refused_and_nothing_is_fetched(backend, label_studio, outside, url):
    body = copy.deepcopy(captured("predict.json"))
    other_port = label_studio.url.rsplit(":", 1)[0] + f":{free_port()}"
    body["tasks"][1]["data"]["image"] = url.format(outside=outside.url, label_studio_other_port=other_port)
    before, before_outside = len(label_studio.requests), len(outside.requests)
    refused(requests.post(f"{backend}/predict", json=body, timeout=10), 422, f"task {body['tasks'][1]['id']}")
    assert len(label_studio.requests) == before and len(outside.requests) == before_outside  # nothing fetched


def test_health_and_setup_answer_in_time_while_predictions_are_in_flight(backend):
    body = captured("predict.json")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(requests.post, f"{backend}/predict", json=body, timeout=100) for _ in range(3)]
        for _ in range(5):
            t0 = time.perf_counter()
            assert requests.get(f"{backend}/health", timeout=1).ok and time.perf_counter() - t0 < 1
            t0 = time.perf_counter()
            assert requests.post(f"{backend}/setup", json=captured("setup.json"), timeout=3).ok
            assert time.perf_counter() - t0 < 3
        assert all(f.result().status_code == 200 for f in busy)


def test_more_tasks_than_the_limit_are_refused_with_a_sentence(backend):
    body = captured("predict.json")
    body["tasks"] = (body["tasks"] * 2)[:5]
    refused(requests.post(f"{backend}/predict", json=body, timeout=10), 413, "5 tasks", "at most 4", "batch size")


def test_a_wrong_api_key_is_named(tiny_model, label_studio, tmp_path):
    process, url = start_backend(tiny_model, tmp_path, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY="no")
    try:
        refused(requests.post(f"{url}/predict", json=captured("predict.json"), timeout=10), 422, "401",
                "LABEL_STUDIO_API_KEY")
    finally:
        stop(process)


def start_service(model: Path, tmp: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """A real `bentoml serve` of serving/service.py (which mounts the backend at /label-studio); (process, base URL
    of the service)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AGMM_", "LABEL_STUDIO_"))}
    environ.update(AGMM_MODEL=str(model), AGMM_LS_TRAIN_OUT=str(tmp / "rounds"), BENTOML_HOME=str(tmp / "bentoml"),
                   PYTHONPATH=str(ROOT), **env)
    port = free_port()
    return start_server(port, tmp / "serve.log", environ), f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def service(tiny_model, label_studio, tmp_path_factory):
    """The base URL of the real service, Label Studio's backend mounted at /label-studio."""
    tmp = tmp_path_factory.mktemp("service")
    (tmp / "local").mkdir()
    process, url = start_service(tiny_model, tmp, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=API_KEY,
                                 AGMM_LS_LOCAL_FILES_ROOT=str(tmp / "local"))
    _LOCAL_ROOTS[url] = tmp / "local"
    yield url
    stop_server(process)


_LOCAL_ROOTS: dict[str, Path] = {}


def service_files(url: str) -> Path:
    """The local-files root of the service at ``url`` (task images at /data/local-files/?d=NAME)."""
    return _LOCAL_ROOTS[url]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height (a decompression bomb)."""
    png = bytearray(_png(np.zeros((8, 8, 3), np.uint8)))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def test_the_service_answers_health_and_setup_under_label_studio(service):
    version = requests.post(f"{service}/info", json={}, timeout=5).json()["model_version"]
    assert version.startswith("tiny")
    started = time.perf_counter()
    assert requests.get(f"{service}/label-studio/health", timeout=1).json() == {
        "status": "UP", "model_class": "AgmmSegmenter", "model_version": version}
    assert time.perf_counter() - started < 1
    assert requests.post(f"{service}/label-studio/setup", json=captured("setup.json"), timeout=3).json() == {
        "model_version": version}
    body = captured("setup.json")
    body["schema"] = body["schema"].replace('"disk"', '"cat"')
    refused(requests.post(f"{service}/label-studio/setup", json=body, timeout=3), 422, "'cat'")


def test_the_service_predicts_the_captured_tasks_as_its_own_segment_masks(service, label_studio, served_masks):
    """Predicted RLE (decoded here) equals /segment's mask of the same image file, and the runner's own."""
    body = captured("predict.json")
    response = requests.post(f"{service}/label-studio/predict", json=body, timeout=100)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(body["tasks"])
    info = requests.post(f"{service}/info", json={}, timeout=5).json()
    assert info["training"]["state"] == "idle"
    for task, prediction in zip(body["tasks"], results):
        data = (DATA / "images" / image_name(task["data"]["image"])).read_bytes()
        segmented = requests.post(f"{service}/segment", files={"image": ("x.png", data)}, timeout=60)
        assert segmented.status_code == 200, segmented.text
        mask = np.asarray(Image.open(io.BytesIO(segmented.content)))
        assert (mask == served_masks[task["id"]]).all()
        assert prediction["model_version"] == info["model_version"]
        assert {r["value"]["brushlabels"][0] for r in prediction["result"]} == {CLASSES[c] for c in np.unique(mask)}
        for result in prediction["result"]:
            decoded = decode_rle(result["value"]["rle"], mask.shape[1], mask.shape[0])
            assert (decoded == (mask == CLASSES.index(result["value"]["brushlabels"][0]))).all()


@pytest.mark.parametrize("name, image, status, sentence", [
    ("thin.png", lambda: _png(np.zeros((1, 100_000, 3), np.uint8)), 413, "the limit is 32 model inputs per image"),
    ("bomb.png", lambda: _png_claiming(30_000, 30_000), 400, "decompression bomb"),
])
def test_the_service_prices_a_task_image_from_its_header_as_segment_does(service, name, image, status, sentence):
    """A task image over the service's limits is refused with /segment's sentence, priced before decoding."""
    (service_files(service) / name).write_bytes(image())
    body = copy.deepcopy(captured("predict.json"))
    body["tasks"] = body["tasks"][:1]
    body["tasks"][0]["data"]["image"] = f"/data/local-files/?d={name}"
    refused(requests.post(f"{service}/label-studio/predict", json=body, timeout=10), status, sentence)


def test_other_webhook_events_are_acknowledged_without_a_job(backend):
    response = requests.post(f"{backend}/webhook", json=captured("webhook_annotation_created.json"), timeout=3)
    assert response.json() == {"status": "acknowledged", "action": "ANNOTATION_CREATED"}
    assert requests.get(f"{backend}/train", timeout=1).json()["state"] == "idle"


# ---- the rules, without a server -------------------------------------------------------------------------------

def test_the_captured_config_is_read_as_its_brush_control_on_its_image():
    control = read_label_control(captured("setup.json")["schema"])
    assert (control.name, control.to_name, control.kind, control.value_key) == ("label", "image", "brushlabels",
                                                                                 "image")
    assert match_labels(control, CLASSES) == {"disk": 1, "box": 2, "background": 0}


@pytest.mark.parametrize("url, expected", [
    ("/data/upload/4/ab12cd34-img.png", "http://ls:8080/data/upload/4/ab12cd34-img.png"),
    ("http://ls:8080/data/upload/4/a.png", "http://ls:8080/data/upload/4/a.png"),
    ("http://LS:8080/data/local-files/?d=a.png", "http://LS:8080/data/local-files/?d=a.png"),
    ("http://ls:8081/a.png", None), ("https://ls:8080/a.png", None), ("http://ls.evil:8080/a.png", None),
    ("s3://bucket/a.png", None), ("ftp://ls:8080/a.png", None), ("a.png", None)])
def test_image_urls_resolve_only_to_the_label_studio_server(url, expected):
    sources = ImageSources("http://ls:8080")
    if expected is None:
        with pytest.raises(LabelsError, match="LABEL_STUDIO_URL|neither an absolute URL"):
            image_source(url, sources)
    else:
        assert image_source(url, sources).url == expected


def test_local_files_are_read_only_inside_the_root(tmp_path):
    (tmp_path / "photos").mkdir()
    sources = ImageSources(None, tmp_path)
    assert image_source("/data/local-files/?d=photos/a.png", sources).path == tmp_path / "photos" / "a.png"
    for url in ("/data/local-files/?d=../x.png", "/data/local-files/?d=/etc/passwd", "/data/local-files/"):
        with pytest.raises(LabelsError, match="not a file under the local-files root"):
            image_source(url, sources)
    with pytest.raises(LabelsError, match="LABEL_STUDIO_URL is not set"):
        image_source("/data/upload/1/a.png", sources)


def test_brush_results_keep_holes_and_every_class_for_the_independent_decoder():
    rng = np.random.default_rng(0)
    label_map = rng.integers(0, 3, (23, 41)).astype(np.uint8)
    label_map[5:15, 5:30] = 1
    label_map[8:10, 10:20] = 2  # a hole of class 2 inside class 1
    control = read_label_control(captured("setup.json")["schema"])
    results = brush_results(label_map, control, match_labels(control, CLASSES), min_area=1)
    assert len(results) == 3
    for result in results:
        class_id = CLASSES.index(result["value"]["brushlabels"][0])
        assert (decode_rle(result["value"]["rle"], 41, 23) == (label_map == class_id)).all()


# ---- training jobs ---------------------------------------------------------------------------------------------

FAST_TRAINING = ("--backbone resnet18 --stem torchvision --crop-size 64 --batch-size 2 --max-steps 2 --epochs 1 "
                 "--pretrained none --workers 0 --device cpu --log-every 1")


def wait_for_job(url: str, timeout_s: float, while_running=lambda: None) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = requests.get(f"{url}/train", timeout=1).json()
        if status["state"] != "running":
            return status
        while_running()
        time.sleep(0.5)
    raise AssertionError(f"the job still runs after {timeout_s} s")


def start_either(kind: str, model: Path, tmp: Path, **env: str) -> tuple[str, str | None, object]:
    """The backend standalone (under uvicorn) or mounted in the real service; (backend URL, service URL or None,
    a function that stops it)."""
    if kind == "standalone":
        process, url = start_backend(model, tmp, **env)
        return url, None, lambda: stop(process)
    process, url = start_service(model, tmp, **env)
    return f"{url}/label-studio", url, lambda: stop_server(process)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["standalone", "service"])
def test_start_training_runs_one_job_and_the_new_model_serves_after_it_while_requests_keep_succeeding(
        tiny_model, label_studio, tmp_path, kind):
    url, service, stop_it = start_either(kind, tiny_model, tmp_path, LABEL_STUDIO_URL=label_studio.url,
                                         LABEL_STUDIO_API_KEY=API_KEY, AGMM_LS_TRAIN_ARGS=FAST_TRAINING)
    try:
        old = requests.get(f"{url}/health", timeout=1).json()["model_version"]
        started = requests.post(f"{url}/webhook", json=captured("webhook_start_training.json"), timeout=3)
        assert started.status_code == 201 and started.json()["job"]["project"] == PROJECT
        second = requests.post(f"{url}/train", json={"project": f"{PROJECT}.1796171985"}, timeout=3)
        refused(second, 409, f"project {PROJECT} is running", "one job runs at a time")
        versions = []

        def still_serving():
            t0 = time.perf_counter()
            health = requests.get(f"{url}/health", timeout=1)
            assert health.ok and time.perf_counter() - t0 < 1
            predicted = requests.post(f"{url}/predict", json=captured("predict.json"), timeout=100)
            assert predicted.status_code == 200
            versions.append(predicted.json()["results"][0]["model_version"])

        status = wait_for_job(url, 600, still_serving)
        assert status["state"] == "finished", (status, Path(status["log"]).read_text()[-3000:])
        assert versions and versions[0] == old
        new = requests.get(f"{url}/health", timeout=1).json()["model_version"]
        assert new == status["model_version"] and new.startswith(f"project{PROJECT}-")
        predicted = requests.post(f"{url}/predict", json=captured("predict.json"), timeout=100).json()
        assert {r["model_version"] for r in predicted["results"]} == {new}
        log = Path(status["log"]).read_text()
        assert "step" in log and "parity PASSED" in log
        assert any(p.startswith(f"/api/projects/{PROJECT}/export") for p, _ in label_studio.requests)
        if service is not None:  # /info and the log name the new model; /segment serves it too
            info = requests.post(f"{service}/info", json={}, timeout=5).json()
            assert info["model_version"] == new and info["training"]["state"] == "finished"
            assert f"now serving model_version {new}" in (tmp_path / "serve.log").read_text(errors="replace")
    finally:
        stop_it()


@pytest.mark.parametrize("kind", ["standalone", "service"])
def test_every_second_annotation_starts_a_job_and_a_failing_job_leaves_the_old_model_serving(
        tiny_model, label_studio, tmp_path, kind):
    url, service, stop_it = start_either(kind, tiny_model, tmp_path, LABEL_STUDIO_URL=label_studio.url,
                                         LABEL_STUDIO_API_KEY=API_KEY, AGMM_LS_TRAIN_EVERY="2",
                                         AGMM_LS_TRAIN_ARGS="--backbone no-such-net")
    try:
        old = requests.get(f"{url}/health", timeout=1).json()["model_version"]
        annotated = captured("webhook_annotation_created.json")
        assert requests.post(f"{url}/webhook", json=annotated, timeout=3).json()["status"] == "acknowledged"
        assert requests.post(f"{url}/webhook", json=annotated, timeout=3).status_code == 201
        status = wait_for_job(url, 300)
        assert status["state"] == "failed" and "exited with code" in status["reason"]
        assert "--backbone" in Path(status["log"]).read_text()
        assert requests.get(f"{url}/health", timeout=1).json()["model_version"] == old
        assert requests.post(f"{url}/predict", json=captured("predict.json"), timeout=100).status_code == 200
        if service is not None:  # the reason in /info and in the service's log
            info = requests.post(f"{service}/info", json={}, timeout=5).json()
            assert info["model_version"] == old and info["training"]["state"] == "failed"
            assert "exited with code" in info["training"]["reason"]
            assert "failed: the job exited with code" in (tmp_path / "serve.log").read_text(errors="replace")
        # after a failure the next request starts a new job (here the /train of older Label Studio versions)
        assert requests.post(f"{url}/train", json={"project": PROJECT}, timeout=3).status_code == 201
        assert wait_for_job(url, 300)["state"] == "failed"
    finally:
        stop_it()
