"""The segmentation service: `bentoml serve --host 127.0.0.1` in the project root starts it (see bentofile.yaml).

The model comes from ``AGMM_MODEL`` (any artifact the runtime table reads: an .onnx file, a TensorRT .engine
with its .json sidecar, an OpenVINO .xml, a .pt checkpoint; or an agmm-export output folder) or from the BentoML
model store (``AGMM_BENTO_MODEL=name:version``). From a folder it serves the fp32 artifact unless
``AGMM_PRECISION`` or ``AGMM_MODEL_FILE`` picks another (serving/artifacts.py), and logs the others with the
setting that selects each. Preprocessing comes from the model's own metadata.

Endpoints (POST; /info answers GET as well):
    /segment          multipart ``image`` -> label map as a palette PNG (pixel value = class id)
    /segment_json     multipart ``image`` -> {"classes", "fractions", "height", "width", "batch_size"}
    /overlay          multipart ``image`` (+ ``alpha``) -> the image blended with the class colours, PNG
    /segment_batch    JSON {"images": [base64 image bytes, ...]} -> one result per image, for clients that
                      batch themselves
    /info             classes, palette, input size, backend, precision, batching and every limit

The request path, in order:
1. ``RequestDoor`` (ASGI middleware, before BentoML): refuses bodies over the byte limit (413) or that arrive
   too slowly (408), parses the multipart body with Starlette's parser (or the JSON body of /segment_batch) and
   checks its fields (400/415). BentoML never parses a body here: it would fetch a URL given for a file field
   and fail with a 500 on several malformed forms.
2. The endpoint decodes the image in a thread pool (requests in parallel), prices it in model inputs (1
   letterboxed canvas, or its sliding-window tiles) and refuses what is over the limits (400/413), so a bad
   image never waits behind good work.
3. The decoded uint8 image goes, as a tensor on the runner's device, to ``Batcher`` (serving/batcher.py), which
   runs the inputs of concurrent requests together, counting model inputs, and answers 503 with Retry-After
   when the queue would keep a request past ``max_latency_ms``. Pre-processing, the model and the gathering of
   its outputs at the image's size run there as torch ops on the runner's device (agmm_deploy.inference).
4. The endpoint takes the argmax on the runner's device (only the uint8 label map leaves it) and encodes the PNG
   (or counts the JSON fractions) in the same worker thread, one hop for both, while the batcher runs the next
   batch.

Every refusal is a JSON {"error": "<sentence>"} and one log line without the upload's content.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable

import anyio
import bentoml
import numpy as np
import pydantic
from bentoml.validators import ContentType
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import JSONResponse, Response

from agmm_deploy import transforms

# BentoML configures the "bentoml" logger tree in its workers and disables loggers it does not know.
logger = logging.getLogger("bentoml.agmm_deploy")

NO_MODEL_MESSAGE = ("No model to serve: set AGMM_MODEL=path/to/model.onnx (or a TensorRT .engine, or a .pt "
                    "checkpoint, or an agmm-export folder), or AGMM_BENTO_MODEL=<tag> of a model saved in the "
                    "BentoML model store.")


def _env_number(name: str, default: float | None, kind: type = int) -> Any:
    value = os.environ.get(name, "")
    try:
        return kind(value) if value else default
    except ValueError:
        raise ValueError(f"{name}={value!r} is not {'an integer' if kind is int else 'a number'}") from None


# Limits, read once when the module is imported (CLI process and every worker); /info reports them all.
MAX_UPLOAD_BYTES = _env_number("AGMM_MAX_UPLOAD_BYTES", 20 * 1024 * 1024)
# An image's pixels (from its header, before decoding); the label map's scores hold K float32 planes of this.
MAX_PIXELS = _env_number("AGMM_MAX_PIXELS", 8 * 1024 * 1024)
# Model inputs one image may cost: 2048x1024 on a 512x1024 model is 16 tiles, 640x480 on 512x512 is 2; a
# 1024x768 photo on a 128x128 model would be 352 (45 s of CPU time), and is refused with 413.
MAX_INPUTS = _env_number("AGMM_MAX_INPUTS", 32)
MAX_BATCH_IMAGES = _env_number("AGMM_MAX_BATCH_IMAGES", 16)  # images per /segment_batch request
READ_TIMEOUT_S = _env_number("AGMM_READ_TIMEOUT_S", 30.0, float)  # for the whole request body
# Batching; unset ones are derived from the device and the warm-up (see AgmmSegmenter._start_batcher).
MAX_BATCH_SIZE = _env_number("AGMM_MAX_BATCH_SIZE", None)  # model inputs per batch
MAX_LATENCY_MS = _env_number("AGMM_MAX_LATENCY_MS", None)
BATCH_WAIT_MS = _env_number("AGMM_BATCH_WAIT_MS", None, float)
WORKERS = _env_number("AGMM_WORKERS", 1)

# The upload field each multipart endpoint takes, and the text fields it may have besides.
UPLOAD_ROUTES = {"/segment": set(), "/segment_json": set(), "/overlay": {"alpha"}}
# BentoML's OpenAPI document and Swagger UI describe BentoML's view of the endpoints, which the door replaces.
CLOSED_PATHS = {"/", "/docs", "/docs.json"}


class ImageResult(pydantic.BaseModel):
    """One image's answer from /segment_batch; ``error`` is set instead when the image was refused."""

    height: int = 0
    width: int = 0
    fractions: list[float] = []  # share of the image's pixels per class; sums to 1
    mask_png: str = ""  # base64 palette PNG at the original size; pixel value = class id
    batch_size: int = 0  # how many model inputs ran together with this image's last one
    error: str | None = None


