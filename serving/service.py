"""The segmentation service: `bentoml serve` in the project root starts it (see bentofile.yaml).

The model comes from ``AGMM_MODEL`` (an .onnx file, a TensorRT .engine with its .json sidecar, or a .pt
checkpoint) or from the BentoML model store (``AGMM_BENTO_MODEL=name:version``). Preprocessing comes from the
model's own metadata: images are letterboxed to the model input, and the logits are mapped back to the
original size before the argmax, so every mask has exactly the uploaded image's size.

Endpoints (all POST):
    /segment          multipart ``image`` -> label map as a palette PNG (pixel value = class id)
    /segment_json     multipart ``image`` -> {"classes", "fractions", "height", "width", "batch_size"}
    /overlay          multipart ``image`` -> the image blended with the class colours, PNG
    /segment_batch    JSON {"images": [base64 image bytes, ...]} -> one result per image; the only batchable
                      method: the three endpoints above send their image through it, so concurrent requests
                      to any of them share batches
    /info             classes, palette, input size, backend, precision, batching and input limits

Bad input gets a 4xx with {"error": "..."} and the worker keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import bentoml
import numpy as np
import pydantic
from bentoml.validators import ContentType
from starlette.responses import JSONResponse, Response

from agmm_deploy import transforms

# BentoML configures the "bentoml" logger tree in its workers and disables loggers it does not know.
logger = logging.getLogger("bentoml.agmm_deploy")

MODEL_SUFFIXES = (".engine", ".plan", ".trt", ".onnx", ".pt", ".pth", ".ckpt")
NO_MODEL_MESSAGE = ("No model to serve: set AGMM_MODEL=path/to/model.onnx (or a TensorRT .engine, or a .pt "
                    "checkpoint), or AGMM_BENTO_MODEL=<tag> of a model saved in the BentoML model store.")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


# Limits and batching, read once when the service module is imported (CLI process and every worker).
MAX_UPLOAD_BYTES = _env_int("AGMM_MAX_UPLOAD_BYTES", 20 * 1024 * 1024)
# Unletterboxing holds K float32 planes at the original size: 8 Mpx x 21 classes is 0.7 GB at the peak.
MAX_PIXELS = _env_int("AGMM_MAX_PIXELS", 8 * 1024 * 1024)
MAX_BATCH_SIZE = _env_int("AGMM_MAX_BATCH_SIZE", 8)
# Requests waiting longer than this are answered 503 by BentoML's dispatcher; a queued request can wait for
# one full batch to finish and then for its own, so keep it at >= 3x the time of a full batch
# (ResNet-18, 512x512, batch 8 on 2 CPU cores: about 3 s; on a GPU: tens of ms).
MAX_LATENCY_MS = _env_int("AGMM_MAX_LATENCY_MS", 10_000)
WORKERS = _env_int("AGMM_WORKERS", 1)


class ImageResult(pydantic.BaseModel):
    """One image's answer from the batched method; ``error`` is set instead when the image was refused."""

    height: int = 0
    width: int = 0
    fractions: list[float] = []  # share of the image's pixels per class; sums to 1
    mask_png: str = ""  # base64 palette PNG at the original size; pixel value = class id
    batch_size: int = 0  # how many images the model ran together with this one
    error: str | None = None


class ClassFractions(pydantic.BaseModel):
    classes: list[str]
    fractions: dict[str, float]
    height: int
    width: int
    batch_size: int


