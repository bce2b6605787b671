"""Label Studio's ML backend protocol, as an ASGI sub-application the service mounts under ``/label-studio``.

=====================  ==================================================================================
GET  /health, GET /    ``{"status": "UP", "model_class": ..., "model_version": ...}``, never waiting on a batch
POST /setup            the project's label config (``schema``) -> ``{"model_version": ...}``, or a 422 sentence
POST /predict          ``{"tasks": [...], "label_config": ...}`` -> ``{"results": [...]}``, one per task
POST /webhook          ``START_TRAINING`` (and every N ``ANNOTATION_CREATED/UPDATED``) start a training job
POST /train            the same job, for Label Studio versions that post annotations here
GET  /train            the training job's status (also what the service reports in /info)
=====================  ==================================================================================

Mounting it in the service (serving/service.py). BentoML mounts ASGI apps on the class, while ``segment`` needs
the instance's batcher, so the class mounts ``deferred_app``, which builds the backend from the running
instance on its first request::

    from serving.label_studio import LabelStudioSettings, deferred_app, label_studio_app

    @bentoml.asgi_app(deferred_app(lambda: bentoml.get_current_service().label_studio), path="/label-studio")
    @bentoml.service(...)
    class AgmmSegmenter:
        def __init__(self):
            ...
            async def segment(images):  # list of uint8 RGB (H, W, 3) -> list of uint8 label maps (H, W)
                ...                     # the door's pixel and input-count limits, then the batcher, as /segment
            self.label_studio = label_studio_app(segment, meta.classes, lambda: self.model_version,
                                                 LabelStudioSettings.from_env(), on_new_model=self.swap_model)

``on_new_model(path, version)`` runs in a thread; the service loads the model there and swaps between batches
(raising keeps the old model, and the job reports failed with the reason).

Settings come from the environment (``LabelStudioSettings.from_env``): ``LABEL_STUDIO_URL`` and
``LABEL_STUDIO_API_KEY`` (Label Studio's own names), ``AGMM_LS_LOCAL_FILES_ROOT``, ``AGMM_LS_TRAIN_EVERY``,
``AGMM_LS_TRAIN_OUT``, ``AGMM_LS_TRAIN_FROM``, ``AGMM_LS_TRAIN_ARGS`` and the limits; the service logs
``settings.describe()`` at start and reports ``app.state.job.status()`` in /info. Images are read only from Label
Studio or the local-files root (agmm_deploy.labels.label_studio_api); the ``hostname`` and ``access_token``
Label Studio sends to /setup are user input and never used. A training job is ``agmm-labels train`` run as a
subprocess, one at a time; when it ends with a new model, ``on_new_model(path, model_version)`` hands it to the
service.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

from agmm_deploy.labels.annotations import LabelsError
from agmm_deploy.labels.label_studio import encode_brush_rle
from agmm_deploy.labels.label_studio_api import (ImageSource, ImageSources, LabelControl, image_source,
                                                 match_labels, read_label_control, read_source)
from agmm_deploy.labels.loop import READY_FILE
from agmm_deploy.labels.rasterize import label_regions
from agmm_deploy.transforms import ImageDecodeError, decode_image

# Under "bentoml": BentoML configures that logger tree in its workers and disables loggers it does not know.
logger = logging.getLogger("bentoml.agmm_deploy.label_studio")

Segment = Callable[[list[np.ndarray]], Awaitable[list[np.ndarray]]]
MODEL_CLASS = "AgmmSegmenter"
TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
# Jobs still running when the service stops are stopped with it: nobody would take their model.
_RUNNING: set[subprocess.Popen] = set()


@atexit.register
def _stop_jobs() -> None:
    for process in list(_RUNNING):
        if process.poll() is None:
            process.terminate()


def _env(name: str, default: Any, kind: type = int) -> Any:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a {kind.__name__}") from None


@dataclass(frozen=True)
class LabelStudioSettings:
    """The backend's settings, read once.

    url, api_key: the Label Studio server images and exports are read from (LABEL_STUDIO_URL/_API_KEY);
    local_root: a folder served as ``/data/local-files/?d=...`` (Label Studio's LOCAL_FILES_DOCUMENT_ROOT);
    max_image_bytes, max_pixels, fetch_timeout_s: per task image; max_tasks: tasks per /predict request (Label
    Studio sends up to its ML backend's batch size, 100 by default, and waits 100 s), segmented batch_tasks at a
    time so that a large request holds few images at once; min_area: predicted regions smaller than this are left out;
    train_every: start a job every N annotations (0 = only on "Start training"); train_out: folder of the
    jobs' runs; train_from: the checkpoint jobs fine-tune from (None = a fresh model); train_args: more
    training.run flags (e.g. "--max-steps 200"); train_command: the job's
    argv before its arguments (the default runs agmm-labels train).
    """

    url: str | None = None
    api_key: str | None = None
    local_root: Path | None = None
    max_image_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 8 * 1024 * 1024
    fetch_timeout_s: float = 10.0
    max_tasks: int = 100
    batch_tasks: int = 8
    min_area: int = 1
    train_every: int = 0
    train_out: Path = Path("runs/label-studio")
    train_from: Path | None = None
    train_args: str = ""
    train_command: tuple[str, ...] = (sys.executable, "-m", "agmm_deploy.cli.labels", "train")

    @classmethod
    def from_env(cls, **overrides: Any) -> "LabelStudioSettings":
        root, start = os.environ.get("AGMM_LS_LOCAL_FILES_ROOT"), os.environ.get("AGMM_LS_TRAIN_FROM")
        values = dict(url=os.environ.get("LABEL_STUDIO_URL") or None,
                      api_key=os.environ.get("LABEL_STUDIO_API_KEY") or None,
                      local_root=Path(root) if root else None,
                      max_image_bytes=_env("AGMM_MAX_UPLOAD_BYTES", cls.max_image_bytes),
                      max_pixels=_env("AGMM_MAX_PIXELS", cls.max_pixels),
                      fetch_timeout_s=_env("AGMM_LS_FETCH_TIMEOUT_S", cls.fetch_timeout_s, float),
                      max_tasks=_env("AGMM_LS_MAX_TASKS", cls.max_tasks),
                      batch_tasks=_env("AGMM_LS_BATCH_TASKS", cls.batch_tasks),
                      train_every=_env("AGMM_LS_TRAIN_EVERY", cls.train_every),
                      train_out=Path(os.environ.get("AGMM_LS_TRAIN_OUT") or cls.train_out),
                      train_from=Path(start) if start else None,
                      train_args=os.environ.get("AGMM_LS_TRAIN_ARGS", ""))
        return cls(**{**values, **overrides})

    def describe(self) -> dict[str, Any]:
        """The settings for the log and /info, the API key left out."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "api_key"}


@dataclass
class TrainingJob:
    """The one training job: state idle | running | finished | failed, and what it said."""

    state: str = "idle"
    project: int | None = None
    out: str | None = None
    log: str | None = None
    started: float | None = None
    returncode: int | None = None
    reason: str | None = None
    model_version: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    def status(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "process"}


class Refused(Exception):
    """A request answered with ``status`` and {"status": "ERROR", "error": message}; ``segment`` and ``price``
    raise it for an image over the service's limits."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message



def _project_id(value: Any) -> int | None:
    """Label Studio names the project as 7, "7", "7.1732000000" (id.timestamp) or {"id": 7, ...}."""
    if isinstance(value, dict):
        value = value.get("id")
    try:
        return int(str(value).split(".")[0])
    except (TypeError, ValueError):
        return None


def brush_results(label_map: np.ndarray, control: LabelControl, ids: dict[str, int], min_area: int) -> list[dict]:
    """One brushlabels (or polygonlabels, one per connected region) result per class present in the label map.

    Shape: label_map (H, W) uint8 class ids. Brush masks are Label Studio's RLE of the class's pixels; polygon
    points are in percent of the image size.
    """
    h, w = label_map.shape
    results = []
    for label, class_id in ids.items():
        base = {"from_name": control.name, "to_name": control.to_name, "type": control.kind,
                "original_width": w, "original_height": h, "image_rotation": 0}
        mask = label_map == class_id
        if mask.sum() < min_area:
            continue
        if control.kind == "brushlabels":
            results.append({**base, "id": f"agmm-{class_id}",
                            "value": {"format": "rle", "rle": encode_brush_rle(mask), "brushlabels": [label]}})
            continue
        only = np.where(mask, 0, 255).astype(np.uint8)
        for index, region in enumerate(label_regions(only, 1, min_area)):
            points = (region.polygon / np.array([w, h]) * 100.0).round(4).tolist()
            results.append({**base, "id": f"agmm-{class_id}-{index}",
                            "value": {"points": points, "closed": True, "polygonlabels": [label]}})
    return results


def deferred_app(build: Callable[[], Any]):
    """An ASGI app that calls ``build()`` on its first HTTP request and hands every request to what it returned
    (for an app that needs the running service instance, which does not exist when the class is mounted)."""
    built = []

    async def app(scope, receive, send):
        if scope["type"] != "http":  # lifespan events of the outer app are not the backend's
            return
        if not built:
            built.append(build())
        await built[0](scope, receive, send)

    return app


def label_studio_app(segment: Segment, classes: tuple[str, ...], model_version: str | Callable[[], str],
                     settings: LabelStudioSettings,
                     on_new_model: Callable[[Path, str], None] | None = None,
                     price: Callable[[bytes, str], Any] | None = None):
    """The ML backend as a Starlette app (see the module docstring for its routes and how to mount it).

    Args:
        segment: async; uint8 RGB images (H, W, 3) -> uint8 label maps (H, W) of class ids, through the
            service's limits and batcher.
        classes: the model's class names (id = position); project labels are matched to them by name.
        model_version: the served model's version, or a callable giving the current one (it changes on a swap).
        settings: LabelStudioSettings.
        on_new_model: called with (model path, model_version) when a training job wrote a model whose parity
            passed; the service swaps to it.
        price: called with (image bytes, name) before each image is decoded, in the fetching thread: the
            service's per-image checks from the header (pixels, decoded bytes, scans, model inputs); raises
            Refused to refuse the task.
    Returns:
        The ASGI app; ``app.state.job`` is the TrainingJob (its ``status()`` for /info).
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    version = model_version if callable(model_version) else (lambda: model_version)
    sources = ImageSources(settings.url, settings.local_root)
    job = TrainingJob()
    annotations_seen: dict[int, int] = {}
    fetches = asyncio.Semaphore(4)  # images fetched at once per process

    def refused(status: int, message: str) -> JSONResponse:
        # Label Studio shows the user only "422 Client Error ... for url"; the sentence is in the body and here.
        logger.warning("label-studio: %d %s", status, message)
        return JSONResponse({"status": "ERROR", "error": message}, status_code=status)

    async def read_json(request: Request, limit: int = 64 << 20) -> dict:
        chunks, size = [], 0
        async for chunk in request.stream():  # read up to the limit, never the whole of a larger body
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"the request body is over {limit} bytes, the limit; send fewer tasks at once")
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            data = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise Refused(400, f"the request body is not JSON ({err}); expected Label Studio's ML backend request")
        if not isinstance(data, dict):
            raise Refused(400, f"the request body is a JSON {type(data).__name__}; expected an object")
        return data

    def control_for(label_config: Any) -> tuple[LabelControl, dict[str, int]]:
        try:
            control = read_label_control(label_config)
            return control, match_labels(control, classes)
        except LabelsError as err:
            raise Refused(422, str(err)) from None

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "UP", "model_class": MODEL_CLASS, "model_version": version()})

    async def setup(request: Request) -> JSONResponse:
        try:
            data = await read_json(request)
            control_for(data.get("schema"))
        except Refused as err:
            return refused(err.status, err.message)
        return JSONResponse({"model_version": version()})

    def read_image(source: ImageSource, name: str) -> np.ndarray:
        data = read_source(source, settings.api_key, settings.max_image_bytes, settings.fetch_timeout_s)
        if price is not None:
            price(data, name)
        return decode_image(data, settings.max_pixels, name)

    async def fetch(task: dict, source: ImageSource) -> np.ndarray:
        name = f"task {task.get('id')} image"
        async with fetches:
            try:
                # Reading and decoding run in a thread: the event loop stays free for /health and /setup.
                return await asyncio.wait_for(asyncio.to_thread(read_image, source, name), settings.fetch_timeout_s * 2)
            except asyncio.TimeoutError:
                raise Refused(504, f"{name} did not arrive within {settings.fetch_timeout_s * 2:g} s") from None
            except (LabelsError, ImageDecodeError) as err:
                raise Refused(422, f"{name}: {err}") from None

    async def predict(request: Request) -> JSONResponse:
        try:
            data = await read_json(request)
            tasks = data.get("tasks")
            if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
                raise Refused(400, "the request has no list of tasks; expected Label Studio's {\"tasks\": [...]}")
            if len(tasks) > settings.max_tasks:
                raise Refused(413, f"the request holds {len(tasks)} tasks; this backend answers at most "
                                    f"{settings.max_tasks} per request (AGMM_LS_MAX_TASKS) within Label Studio's "
                                    "100 s; set the ML backend's batch size in Label Studio to that or fewer")
            control, ids = control_for(data.get("label_config"))
            # Every URL is checked before any is fetched: one outside URL refuses the request, fetching nothing.
            resolved = []
            for task in tasks:
                try:
                    resolved.append(image_source((task.get("data") or {}).get(control.value_key), sources))
                except LabelsError as err:
                    raise Refused(422, f"task {task.get('id')}: {err}") from None
            results, current = [], version()
            for start in range(0, len(tasks), settings.batch_tasks):
                part = slice(start, start + settings.batch_tasks)
                images = await asyncio.gather(*(fetch(t, s) for t, s in zip(tasks[part], resolved[part])))
                label_maps = await segment(list(images))
                regions = await asyncio.to_thread(lambda: [brush_results(m, control, ids, settings.min_area)
                                                           for m in label_maps])
                results += [{"result": r, "model_version": current} for r in regions]
        except Refused as err:
            return refused(err.status, err.message)
        return JSONResponse({"results": results, "model_version": current})

    collecting = threading.Lock()

    def finish_job() -> None:
        """Collects an ended job: a new model is handed to the service, a failure says why."""
        with collecting:
            if job.process is not None and job.process.poll() is not None:
                _collect()

    def _collect() -> None:
        _RUNNING.discard(job.process)
        job.returncode, job.process = job.process.returncode, None
        ready = Path(job.out) / READY_FILE
        if job.returncode == 0 and ready.is_file():
            info = json.loads(ready.read_text())
            job.model_version = info["model_version"]
            try:
                if on_new_model is not None:
                    on_new_model(Path(info["model"]), info["model_version"])
                job.state = "finished"
                logger.info("label-studio: training of project %s finished: model %s (%s)", job.project,
                            info["model"], info["model_version"])
            except Exception as err:  # the service refused the model: it keeps the old one
                job.state, job.reason = "failed", f"the service did not take the new model: {err}"
        else:
            job.state = "failed"
            job.reason = (f"the job exited with code {job.returncode}" +
                          ("" if job.returncode else f" without writing {ready}") + f"; see {job.log}")
        if job.state == "failed":
            logger.error("label-studio: training of project %s failed: %s", job.project, job.reason)

    def start_job(project: int | None) -> tuple[int, dict]:
        # The caller collected an ended job first, in a thread (collecting may load the new model).
        if job.state == "running":
            return 409, {"status": "ERROR", "error": f"a training job for project {job.project} is running since "
                         f"{time.strftime('%H:%M:%S', time.localtime(job.started))} (log {job.log}); one job runs "
                         "at a time: start this one when it ends"}
        if project is None:
            return 422, {"status": "ERROR", "error": "the request names no project; expected Label Studio's project "
                         "id (\"project\": 7 or {\"id\": 7})"}
        if settings.url is None:
            return 422, {"status": "ERROR", "error": "LABEL_STUDIO_URL is not set, so the backend cannot read the "
                         "project's annotations; set it and LABEL_STUDIO_API_KEY where the service runs"}
        out = settings.train_out / f"project{project}-{time.strftime('%Y%m%d-%H%M%S')}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "classes.txt").write_text("".join(f"{name}\n" for name in classes), encoding="utf-8")
        argv = [*settings.train_command, "--label-studio", settings.url, "--project", str(project), "--out", str(out),
                "--classes", str(out / "classes.txt")]
        if settings.train_from is not None:
            argv += ["--from", str(settings.train_from)]
        if settings.train_args:
            argv += ["--train-args", settings.train_args]
        log = out / "train.log"
        with open(log, "wb") as stream:  # the child keeps its own descriptor
            process = subprocess.Popen(argv, stdout=stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, "LABEL_STUDIO_API_KEY": settings.api_key or ""})
        _RUNNING.add(process)
        job.__init__(state="running", project=project, out=str(out), log=str(log), started=time.time(),
                     process=process)
        logger.info("label-studio: training job for project %s started (pid %d, log %s)", project, process.pid, log)
        watchers.add(asyncio.get_running_loop().create_task(watch(process)))
        return 201, {"status": "started", "job": job.status()}

    watchers: set[asyncio.Task] = set()

    async def watch(process: subprocess.Popen) -> None:
        # In threads: the wait, and the hand-over (the service loads the new model), never in the event loop.
        await asyncio.to_thread(process.wait)
        await asyncio.to_thread(finish_job)
        watchers.discard(asyncio.current_task())

    async def webhook(request: Request) -> JSONResponse:
        try:
            data = await read_json(request)
        except Refused as err:
            return refused(err.status, err.message)
        action, project = data.get("action"), _project_id(data.get("project"))
        if action == "START_TRAINING":
            await asyncio.to_thread(finish_job)
            status, body = start_job(project)
            return JSONResponse(body, status_code=status)
        if action in TRAIN_EVENTS and settings.train_every > 0 and project is not None:
            annotations_seen[project] = annotations_seen.get(project, 0) + 1
            if annotations_seen[project] % settings.train_every == 0:
                await asyncio.to_thread(finish_job)
                status, body = start_job(project)
                return JSONResponse(body, status_code=status)
        return JSONResponse({"status": "acknowledged", "action": action})

    async def train(request: Request) -> JSONResponse:
        try:
            data = await read_json(request)
        except Refused as err:
            return refused(err.status, err.message)
        await asyncio.to_thread(finish_job)
        status, body = start_job(_project_id(data.get("project")))
        return JSONResponse(body, status_code=status)

    async def train_status(request: Request) -> JSONResponse:
        # In a thread: collecting an ended job hands its model to the service, which loads it (the lock may
        # also be held by the job's watcher doing so); the event loop stays free for /health.
        await asyncio.to_thread(finish_job)
        return JSONResponse(job.status())

    app = Starlette(routes=[
        Route("/", health, methods=["GET"]), Route("/health", health, methods=["GET"]),
        Route("/setup", setup, methods=["POST"]), Route("/predict", predict, methods=["POST"]),
        Route("/webhook", webhook, methods=["POST"]), Route("/train", train, methods=["POST"]),
        Route("/train", train_status, methods=["GET"]),
    ])
    app.state.job = job
    app.state.collect = finish_job
    logger.info("label-studio backend: %s", settings.describe())
    return app
