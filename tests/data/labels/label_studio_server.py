"""Takes tests/data/labels/label_studio.json from a real Label Studio server, and sends pre-annotations back to it.

Rerun it when Label Studio's export changes. In a throwaway venv (Label Studio is about 1 GB installed):

    python -m venv /tmp/ls-venv && /tmp/ls-venv/bin/pip install label-studio
    /tmp/ls-venv/bin/python tests/data/labels/label_studio_server.py export
    # after training and agmm-predict, with the project's venv:
    agmm-labels preannotate PRED --classes classes.txt --images tests/data/labels/images --format label-studio \\
        --shape mask --out /tmp/pre.json
    /tmp/ls-venv/bin/python tests/data/labels/label_studio_server.py predictions /tmp/pre.json

``export`` starts ``label-studio`` on sqlite in a temporary folder, creates a project with keypoint, polygon and
brush controls, uploads images/img_0..2.png, posts the same clicks, polygon and painted patch as the CVAT
fixture (make_fixtures.shapes; the brush mask encoded by label-studio-sdk) as annotations through the API,
and saves the project's JSON export as it comes. ``predictions`` does the same set-up, then posts each task's
pre-annotation result as a prediction and reads it back from the server.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_fixtures import CLASSES, HEIGHT, WIDTH, shapes  # noqa: E402

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image">{labels}</KeyPointLabels>
  <PolygonLabels name="poly" toName="image">{labels}</PolygonLabels>
  <BrushLabels name="label" toName="image">{labels}</BrushLabels>
</View>""".format(labels="".join(f'<Label value="{c}"/>' for c in CLASSES))


def start_server(data_dir: Path) -> tuple[subprocess.Popen, str, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(20)
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir), "LABEL_STUDIO_USERNAME": "agmm@example.com",
           "LABEL_STUDIO_PASSWORD": secrets.token_hex(8), "LABEL_STUDIO_USER_TOKEN": token,
           "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true"}
    binary = Path(sys.executable).parent / "label-studio"
    log = open(data_dir / "server.log", "w")
    server = subprocess.Popen([str(binary), "start", "--no-browser", "--port", str(port), "--data-dir", str(data_dir)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, url, data_dir)
    except BaseException:
        os.killpg(server.pid, 15)
        raise
    return server, url, {"Authorization": f"Token {token}"}


def wait_until_up(server: subprocess.Popen, url: str, data_dir: Path) -> None:
    for _ in range(600):
        if server.poll() is not None:
            raise RuntimeError(f"label-studio exited with {server.returncode}; see {data_dir / 'server.log'}")
        try:
            if requests.get(f"{url}/health", timeout=10).status_code == 200:
                break
        except (requests.ConnectionError, requests.Timeout):  # still starting (migrations on first run)
            pass
        time.sleep(1)
    else:
        raise RuntimeError(f"label-studio did not answer on {url} within 10 minutes")


def set_up_project(url: str, headers: dict) -> tuple[int, list[dict]]:
    project = requests.post(f"{url}/api/projects", headers=headers,
                            json={"title": "agmm fixtures", "label_config": LABEL_CONFIG}, timeout=60)
    project.raise_for_status()
    pid = project.json()["id"]
    # one form field per file: files sharing a field name arrive as one
    files = [(f"file{k}", (f"img_{k}.png", (HERE / "images" / f"img_{k}.png").read_bytes(), "image/png"))
             for k in range(3)]
    requests.post(f"{url}/api/projects/{pid}/import", headers=headers, files=files, timeout=120).raise_for_status()
    tasks = requests.get(f"{url}/api/tasks", headers=headers, params={"project": pid, "page_size": 100}, timeout=60)
    tasks.raise_for_status()
    body = tasks.json()
    return pid, sorted(body["tasks"] if isinstance(body, dict) else body, key=lambda t: t["id"])


def annotation_result(index: int) -> list[dict]:
    from label_studio_sdk.converter.brush import mask2rle

    s = shapes(index)
    size = {"original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0, "to_name": "image"}
    result = [{"id": f"kp{index}{k}", "type": "keypointlabels", "from_name": "kp", **size,
               "value": {"x": 100 * x / WIDTH, "y": 100 * y / HEIGHT, "width": 0.8, "keypointlabels": [CLASSES[c]]}}
              for k, (x, y, c) in enumerate(s["clicks"])]
    polygon, c = s["polygon"]
    result.append({"id": f"pg{index}", "type": "polygonlabels", "from_name": "poly", **size,
                   "value": {"points": [[100 * x / WIDTH, 100 * y / HEIGHT] for x, y in polygon], "closed": True,
                             "polygonlabels": [CLASSES[c]]}})
    (left, top, w, h), c = s["mask_box"]
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[top:top + h, left:left + w] = 255
    result.append({"id": f"br{index}", "type": "brushlabels", "from_name": "label", **size,
                   "value": {"format": "rle", "rle": [int(v) for v in mask2rle(mask)], "brushlabels": [CLASSES[c]]}})
    return result


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else "export"
    with tempfile.TemporaryDirectory() as tmp:
        server, url, headers = start_server(Path(tmp))
        try:
            pid, tasks = set_up_project(url, headers)
            version = requests.get(f"{url}/api/version", headers=headers, timeout=30).json().get("release")
            print(f"label-studio {version} at {url}: project {pid}, tasks {[t['id'] for t in tasks]}")
            if command == "export":
                for index, task in enumerate(tasks):
                    requests.post(f"{url}/api/tasks/{task['id']}/annotations", headers=headers, timeout=60,
                                  json={"result": annotation_result(index), "was_cancelled": False}).raise_for_status()
                export = requests.get(f"{url}/api/projects/{pid}/export", headers=headers,
                                      params={"exportType": "JSON"}, timeout=120)
                export.raise_for_status()
                (HERE / "label_studio.json").write_text(json.dumps(export.json(), indent=1) + "\n")
                print(f"wrote {HERE / 'label_studio.json'} from the server's JSON export")
            else:
                pre = json.loads(Path(sys.argv[2]).read_text())
                by_name = {Path(p["data"]["image"]).name: p for p in pre}
                for task in tasks:
                    name = Path(task["data"]["image"]).name.split("-", 1)[1]  # "/data/upload/1/<8 hex>-img_0.png"
                    result = by_name[name]["predictions"][0]["result"]
                    requests.post(f"{url}/api/predictions", headers=headers, timeout=60,
                                  json={"task": task["id"], "result": result, "model_version": "agmm"}
                                  ).raise_for_status()
                    back = requests.get(f"{url}/api/tasks/{task['id']}", headers=headers, timeout=60).json()
                    kinds = [r["type"] for p in back["predictions"] for r in p["result"]]
                    print(f"task {task['id']} ({name}): the server holds {len(back['predictions'])} prediction(s), "
                          f"{len(kinds)} result(s) of {sorted(set(kinds))}")
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