class ClassFractions(pydantic.BaseModel):
    classes: list[str]
    fractions: dict[str, float]
    height: int
    width: int
    batch_size: int


@dataclass(frozen=True)
class ModelChoice:
    """The artifact this server runs, and how it was chosen (logged at start-up, reported by /info)."""

    path: Path
    chosen_by: str  # e.g. "AGMM_MODEL", "AGMM_PRECISION=int8", "the default (fp32)"
    folder: Path | None = None  # the model folder it was chosen from
    others: tuple[str, ...] = ()  # the folder's other artifacts: "<file> (<precision>, ...) -> <setting>"


def choose_model() -> ModelChoice:
    """The artifact named by AGMM_MODEL (a file, or a folder to choose from) or chosen from the BentoML store entry
    named by AGMM_BENTO_MODEL; AGMM_PRECISION / AGMM_MODEL_FILE pick within a folder (serving/artifacts.py)."""
    from agmm_deploy.runtime import describe_suffixes
    from serving.artifacts import (choose_artifact, describe_choices, failed_files, folder_artifacts,
                                   read_artifact)

    precision, file_name = os.environ.get("AGMM_PRECISION", ""), os.environ.get("AGMM_MODEL_FILE", "")
    device = os.environ.get("AGMM_DEVICE", "auto")
    folder = None
    if path := os.environ.get("AGMM_MODEL"):
        path = Path(path).expanduser()
        if path.is_dir():
            folder = path
        elif not path.is_file():
            raise FileNotFoundError(f"AGMM_MODEL={path} does not exist; expected {describe_suffixes()}, or a "
                                    "folder agmm-export wrote")
        elif file_name:
            raise ValueError(f"AGMM_MODEL_FILE={file_name} picks a file within a model folder, but AGMM_MODEL={path} "
                             "names a file already; unset one of them")
        elif precision and (found := read_artifact(path, device).precision) != precision:
            raise ValueError(f"AGMM_MODEL={path} is {found}, not AGMM_PRECISION={precision}; unset AGMM_PRECISION "
                             "or point AGMM_MODEL at the folder holding the artifacts")
        else:
            return ModelChoice(path, "AGMM_MODEL")
    elif tag := os.environ.get("AGMM_BENTO_MODEL"):
        folder = Path(bentoml.models.get(tag).path)
    else:
        raise RuntimeError(NO_MODEL_MESSAGE)
    chosen = choose_artifact(folder, precision, file_name, device)
    chosen_by = (f"AGMM_MODEL_FILE={file_name}" if file_name else f"AGMM_PRECISION={precision}" if precision
                 else "the default (fp32)")
    others = describe_choices(folder_artifacts(folder, device), failed_files(folder), leave_out=chosen.path)
    return ModelChoice(chosen.path, chosen_by, folder, tuple(others))


