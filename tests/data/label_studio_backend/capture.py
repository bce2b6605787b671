"""Captures the ML backend requests of a real Label Studio server into this folder's fixtures.

    label-studio start --no-browser --username U --password P --user-token TOKEN --enable-legacy-api-token
    python tests/data/label_studio_backend/capture.py --label-studio http://127.0.0.1:8080 --token TOKEN

It makes a tiny 3-class model and three images, creates a BrushLabels project through Label Studio's API,
imports the images (uploads), starts the backend (tests/label_studio_backend_app.py under uvicorn, recording
every request), connects it (POST /api/ml), retrieves predictions for every task, annotates two tasks (clicks
and a brush stroke), starts a training round ("Start training": POST /api/ml/ID/train), waits for its
model and retrieves predictions again (now from the new model), then connects it to a second project whose labels the model lacks. Written here: the request bodies
Label Studio sent (setup.json, predict.json, webhook_start_training.json, webhook_annotation_created.json),
the project's export (export.json), the images (images/), and what happened (record.json). Tokens are
replaced by "REDACTED".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CLASSES = ("background", "disk", "box")
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="label" toName="image">
    <Label value="disk" background="#ff0000"/><Label value="box" background="#0000ff"/>
    <Label value="background" background="#00ff00"/>
  </BrushLabels>
  <KeyPointLabels name="clicks" toName="image">
    <Label value="disk"/><Label value="box"/><Label value="background"/>
  </KeyPointLabels>
</View>"""
UNKNOWN_CONFIG = CONFIG.replace('"disk"', '"cat"').replace('"box"', '"dog"')
TRAIN_ARGS = ("--backbone resnet18 --stem torchvision --crop-size 64 --batch-size 2 --max-steps 4 --epochs 2 "
              "--pretrained none --workers 0 --device cpu --log-every 1")


