"""The Label Studio sub-app standalone, with a real runner behind ``segment``: what the tests and the capturing
script run under uvicorn (the service mounts the same backend at /label-studio, tested against a real
`bentoml serve` in test_label_studio_backend.py; this app also records requests for capturing fixtures).

    AGMM_MODEL=tiny.onnx LABEL_STUDIO_URL=http://127.0.0.1:8080 LABEL_STUDIO_API_KEY=... \\
        uvicorn --factory label_studio_backend_app:create_app --host 127.0.0.1 --port 9090   # tests/ on the path

``AGMM_LS_RECORD=DIR`` also writes every request it receives (method, path, JSON body) to DIR/NNN-<path>.json,
which is how tests/data/label_studio_backend/ was captured from a real Label Studio server. A training job's new
model is swapped in between batches (a lock around the runner), as the service would.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
from pathlib import Path

from agmm_deploy.inference import segment_images
from agmm_deploy.runtime import load_runner
from serving.label_studio import LabelStudioSettings, label_studio_app


def create_app():
    model = Path(os.environ["AGMM_MODEL"])
    state = {"runner": load_runner(model, device="cpu"), "version": os.environ.get("AGMM_MODEL_VERSION", model.stem)}
    lock = threading.Lock()

    def run(images):
        with lock:
            return segment_images(state["runner"], images)

    async def segment(images):
        return await asyncio.to_thread(run, images)

    def swap(path: Path, version: str) -> None:
        runner = load_runner(path, device="cpu")
        if runner.meta.classes != state["runner"].meta.classes:
            raise ValueError(f"{path} has classes {runner.meta.classes}; the served model has "
                             f"{state['runner'].meta.classes}")
        with lock:
            state.update(runner=runner, version=version)

    app = label_studio_app(segment, state["runner"].meta.classes, lambda: state["version"],
                           LabelStudioSettings.from_env(), on_new_model=swap)
    record = os.environ.get("AGMM_LS_RECORD")
    return _Recorder(app, Path(record)) if record else app


class _Recorder:
    """ASGI middleware writing each request's method, path, query and JSON body to a numbered file."""

    def __init__(self, app, folder: Path) -> None:
        self.app, self.folder, self.count = app, folder, itertools.count()
        folder.mkdir(parents=True, exist_ok=True)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = body.decode("utf-8", "replace")
        name = f"{next(self.count):03d}-{scope['method']}{scope['path'].replace('/', '-')}.json"
        (self.folder / name).write_text(json.dumps({"method": scope["method"], "path": scope["path"],
                                                    "query": scope["query_string"].decode(), "body": parsed},
                                                   indent=1))
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
