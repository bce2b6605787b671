"""The segmentation service: `bentoml serve --host 127.0.0.1` in the project root starts it (see bentofile.yaml).

The model comes from ``AGMM_MODEL`` (any artifact the runtime table reads, or an agmm-export output folder) or
from the BentoML model store (``AGMM_BENTO_MODEL=name:version``); from a folder the fp32 artifact unless
``AGMM_PRECISION`` or ``AGMM_MODEL_FILE`` picks another (serving/artifacts.py). Preprocessing comes from the
model's own metadata. Every setting is read once (serving/settings.py), logged at start and reported by /info.
The endpoints, their bodies and refusals are the API table (serving/api.py), served as an OpenAPI document at
/docs.json with Swagger UI at /docs.

The request path, in order:
1. ``RequestDoor`` (serving/door.py, ASGI middleware before BentoML) reads and bounds the body and parses its
   fields (400/408/413/415); BentoML never parses a body here.
2. The endpoint decodes the image in a thread pool (requests in parallel), prices it in model inputs (1
   letterboxed canvas, or its sliding-window tiles) and refuses what is over the limits (400/413), so a bad
   image never waits behind good work.
3. The decoded uint8 image goes, as ``Tiles`` on the runner's device, to ``Batcher`` (serving/batcher.py), which
   runs the inputs of concurrent requests together, counting model inputs, and answers 503 with Retry-After
   when the queue would keep a request past ``max_latency_ms``. Pre-processing, the model and the gathering of
   its outputs at the image's size run there as torch ops on the runner's device (agmm_deploy.inference).
4. The endpoint takes the argmax on the runner's device (only the uint8 label map leaves it) and encodes the PNG
   (or counts the JSON fractions) in the same worker thread, one hop for both, while the batcher runs the next
   batch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import time
from pathlib import Path
from typing import Annotated, Any, Callable

import anyio
import bentoml
import numpy as np
from bentoml.validators import ContentType
from starlette.responses import Response

from agmm_deploy import transforms
from serving.api import ClassFractions, ImageResult
from serving import connections
from serving.artifacts import ModelChoice, choose_model  # noqa: F401 (ModelChoice: for callers of choose_model)
from serving.door import Refusal, RequestDoor
from serving.settings import SettingsError, read_settings

# BentoML configures the "bentoml" logger tree in its workers and disables loggers it does not know.
logger = logging.getLogger("bentoml.agmm_deploy")

try:
    # Read once, when the module is imported (the CLI process and every worker); /info reports them all.
    SETTINGS = read_settings()
except SettingsError as err:
    raise SystemExit(str(err)) from None  # the sentence alone, before BentoML starts anything
# The header deadline and the connection cap live in uvicorn's protocol, which BentoML's worker makes after
# importing this module (serving/connections.py).
connections.install(SETTINGS.header_timeout_s, SETTINGS.max_connections)


def resolve_model_path() -> Path:
    """The artifact file this server runs (serving.artifacts.choose_model)."""
    return choose_model().path


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
    workers=SETTINGS.workers,
    # A last resort behind the door's read timeout and the batcher's deadline, which answer first.
    traffic={"timeout": SETTINGS.read_timeout_s + max(60, 3 * (SETTINGS.max_latency_ms or 0) / 1000)},
    # glibc gives each thread that allocates its own heap; decoding and PNG encoding run on pool threads, so
    # every heap would end up holding freed image planes. Set in the workers' environment at their start.
    envs=[{"name": "MALLOC_ARENA_MAX", "value": "2"}],
)
class AgmmSegmenter:
    """DeepLabV3+ trained with the AGMM loss; concurrent requests batched by model inputs (serving/batcher.py)."""

    def __init__(self) -> None:
        import torch

        from agmm_deploy.runtime import backend_for, load_runner  # torch and onnxruntime load in the worker only

        logger.info("settings: %s", SETTINGS.describe())
        self.choice = choose_model(SETTINGS)
        path = self.choice.path
        row = backend_for(path)  # the runtime table's row: what its loader takes, whose threads it runs on
        # Batch sizes vary from call to call here; per-shape memory patterns would keep growing ONNX Runtime's arena.
        options = {"mem_pattern": False, "threads": SETTINGS.ort_threads or None}
        kwargs = {name: value for name, value in options.items() if name in row.load_options and value is not None}
        self.runner = load_runner(path, device=SETTINGS.device, **kwargs)
        self.meta = self.runner.meta
        if self.runner.device.type == "cpu" and not row.torch_threads:
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
        settings = SETTINGS
        batch = settings.max_batch_size or (16 if on_gpu else 8)
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
        latency_ms = settings.max_latency_ms or max(1000, math.ceil(3 * batch_s * 1000))
        wait_ms = settings.batch_wait_ms if settings.batch_wait_ms is not None else (
            2 * per_input_s * 1000 if on_gpu else 0.0)
        derived = [name for name in ("max_batch_size", "max_latency_ms", "batch_wait_ms")
                   if getattr(settings, name) is None]
        logger.info("batching for %s: a batch of %d model inputs takes %.0f ms; max_batch_size=%d max_latency_ms=%d "
                    "batch_wait_ms=%.0f (%s); at most %d model inputs per image", "cuda" if on_gpu else "cpu",
                    batch, batch_s * 1000, batch, latency_ms, wait_ms,
                    f"{', '.join(derived)} derived" if derived else "all set by AGMM_*", settings.max_inputs)
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
            choose_model(SETTINGS)
        except (RuntimeError, FileNotFoundError, ValueError, bentoml.exceptions.NotFound) as err:
            raise SystemExit(str(err)) from None  # the sentence alone, no traceback

    # ---------------------------------------------------------------- the request path of one image

    def _decode(self, data: bytes, name: str) -> tuple[np.ndarray, "Tiles"]:  # noqa: F821
        """Bytes -> (uint8 RGB (H, W, 3), its Tiles on the runner's device); Refusal when over a limit.

        Runs in a worker thread of the event loop, so requests decode in parallel and a bad image is refused
        here, never queued.
        """
        from agmm_deploy.inference import image_tiles, input_count

        limit = SETTINGS.max_upload_bytes
        if len(data) > limit:
            raise Refusal(413, f"{name} is {len(data)} bytes; the limit is {limit} (AGMM_MAX_UPLOAD_BYTES)")
        try:
            image = transforms.decode_image(data, max_pixels=SETTINGS.max_pixels, name=name)
        except transforms.ImageDecodeError as err:
            raise Refusal(400, str(err)) from None
        h, w = image.shape[:2]
        th, tw = self.runner.input_size
        cost = input_count(h, w, (th, tw))
        if cost > SETTINGS.max_inputs:
            raise Refusal(413, f"{name} is {w}x{h} pixels, which the {tw}x{th} model covers with {cost} "
                               f"sliding-window tiles; the limit is {SETTINGS.max_inputs} model inputs per image "
                               "(AGMM_MAX_INPUTS, reported by /info). Downscale it or send it in parts.")
        return image, image_tiles(self.runner, image, name=name)

    async def _segment(self, data: bytes, answer: Callable[[np.ndarray, np.ndarray], Any],
                       name: str = "the image", request: object = None) -> tuple[Any, int]:
        """Decode and check at the door, the model through the batcher, then the label map and ``answer`` in one
        worker thread.

        Args:
            answer: (image (H, W, 3) uint8, label map (H, W) uint8) -> what the endpoint sends (PNG bytes, ...).
            request: a key shared by the images of one request (the batcher never counts them against each
                other); None: the image is the request.
        Returns:
            ``answer``'s result and the model inputs of the batch that ran the image's last input; Refusal on any
            failure.
        """
        from serving.batcher import Overloaded

        image, tiles = await anyio.to_thread.run_sync(self._decode, data, name)
        try:
            result = await self.batcher.segment(tiles, request)
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
                result, batch_size = await self._segment(data, answer, name=f"image {index}", request=ctx)
            except Refusal as refusal:
                if refusal.status >= 500:
                    raise
                return ImageResult(error=refusal.message)
            result.batch_size = batch_size
            return result

        tasks = [asyncio.ensure_future(one(i, text)) for i, text in enumerate(ctx.request.state.agmm_upload.base64_images)]
        try:
            return list(await asyncio.gather(*tasks))
        except Refusal as refusal:  # overloaded or the model failed: the whole request, with the sentence
            for task in tasks:
                task.cancel()  # their queued work is dropped, never run
            return refusal.response("/segment_batch", ctx)

    @bentoml.api
    def info(self) -> dict[str, Any]:
        """What is being served: classes, palette, input size, backend, precision, batching, admission, limits and
        every setting."""
        from serving.batcher import ADMISSION

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
            "max_upload_bytes": SETTINGS.max_upload_bytes,
            "max_pixels": SETTINGS.max_pixels,
            "max_inputs": SETTINGS.max_inputs,
            "max_batch_images": SETTINGS.max_batch_images,
            "read_timeout_s": SETTINGS.read_timeout_s,
            "admission": ADMISSION,
            "connections": connections.connection_counts(),
            "settings": SETTINGS.by_variable(),
        }


AgmmSegmenter.add_asgi_middleware(RequestDoor, settings=SETTINGS)