def resolve_model_path() -> Path:
    """The model file named by AGMM_MODEL, or found in the BentoML store entry named by AGMM_BENTO_MODEL."""
    if path := os.environ.get("AGMM_MODEL"):
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"AGMM_MODEL={path} does not exist; expected an .onnx file, a TensorRT "
                                    ".engine or a .pt checkpoint")
        return path
    if tag := os.environ.get("AGMM_BENTO_MODEL"):
        import torch

        folder = Path(bentoml.models.get(tag).path)
        found = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in MODEL_SUFFIXES]
        if not torch.cuda.is_available():  # an engine cannot run without a GPU; take the ONNX file beside it
            found = [p for p in found if p.suffix.lower() not in (".engine", ".plan", ".trt")]
        found.sort(key=lambda p: MODEL_SUFFIXES.index(p.suffix.lower()))
        if not found:
            raise FileNotFoundError(f"BentoML model {tag} ({folder}) holds no {'/'.join(MODEL_SUFFIXES)} file "
                                    "this machine can run")
        return found[0]
    raise RuntimeError(NO_MODEL_MESSAGE)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class RequestGuard:
    """ASGI middleware in front of the endpoints; answers bad requests with a JSON 4xx before BentoML parses them.

    - 413 when the body is over the limit: from Content-Length before reading, or while reading a body sent
      without one.
    - 415 when an image endpoint gets anything but multipart/form-data, or /segment_batch anything but JSON.
    - 400 when a multipart body lacks an ``image`` file upload or carries unknown fields.
    BentoML 1.4 itself answers an unknown binary field or a misplaced body with a 500, and downloads a URL
    given as text in a file field; none of that reaches it.
    """

    def __init__(self, app: Any, max_bytes: int, batch_max_bytes: int, upload_fields: dict[str, set[str]]) -> None:
        self.app = app
        self.max_bytes, self.batch_max_bytes = max_bytes, batch_max_bytes
        self.upload_fields = upload_fields

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        route = scope["path"].rstrip("/").rsplit("/", 1)[-1]
        # /segment_batch carries base64 (4/3 of the bytes) of up to a batch of images per request.
        limit = self.batch_max_bytes if route == "segment_batch" else self.max_bytes
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await _too_large(int(length), limit)(scope, receive, send)
            return
        content_type = headers.get(b"content-type", b"")
        if route == "segment_batch" and not content_type.lower().startswith(b"application/json"):
            # BentoML answers a multipart body here with a 500.
            await _error(415, 'segment_batch takes JSON: {"images": ["<base64 of an image file>", ...]}; got '
                              f"Content-Type {content_type.decode('latin-1') or 'none'}")(scope, receive, send)
            return
        allowed = self.upload_fields.get(route)
        if allowed is None:
            await self.app(scope, receive, send)
            return
        if not content_type.lower().startswith(b"multipart/form-data"):
            # Other bodies reach BentoML's form parser, which fetches a URL given for a file field (or fails
            # with a 500); images come as uploads only.
            await _error(415, f"{route} takes a multipart/form-data upload with a file field 'image' "
                              f"(curl -F image=@photo.jpg); got Content-Type "
                              f"{content_type.decode('latin-1') or 'none'}")(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                await _too_large(len(body), limit)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        names, files = multipart_fields(content_type, bytes(body))
        if "image" not in files or names.count("image") > 1 or not set(names) <= allowed:
            message = (f"expected one file upload in a multipart field named 'image' (curl -F image=@photo.jpg)"
                       f"{' and optionally ' + ', '.join(sorted(allowed - {'image'})) if allowed - {'image'} else ''}"
                       f"; got fields {names}")
            await _error(400, message)(scope, receive, send)
            return

        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def _too_large(size: int, limit: int) -> JSONResponse:
    return _error(413, f"the request body is {size} bytes; the limit is {limit} (set by AGMM_MAX_UPLOAD_BYTES). "
                       "Send a smaller image.")


def multipart_fields(content_type: bytes, body: bytes) -> tuple[list[str], set[str]]:
    """(names of all fields, names of the fields that are file uploads) of a multipart/form-data body."""
    match = re.search(rb'boundary="?([^";]+)"?', content_type, flags=re.IGNORECASE)
    names, files = [], set()
    for part in body.split(b"--" + match.group(1))[1:] if match else []:
        head = part.split(b"\r\n\r\n", 1)[0]
        if found := re.search(rb'\bname="([^"]*)"', head):
            names.append(found.group(1).decode("utf-8", "replace"))
            if re.search(rb'\bfilename="', head):
                files.add(names[-1])
    return names, files


@bentoml.service(
    name="agmm_segmenter",
    # One worker on CPU: ONNX Runtime already uses every core inside one batch; more workers would each
    # load the model and fight over the same cores. On a GPU, one worker keeps the device for one process.
    workers=WORKERS,
    traffic={"timeout": max(60, 3 * MAX_LATENCY_MS // 1000)},
    # The endpoints reach segment_batch through BentoML's in-process client. By default it replaces its
    # connection every 100 requests or 300 s and closes the old one under requests still in flight, which
    # fails them ("Server disconnected"); in-process there is nothing to refresh.
    runner_connection={"max_requests": 2**62, "max_age": 1e12},
    # glibc gives each thread that allocates its own heap; BentoML runs batches on whichever pool thread is free,
    # so every heap ends up holding freed 20 MB logits planes (ResNet-18 512x512, random batches 1..8 on 8
    # threads: RSS +10.4% with the default, +2% with 2 heaps). Set in the workers' environment at their start.
    envs=[{"name": "MALLOC_ARENA_MAX", "value": "2"}],
)
class AgmmSegmenter:
    """DeepLabV3+ trained with the AGMM loss, served with adaptive batching."""

    def __init__(self) -> None:
        from agmm_deploy.runtime import load_runner  # torch and onnxruntime load in the worker only

        path = resolve_model_path()
        kwargs: dict[str, Any] = {}
        if path.suffix.lower() == ".onnx":
            # Batch sizes vary from call to call here; per-shape memory patterns would keep growing the arena.
            kwargs["mem_pattern"] = False
            if threads := _env_int("AGMM_ORT_THREADS", 0):
                kwargs["threads"] = threads
        self.runner = load_runner(path, device=os.environ.get("AGMM_DEVICE", "auto"), **kwargs)
        self.meta = self.runner.meta
        self.fill = transforms.pad_value(self.meta.mean)
        h, w = self.runner.input_size
        logger.info("AGMM model %s: backend=%s precision=%s input=%dx%d classes=%d", path, self.runner.backend,
                    self.runner.precision, h, w, self.meta.num_classes)
        self._warm_up()

    def _warm_up(self) -> None:
        """Runs one full batch before the first request, and checks max_latency_ms against its time.

        The first run at a batch size sizes ONNX Runtime's memory arena (and builds CUDA/TensorRT kernels), so
        doing it here keeps that delay out of the first requests and the memory growth out of serving time.
        """
        batch = min(MAX_BATCH_SIZE, self.runner.max_batch)
        h, w = self.runner.input_size
        gray = list(np.full((batch, h, w, 3), self.fill, dtype=np.uint8))
        self._predict_labels(gray)
        self._predict_labels(gray[:1])
        start = time.perf_counter()
        self._predict_labels(gray)
        batch_seconds = time.perf_counter() - start
        logger.info("warm-up: a batch of %d takes %.0f ms; max_batch_size=%d max_latency_ms=%d", batch,
                    batch_seconds * 1000, MAX_BATCH_SIZE, MAX_LATENCY_MS)
        if MAX_LATENCY_MS < 3 * batch_seconds * 1000:
            logger.warning("max_latency_ms=%d is under 3x the time of a full batch (%.0f ms): under load, "
                           "requests will be answered 503. Raise AGMM_MAX_LATENCY_MS or lower "
                           "AGMM_MAX_BATCH_SIZE.", MAX_LATENCY_MS, batch_seconds * 1000)

    @bentoml.on_deployment
    def check_model() -> None:
        """Runs once in `bentoml serve`'s own process, before workers start: refuse to start without a model.

        (A worker failing in __init__ would be restarted forever instead.)
        """
        try:
            resolve_model_path()
        except (RuntimeError, FileNotFoundError, bentoml.exceptions.NotFound) as err:
            raise SystemExit(str(err)) from None  # the sentence alone, no traceback

    # ---------------------------------------------------------------- the one batchable inference method

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def segment_batch(self, images: list[str]) -> list[ImageResult]:
        """Segments base64-encoded images (JPEG/PNG/WebP/TIFF bytes) of any sizes, gathered into one batch."""
        decoded: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for i, text in enumerate(images):
            try:
                data = base64.b64decode(text, validate=True)
                if len(data) > MAX_UPLOAD_BYTES:
                    raise transforms.ImageDecodeError(f"image {i} is {len(data)} bytes; the limit is "
                                                      f"{MAX_UPLOAD_BYTES} (AGMM_MAX_UPLOAD_BYTES)")
                decoded.append(transforms.decode_image(data, max_pixels=MAX_PIXELS, name=f"image {i}"))
                errors.append(None)
            except (binascii.Error, ValueError) as err:  # ImageDecodeError is a ValueError
                decoded.append(None)
                errors.append(str(err) if not isinstance(err, binascii.Error)
                              else f"image {i} is not valid base64 ({err})")
        valid = [image for image in decoded if image is not None]
        labels = iter(self._predict_labels(valid) if valid else [])
        results = []
        for image, error in zip(decoded, errors):
            if image is None:
                results.append(ImageResult(error=error))
                continue
            label_map = next(labels)
            counts = np.bincount(label_map.ravel(), minlength=self.meta.num_classes)
            results.append(ImageResult(
                height=label_map.shape[0], width=label_map.shape[1],
                fractions=(counts / label_map.size).tolist(),
                mask_png=base64.b64encode(transforms.palette_png(label_map, self.meta.palette)).decode("ascii"),
                batch_size=len(valid),
            ))
        return results

    def _predict_labels(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 RGB images (H_i, W_i, 3) -> label maps (H_i, W_i) uint8, the model run on all of them together.

        Exactly what agmm-predict does (agmm_deploy.inference.segment_images): an image that fits the model
        input is letterboxed and its scores are resized back before the argmax; a larger one is tiled at full
        resolution with the official 2/3 overlap instead of being shrunk below the scales the model was
        trained on.
        """
        from agmm_deploy.inference import segment_images

        return segment_images(self.runner, images)

    # ---------------------------------------------------------------- multipart endpoints for one image

    async def _segment_upload(self, image: Path) -> ImageResult | JSONResponse:
        """Sends one uploaded file through the batchable method (BentoML batches calls arriving together)."""
        size = image.stat().st_size
        if size > MAX_UPLOAD_BYTES:
            return _error(413, f"the image is {size} bytes; the limit is {MAX_UPLOAD_BYTES} (AGMM_MAX_UPLOAD_BYTES)")
        if size == 0:
            return _error(400, "the image field is empty; expected the bytes of a JPEG, PNG, WebP or TIFF image")
        data = await anyio.to_thread.run_sync(image.read_bytes)
        # The call goes through BentoML's in-process client as JSON (base64 text), so it reaches the
        # adaptive-batching dispatcher like any HTTP request would.
        (result,) = await self.to_async.segment_batch([base64.b64encode(data).decode("ascii")])
        if result.error is not None:
            return _error(400, result.error.replace("image 0", "the image", 1))
        return result

    @bentoml.api
    async def segment(self, image: Path) -> Annotated[Path, ContentType("image/png")]:
        """The label map as a palette PNG at the image's size: pixel value = class id, colours = palette."""
        result = await self._segment_upload(image)
        if isinstance(result, JSONResponse):
            return result  # BentoML passes Starlette responses through unchanged
        return Response(base64.b64decode(result.mask_png), media_type="image/png",
                        headers={"X-AGMM-Batch-Size": str(result.batch_size)})

    @bentoml.api
    async def segment_json(self, image: Path) -> ClassFractions:
        """Per-class pixel fractions of the predicted label map (they sum to 1)."""
        result = await self._segment_upload(image)
        if isinstance(result, JSONResponse):
            return result
        classes = list(self.meta.classes)
        return ClassFractions(classes=classes, fractions=dict(zip(classes, result.fractions)),
                              height=result.height, width=result.width, batch_size=result.batch_size)

    @bentoml.api
    async def overlay(self, image: Path, alpha: float = 0.5) -> Annotated[Path, ContentType("image/png")]:
        """The image blended with its predicted class colours (``alpha`` = weight of the colours), PNG."""
        if not 0.0 <= alpha <= 1.0:
            return _error(400, f"alpha={alpha} is outside [0, 1]")
        result = await self._segment_upload(image)
        if isinstance(result, JSONResponse):
            return result

        def render() -> bytes:
            rgb = transforms.read_image(image, max_pixels=MAX_PIXELS)
            labels = _palette_indices(base64.b64decode(result.mask_png))
            return transforms.encode_png(transforms.overlay(rgb, labels, self.meta.palette, alpha))

        return Response(await anyio.to_thread.run_sync(render), media_type="image/png",
                        headers={"X-AGMM-Batch-Size": str(result.batch_size)})

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
            "precision": self.runner.precision,
            "model": self.runner.path.name,
            "max_batch_size": MAX_BATCH_SIZE,
            "max_latency_ms": MAX_LATENCY_MS,
            "max_upload_bytes": MAX_UPLOAD_BYTES,
            "max_pixels": MAX_PIXELS,
        }


def _palette_indices(png: bytes) -> np.ndarray:
    """The class ids stored in a palette PNG (H, W) uint8."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image, dtype=np.uint8)


AgmmSegmenter.add_asgi_middleware(
    RequestGuard, max_bytes=MAX_UPLOAD_BYTES + 64 * 1024,  # + multipart framing
    batch_max_bytes=(MAX_UPLOAD_BYTES * 4 // 3 + 1024) * MAX_BATCH_SIZE + 64 * 1024,
    upload_fields={"segment": {"image"}, "segment_json": {"image"}, "overlay": {"image", "alpha"}},
)