def make_images(folder: Path) -> list[Path]:
    """Three images: a bright disk and a dark box on a mid-grey ground, at different sizes."""
    paths = []
    for i, (h, w) in enumerate([(72, 96), (64, 64), (80, 60)]):
        rng = np.random.default_rng(i)
        image = np.full((h, w, 3), 120, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
        yy, xx = np.mgrid[0:h, 0:w]
        image[(yy - h // 3) ** 2 + (xx - w // 3) ** 2 <= (min(h, w) // 5) ** 2] = (230, 60, 60)
        image[h // 2:h - 6, w // 2:w - 6] = (30, 30, 160)
        paths.append(folder / f"scene{i}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def make_model(path: Path) -> Path:
    import torch

    from agmm_deploy.contract import ModelMeta
    from agmm_deploy.export.onnx import export_onnx
    from agmm_deploy.model import ModelConfig, build_model

    torch.manual_seed(1)  # a seed whose random model predicts two classes on these images
    model = build_model(ModelConfig.for_dataset("folder", backbone="resnet18", stem="torchvision", output_stride=16,
                                                num_classes=len(CLASSES)))
    export_onnx(model, ModelMeta.for_dataset("folder", (64, 64), classes=CLASSES), path, height=64, width=64)
    return path


def redact(value, token: str):
    text = json.dumps(value).replace(token, "REDACTED")
    data = json.loads(text)
    if isinstance(data, dict) and "access_token" in data:
        data["access_token"] = "REDACTED"
    return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label-studio", default="http://127.0.0.1:8080")
    parser.add_argument("--token", required=True)
    parser.add_argument("--port", type=int, default=9090)
    args = parser.parse_args()
    ls, auth = args.label_studio.rstrip("/"), {"Authorization": f"Token {args.token}"}
    work = Path(tempfile.mkdtemp(prefix="ls-capture-"))
    record = {"label_studio": requests.get(f"{ls}/api/version", headers=auth).json().get("release"), "calls": []}

    def call(method, path, **kwargs):
        response = requests.request(method, f"{ls}{path}", headers=auth, timeout=300, **kwargs)
        record["calls"].append({"call": f"{method} {path}", "status": response.status_code})
        print(method, path, response.status_code, response.text[:300])
        return response

    images = make_images(work)
    model = make_model(work / "tiny.onnx")
    project = call("POST", "/api/projects", json={"title": "agmm loop", "label_config": CONFIG}).json()
    files = [(f"file{i}", (p.name, p.read_bytes(), "image/png")) for i, p in enumerate(images)]
    call("POST", f"/api/projects/{project['id']}/import", files=files)

    env = {**os.environ, "AGMM_MODEL": str(model), "AGMM_MODEL_VERSION": "tiny-random", "LABEL_STUDIO_URL": ls,
           "LABEL_STUDIO_API_KEY": args.token, "AGMM_LS_RECORD": str(work / "requests"),
           "AGMM_LS_TRAIN_OUT": str(work / "rounds"), "AGMM_LS_TRAIN_ARGS": TRAIN_ARGS,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    backend = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "label_studio_backend_app:create_app",
                                "--host", "127.0.0.1", "--port", str(args.port)], env=env,
                               stdout=open(work / "backend.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(120):
            try:
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        ml = call("POST", "/api/ml", json={"url": url, "project": project["id"], "title": "agmm"}).json()
        record["ml_backend"] = {k: ml.get(k) for k in ("id", "state", "model_version", "error_message")}
        tasks = call("GET", f"/api/tasks?project={project['id']}").json()["tasks"]
        call("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project['id']}",
             json={"selectedItems": {"all": True, "excluded": []}})
        stored = [call("GET", f"/api/predictions?task={t['id']}").json() for t in tasks]
        record["predictions_per_task"] = [len(p) for p in stored]
        record["prediction_results"] = [[(r["type"], r["value"].get("brushlabels")) for r in p[0]["result"]]
                                        if p else [] for p in stored]

        from agmm_deploy.labels.label_studio import encode_brush_rle, image_name

        for task in tasks[:2]:
            path = work / image_name(task["data"]["image"])
            h, w = np.asarray(Image.open(path)).shape[:2]
            stroke = np.zeros((h, w), bool)
            stroke[h - 4:h - 2, 2:w // 3] = True  # a brush stroke along the bottom: background
            result = [{"from_name": "clicks", "to_name": "image", "type": "keypointlabels", "original_width": w,
                       "original_height": h, "value": {"x": 100 / 3, "y": 100 / 3, "width": 1,
                                                       "keypointlabels": ["disk"]}},
                      {"from_name": "clicks", "to_name": "image", "type": "keypointlabels", "original_width": w,
                       "original_height": h, "value": {"x": 75.5, "y": 75.5, "width": 1, "keypointlabels": ["box"]}},
                      {"from_name": "label", "to_name": "image", "type": "brushlabels", "original_width": w,
                       "original_height": h, "value": {"format": "rle", "rle": encode_brush_rle(stroke),
                                                       "brushlabels": ["background"]}}]
            call("POST", f"/api/tasks/{task['id']}/annotations", json={"result": result})
        started = time.time()
        trained = call("POST", f"/api/ml/{ml['id']}/train", json={})
        record["train_response"] = trained.text
        for _ in range(600):
            status = requests.get(f"{url}/train", timeout=2).json()
            if status["state"] in ("finished", "failed"):
                break
            time.sleep(1)
        record["training"] = {**status, "seconds": round(time.time() - started, 1)}
        record["health_after"] = requests.get(f"{url}/health", timeout=1).json()
        # Retrieve predictions again: Label Studio asks /setup for the model version and predicts anew with it.
        call("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project['id']}",
             json={"selectedItems": {"all": True, "excluded": []}})
        record["prediction_versions_after_training"] = [
            sorted(p["model_version"] for p in call("GET", f"/api/predictions?task={t['id']}").json()) for t in tasks]

        other = call("POST", "/api/projects", json={"title": "unknown labels", "label_config": UNKNOWN_CONFIG}).json()
        refused = call("POST", "/api/ml", json={"url": url, "project": other["id"], "title": "agmm"})
        record["unknown_labels_connect"] = {"status": refused.status_code, "body": refused.json()}
        export = call("GET", f"/api/projects/{project['id']}/export?exportType=JSON").json()
    finally:
        backend.terminate()
        backend.wait(10)

    shutil.rmtree(HERE / "images", ignore_errors=True)
    (HERE / "images").mkdir()
    for path in images:
        shutil.copy(path, HERE / "images" / path.name)
    wanted = {"setup.json": ("/setup", None), "predict.json": ("/predict", None),
              "webhook_start_training.json": ("/webhook", "START_TRAINING"),
              "webhook_annotation_created.json": ("/webhook", "ANNOTATION_CREATED")}
    seen = sorted((work / "requests").iterdir())
    record["backend_requests"] = [p.name for p in seen]
    for name, (path, action) in wanted.items():
        for file in seen:
            request = json.loads(file.read_text())
            body = request["body"] if isinstance(request["body"], dict) else {}
            if request["path"] == path and (action is None or body.get("action") == action):
                (HERE / name).write_text(json.dumps(redact(body, args.token), indent=1) + "\n")
                break
    (HERE / "export.json").write_text(json.dumps(redact(export, args.token), indent=1) + "\n")
    (HERE / "record.json").write_text(json.dumps(redact(record, args.token), indent=1) + "\n")
    print(f"captured into {HERE}; work folder {work}")


if __name__ == "__main__":
    main()