def resolve_model_path() -> Path:
    """The artifact file this server runs (choose_model)."""
    return choose_model().path


# ---------------------------------------------------------------------------------------------- refusals

class Refusal(Exception):
    """A request answered with a 4xx/5xx sentence instead of a result."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def response(self, route: str, ctx: bentoml.Context | None = None) -> JSONResponse:
        """The JSON answer, logged as one line without the upload's content (user errors are the clients' own).

        In an endpoint, pass its ``ctx``: BentoML gives every response an endpoint returns the context's status.
        """
        if ctx is not None:
            ctx.response.status_code = self.status
        logger.log(logging.WARNING if self.status >= 500 else logging.INFO, "%s refused with %d: %s", route,
                   self.status, self.message)
        return JSONResponse({"error": self.message}, status_code=self.status, headers=self.headers)


@dataclass
class Upload:
    """What the door read from a request body, for the endpoint (``ctx.request.state.agmm_upload``)."""

    data: bytes = b""  # the image file's bytes (multipart endpoints)
    alpha: float = 0.5  # /overlay
    images: list[str] | None = None  # /segment_batch: base64 image files


class RequestDoor:
    """ASGI middleware in front of BentoML: reads, bounds and parses every request body of the service, once.

    - 413 when the body is over the limit: from Content-Length before reading, or while reading.
    - 408 when the whole body has not arrived within AGMM_READ_TIMEOUT_S (slow or stalled clients).
    - 415 when an image endpoint gets anything but multipart/form-data, or /segment_batch anything but JSON.
    - 400 when the multipart body is malformed, lacks exactly one file upload named ``image``, or carries other
      fields; or the JSON of /segment_batch is not {"images": [...]}.
    - 404 for BentoML's OpenAPI document and Swagger UI (the README documents the API).
    - 499 (the nginx convention, for the log; nobody receives it) when the client leaves before its body came.
    The parsed upload goes to the endpoint in the request's state, and BentoML gets an empty body, so its own
    body parsing (URL downloads for file fields, file names used as temporary paths) never runs.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].rstrip("/") or "/"
        if path in CLOSED_PATHS and scope["method"] in ("GET", "HEAD"):
            await Refusal(404, "this server does not publish an OpenAPI document; its endpoints are POST "
                               "/segment, /segment_json, /overlay (multipart field 'image'), /segment_batch "
                               "(JSON) and GET or POST /info").response(path)(scope, receive, send)
            return
        if path == "/info" and scope["method"] in ("GET", "POST"):
            # It takes no body (one sent anyway is not read). BentoML routes its endpoints for POST only; a GET,
            # what a browser or `curl URL/info` sends for a read, reaches it as the same POST.
            await self.app({**_without_body(scope, Upload()), "method": "POST"}, _empty_body(receive), send)
            return
        if scope["method"] != "POST" or (path not in UPLOAD_ROUTES and path != "/segment_batch"):
            await self.app(scope, receive, send)
            return
        try:
            upload = await self._read(path, scope, receive)
        except Refusal as refusal:
            await refusal.response(path)(scope, receive, send)
            return
        await self.app(_without_body(scope, upload), _empty_body(receive), send)

    async def _read(self, path: str, scope: dict, receive: Any) -> Upload:
        headers = Headers(scope=scope)
        content_type = headers.get("content-type", "")
        # /segment_batch carries base64 (4/3 of the bytes): a request carries at most one upload's worth of image.
        limit = (MAX_UPLOAD_BYTES * 4 // 3 if path == "/segment_batch" else MAX_UPLOAD_BYTES) + 64 * 1024
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise _too_large(int(length), limit)
        if path == "/segment_batch":
            if not content_type.lower().startswith("application/json"):
                raise Refusal(415, 'segment_batch takes JSON: {"images": ["<base64 of an image file>", ...]}; got '
                                   f"Content-Type {content_type or 'none'}")
            return _batch_upload(await _read_body(receive, limit))
        fields = UPLOAD_ROUTES[path]
        if not content_type.lower().startswith("multipart/form-data"):
            raise Refusal(415, f"{path[1:]} takes a multipart/form-data upload with a file field 'image' "
                               f"(curl -F image=@photo.jpg); got Content-Type {content_type or 'none'}")
        body = await _read_body(receive, limit)

        async def stream():
            yield body

        # Starlette's parser (python-multipart underneath): RFC 7578 quoting, file vs text by the part's own
        # Content-Disposition; uploads are spooled to unnamed temporary files, whatever their file name.
        parser = MultiPartParser(headers, stream(), max_files=2, max_fields=len(fields) + 2, max_part_size=1024)
        try:
            form = await parser.parse()
        except MultiPartException as err:
            raise Refusal(400, f"the multipart body could not be read ({err}); expected one file field 'image' "
                               "(curl -F image=@photo.jpg)") from None
        try:
            items = form.multi_items()
            kinds = {name: "file" if isinstance(value, UploadFile) else "text" for name, value in items}
            expected = {"image": "file", **{name: "text" for name in fields}}
            if [name for name, _ in items].count("image") != 1 or any(expected.get(n) != k for n, k in kinds.items()):
                also = f" and optionally the text field {', '.join(sorted(fields))}" if fields else ""
                got = [f"{name[:40]} ({'file' if isinstance(value, UploadFile) else 'text'})" for name, value in items]
                raise Refusal(400, "expected one file upload in a multipart field named 'image' (curl -F "
                                   f"image=@photo.jpg){also}; got fields {got}")
            upload = Upload(data=await form["image"].read())
            if "alpha" in form:
                upload.alpha = _alpha(form["alpha"])
            return upload
        finally:
            await form.close()


async def _read_body(receive: Any, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413), a body slower than READ_TIMEOUT_S (408), or a
    client that left mid-body (499)."""
    body = bytearray()

    async def read() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                # Answered although nobody receives it: BentoML's TimeoutMiddleware, outside the door, waits for
                # a response to start, so a request that never answers would hold its task for the whole
                # traffic timeout (90 s), and `bentoml serve` would wait for that task before it stops.
                raise Refusal(499, f"the client closed the connection after {len(body)} bytes of its request body")
            body.extend(message.get("body", b""))
            if len(body) > limit:
                raise _too_large(len(body), limit)
            if not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(read(), READ_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise Refusal(408, f"the request body did not arrive within {READ_TIMEOUT_S:g} s (AGMM_READ_TIMEOUT_S); "
                           f"{len(body)} bytes came. Send the upload in one go.",
                      headers={"Connection": "close"}) from None
    return bytes(body)


def _too_large(size: int, limit: int) -> Refusal:
    return Refusal(413, f"the request body is {size} bytes; the limit is {limit} (set by AGMM_MAX_UPLOAD_BYTES). "
                        "Send a smaller image.")


def _alpha(text: str) -> float:
    try:
        alpha = float(text)
    except ValueError:
        alpha = math.nan
    if not 0.0 <= alpha <= 1.0:  # also refuses nan
        raise Refusal(400, f"alpha={text[:20]!r} is not a number in [0, 1] (the weight of the class colours)")
    return alpha


def _batch_upload(body: bytes) -> Upload:
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        request = None
    images = request.get("images") if isinstance(request, dict) else None
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise Refusal(400, 'segment_batch takes JSON {"images": ["<base64 of an image file>", ...]}; got '
                           f"{'invalid JSON' if request is None else 'another shape'}")
    if len(images) > MAX_BATCH_IMAGES:
        raise Refusal(413, f"segment_batch got {len(images)} images; the limit is {MAX_BATCH_IMAGES} per request "
                           "(AGMM_MAX_BATCH_IMAGES, reported by /info). Send them in several requests, or one "
                           "per request to /segment: the server batches concurrent requests itself.")
    return Upload(images=images)


def _without_body(scope: dict, upload: Upload) -> dict:
    """The scope BentoML sees: no body headers (it parses an empty JSON body), the upload in its state."""
    headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length",
                                                                  b"transfer-encoding")]
    state = scope.setdefault("state", {})
    state["agmm_upload"] = upload
    return {**scope, "headers": headers, "state": state}


def _empty_body(receive: Any) -> Any:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return await receive()  # after the body: waits for the client to disconnect, as BentoML expects
        sent = True
        return {"type": "http.request", "body": b"", "more_body": False}

    return replay


def _labels(tiles: "Tiles") -> np.ndarray:  # noqa: F821
    """The label map (H, W) uint8 of an image whose model outputs are all added, taken on the runner's device."""
    import torch

    with torch.inference_mode():
        return tiles.labels().cpu().numpy()


def _fractions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The share of the image's pixels per class (K,), summing to 1."""
    return np.bincount(labels.ravel(), minlength=num_classes) / labels.size


# ---------------------------------------------------------------------------------------------- the service

@bentoml.service(
    name="agmm_segmenter",
    # One worker on CPU: ONNX Runtime already uses every core inside one batch; more workers would each
    # load the model and fight over the same cores. On a GPU, one worker keeps the device for one process.
    workers=WORKERS,
    # A last resort behind the door's read timeout and the batcher's deadline, which answer first.
    traffic={"timeout": READ_TIMEOUT_S + max(60, 3 * (MAX_LATENCY_MS or 0) / 1000)},
    # glibc gives each thread that allocates its own heap; decoding and PNG encoding run on pool threads, so
    # every heap would end up holding freed image planes. Set in the workers' environment at their start.
    envs=[{"name": "MALLOC_ARENA_MAX", "value": "2"}],
)
class AgmmSegmenter:
    """DeepLabV3+ trained with the AGMM loss; concurrent requests batched by model inputs (serving/batcher.py)."""

    def __init__(self) -> None:
        import torch

        from agmm_deploy.runtime import load_runner  # torch and onnxruntime load in the worker only

        self.choice = choose_model()
        path = self.choice.path
        kwargs: dict[str, Any] = {}
        if path.suffix.lower() == ".onnx":
            # Batch sizes vary from call to call here; per-shape memory patterns would keep growing the arena.
            kwargs["mem_pattern"] = False
            if threads := _env_number("AGMM_ORT_THREADS", 0):
                kwargs["threads"] = threads
        self.runner = load_runner(path, device=os.environ.get("AGMM_DEVICE", "auto"), **kwargs)
        self.meta = self.runner.meta
        if self.runner.device.type == "cpu" and not self.runner.backend.startswith(("pytorch", "aoti")):
            # The model runs on its runtime's own thread pool (ONNX Runtime's is sized when the session is made,
            # above; PyTorch eager and AOTInductor packages run on torch's, so they keep it); torch
            # only pre- and post-processes here, an image per request thread. With its default of one OpenMP
            # thread per core, each request thread would start its own OpenMP team, whose threads spin after
            # every op on the cores the model needs.
            torch.set_num_threads(1)
        h, w = self.runner.input_size
        logger.info("AGMM model %s: backend=%s precision=%s device=%s input=%dx%d classes=%d (chosen by %s)", path,
                    self.runner.backend, self.runner.precision_used(), self.runner.device, h, w,
                    self.meta.num_classes, self.choice.chosen_by)
        if self.choice.folder is not None:
            logger.info("other artifacts in %s, and the setting that serves each: %s", self.choice.folder,
                        "; ".join(self.choice.others) or "none")
        self.batcher = self._start_batcher()

    def _start_batcher(self) -> "Batcher":  # noqa: F821
        """Times a full batch before the first request, derives what was not set, and starts the batcher.

        The first runs at a batch size size ONNX Runtime's memory arena (and build CUDA/TensorRT kernels), so
        doing them here keeps that delay out of the first requests. Defaults: on a GPU 16 inputs per batch
        (a GPU gains throughput from batching), waiting up to 2 inputs' time to fill one; on a CPU 8 and no
        wait (a batch runs at the images/s of single images there, so waiting only adds latency). A request may
        wait up to 3 full batches (at least 1 s) for the work ahead of it; its own work is bounded by
        AGMM_MAX_INPUTS, so the worst latency is about max_latency_ms + MAX_INPUTS x the time per input.
        """
        import prometheus_client  # here: BentoML sets up its multiprocess metrics dir before the worker starts
        import torch

        from agmm_deploy.inference import Tiles, chunks, run_slices
        from serving.batcher import Batcher

        on_gpu = self.runner.device.type == "cuda"
        batch = MAX_BATCH_SIZE or (16 if on_gpu else 8)
        h, w = self.runner.input_size
        gray = torch.full((3, h, w), 128, dtype=torch.uint8, device=self.runner.device)
        for size in (batch, 1, batch):
            tiles = [Tiles(gray, (h, w), self.meta.num_classes, mean=self.meta.mean, std=self.meta.std)
                       for _ in range(size)]
            start = time.perf_counter()
            for slices in chunks(tiles, batch):
                run_slices(self.runner.run, slices)
            tiles[-1].labels().cpu()
            batch_s = time.perf_counter() - start
        per_input_s = batch_s / batch
        latency_ms = MAX_LATENCY_MS or max(1000, math.ceil(3 * batch_s * 1000))
        wait_ms = BATCH_WAIT_MS if BATCH_WAIT_MS is not None else (2 * per_input_s * 1000 if on_gpu else 0.0)
        derived = [name for name, value in (("max_batch_size", MAX_BATCH_SIZE), ("max_latency_ms", MAX_LATENCY_MS),
                                            ("batch_wait_ms", BATCH_WAIT_MS)) if value is None]
        logger.info("batching for %s: a batch of %d model inputs takes %.0f ms; max_batch_size=%d max_latency_ms=%d "
                    "batch_wait_ms=%.0f (%s); at most %d model inputs per image", "cuda" if on_gpu else "cpu",
                    batch, batch_s * 1000, batch, latency_ms, wait_ms,
                    f"{', '.join(derived)} derived" if derived else "all set by AGMM_*", MAX_INPUTS)
        histogram = prometheus_client.Histogram("agmm_batch_inputs", "model inputs per batch run by the batcher",
                                                buckets=[2 ** i for i in range(int(math.log2(batch)) + 2)])
        return Batcher(lambda slices: run_slices(self.runner.run, slices), max_batch_size=batch,
                       max_latency_s=latency_ms / 1000, wait_s=wait_ms / 1000, seconds_per_input=per_input_s,
                       on_batch=histogram.observe)

    @bentoml.on_deployment
    def check_model() -> None:
        """Runs once in `bentoml serve`'s own process, before workers start: refuse to start without a model.

        (A worker failing in __init__ would be restarted forever instead.)
        """
        try:
            resolve_model_path()
        except (RuntimeError, FileNotFoundError, ValueError, bentoml.exceptions.NotFound) as err:
            raise SystemExit(str(err)) from None  # the sentence alone, no traceback

    # ---------------------------------------------------------------- the request path of one image

    def _decode(self, data: bytes, name: str) -> tuple[np.ndarray, "Tiles"]:  # noqa: F821
        """Bytes -> (uint8 RGB (H, W, 3), its Tiles on the runner's device); Refusal when over a limit.

        Runs in a worker thread of the event loop, so requests decode in parallel and a bad image is refused
        here, never queued.
        """
        from agmm_deploy.inference import image_tiles, input_count

        if len(data) > MAX_UPLOAD_BYTES:
            raise Refusal(413, f"{name} is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES} (AGMM_MAX_UPLOAD_BYTES)")
        try:
            image = transforms.decode_image(data, max_pixels=MAX_PIXELS, name=name)
        except transforms.ImageDecodeError as err:
            raise Refusal(400, str(err)) from None
        h, w = image.shape[:2]
        th, tw = self.runner.input_size
        cost = input_count(h, w, (th, tw))
        if cost > MAX_INPUTS:
            raise Refusal(413, f"{name} is {w}x{h} pixels, which the {tw}x{th} model covers with {cost} "
                               f"sliding-window tiles; the limit is {MAX_INPUTS} model inputs per image "
                               "(AGMM_MAX_INPUTS, reported by /info). Downscale it or send it in parts.")
        return image, image_tiles(self.runner, image, name=name)

    async def _segment(self, data: bytes, answer: Callable[[np.ndarray, np.ndarray], Any],
                       name: str = "the image") -> tuple[Any, int]:
        """Decode and check at the door, the model through the batcher, then the label map and ``answer`` in one
        worker thread.

        Args:
            answer: (image (H, W, 3) uint8, label map (H, W) uint8) -> what the endpoint sends (PNG bytes, ...).
        Returns:
            ``answer``'s result and the model inputs of the batch that ran the image's last input; Refusal on any
            failure.
        """
        from serving.batcher import Overloaded

        image, tiles = await anyio.to_thread.run_sync(self._decode, data, name)
        try:
            result = await self.batcher.segment(tiles)
        except Overloaded as err:
            raise Refusal(503, str(err), headers={"Retry-After": str(err.retry_after_s)}) from None
        except RuntimeError as err:  # the model failed; logged with its traceback by the batcher
            raise Refusal(500, str(err)) from None
        # Here, not in the batcher: the argmax of each image runs in its own request's thread (on the runner's
        # device), while the batcher's thread already runs the next batch; the answer is made in that same
        # thread, one hop instead of one for the argmax and another for the encoding.
        answered = await anyio.to_thread.run_sync(lambda: answer(image, _labels(result.tiles)))
        return answered, result.batch_size

    def _png(self, image: np.ndarray, labels: np.ndarray) -> bytes:
        """The label map as a palette PNG (an ``answer`` of _segment)."""
        return transforms.palette_png(labels, self.meta.palette)

    @bentoml.api
    async def segment(self, ctx: bentoml.Context) -> Annotated[Path, ContentType("image/png")]:
        """The label map as a palette PNG at the image's size: pixel value = class id, colours = palette."""
        try:
            png, batch_size = await self._segment(ctx.request.state.agmm_upload.data, self._png)
        except Refusal as refusal:
            return refusal.response("/segment", ctx)
        return Response(png, media_type="image/png", headers={"X-AGMM-Batch-Size": str(batch_size)})

    @bentoml.api
    async def segment_json(self, ctx: bentoml.Context) -> ClassFractions:
        """Per-class pixel fractions of the predicted label map (they sum to 1)."""
        try:
            (fractions, (h, w)), batch_size = await self._segment(
                ctx.request.state.agmm_upload.data,
                lambda image, labels: (_fractions(labels, self.meta.num_classes), labels.shape))
        except Refusal as refusal:
            return refusal.response("/segment_json", ctx)
        classes = list(self.meta.classes)
        return ClassFractions(classes=classes, fractions=dict(zip(classes, fractions.tolist())), height=h, width=w,
                              batch_size=batch_size)

    @bentoml.api
    async def overlay(self, ctx: bentoml.Context) -> Annotated[Path, ContentType("image/png")]:
        """The image blended with its predicted class colours (``alpha`` = weight of the colours), PNG."""
        upload = ctx.request.state.agmm_upload
        try:
            png, batch_size = await self._segment(upload.data, lambda image, labels: transforms.encode_png(
                transforms.overlay(image, labels, self.meta.palette, upload.alpha)))
        except Refusal as refusal:
            return refusal.response("/overlay", ctx)
        return Response(png, media_type="image/png", headers={"X-AGMM-Batch-Size": str(batch_size)})

    @bentoml.api
    async def segment_batch(self, ctx: bentoml.Context) -> list[ImageResult]:
        """Segments base64-encoded images (JPEG/PNG/WebP/TIFF bytes) of any sizes; a bad image gets its error."""

        async def one(index: int, text: str) -> ImageResult:
            try:
                data = base64.b64decode(text, validate=True)
            except binascii.Error as err:
                return ImageResult(error=f"image {index} is not valid base64 ({err})")
            def answer(image: np.ndarray, labels: np.ndarray) -> ImageResult:
                return ImageResult(height=labels.shape[0], width=labels.shape[1],
                                   fractions=_fractions(labels, self.meta.num_classes).tolist(),
                                   mask_png=base64.b64encode(self._png(image, labels)).decode("ascii"))

            try:
                result, batch_size = await self._segment(data, answer, name=f"image {index}")
            except Refusal as refusal:
                if refusal.status >= 500:
                    raise
                return ImageResult(error=refusal.message)
            result.batch_size = batch_size
            return result

        tasks = [asyncio.ensure_future(one(i, text)) for i, text in enumerate(ctx.request.state.agmm_upload.images)]
        try:
            return list(await asyncio.gather(*tasks))
        except Refusal as refusal:  # overloaded or the model failed: the whole request, with the sentence
            for task in tasks:
                task.cancel()  # their queued work is dropped, never run
            return refusal.response("/segment_batch", ctx)

    @bentoml.api
    def info(self) -> dict[str, Any]:
        """What is being served: classes, palette, input size, backend, precision, batching and limits."""
        h, w = self.runner.input_size
        return {
            "classes": list(self.meta.classes),
            "palette": [list(color) for color in self.meta.palette],
            "input_size": [h, w],
            "mean": list(self.meta.mean),
            "std": list(self.meta.std),
            "dataset": self.meta.dataset,
            "backend": self.runner.backend,
            "precision": self.runner.precision,  # what the artifact's metadata says
            "precision_used": self.runner.precision_used(),  # what the runtime computes in, e.g. fp32,tf32=on
            "device": str(self.runner.device),
            "model": self.runner.path.name,
            "model_folder": None if self.choice.folder is None else str(self.choice.folder),
            "chosen_by": self.choice.chosen_by,
            "other_artifacts": list(self.choice.others),
            "max_batch_size": self.batcher.max_batch_size,
            "max_latency_ms": round(self.batcher.max_latency_s * 1000),
            "batch_wait_ms": round(self.batcher.wait_s * 1000, 1),
            "max_upload_bytes": MAX_UPLOAD_BYTES,
            "max_pixels": MAX_PIXELS,
            "max_inputs": MAX_INPUTS,
            "max_batch_images": MAX_BATCH_IMAGES,
            "read_timeout_s": READ_TIMEOUT_S,
        }


AgmmSegmenter.add_asgi_middleware(RequestDoor)
