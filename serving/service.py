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
2. The endpoint reads each image's header in a thread pool (requests in parallel), checks it against the
   per-image limits (pixels, decoded bytes, frames, JPEG scans: agmm_deploy.decode), prices it in model inputs
   (1 letterboxed canvas, or its sliding-window tiles, on its upright size) and the request as a whole
   (AGMM_MAX_REQUEST_PIXELS, AGMM_MAX_DECODED_BYTES), refusing what is over (400/413) before any pixel is
   decoded; then it decodes. A bad image never waits behind good work.
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
import json
import logging
import math
import threading
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
from serving.label_studio import LabelStudioSettings, Refused, deferred_app, label_studio_app
from serving.memory import start_release_thread
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


def _model_version(runner: "Runner") -> str:  # noqa: F821
    """The served model's name for Label Studio and /info: the file's stem and the first 12 hex digits of the
    checkpoint's sha256 from its metadata, when it says."""
    sha = str(getattr(runner, "fields", None) and runner.fields.get("checkpoint_sha256") or "")
    return f"{runner.path.stem}-{sha[:12]}" if sha else runner.path.stem


def _fractions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The share of the image's pixels per class (K,), summing to 1."""
    return np.bincount(labels.ravel(), minlength=num_classes) / labels.size


# ---------------------------------------------------------------------------------------------- the service

# Label Studio's ML backend protocol under /label-studio (serving/label_studio.py): BentoML mounts ASGI apps on the
# class, and the backend needs this instance's batcher, so it is built from the running instance on its first
# request.
@bentoml.asgi_app(deferred_app(lambda: bentoml.get_current_service().label_studio), path="/label-studio")
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
    """DeepLabV3+ trained with the AGMM loss; concurrent requests batched by model inputs (serving/batcher.py).

    A training job started from Label Studio (serving/label_studio.py) hands its model to ``swap_model`` once
    its parity passed; the service answers with the old model until then and swaps between two batches. With
    AGMM_WORKERS > 1 only the worker that ran the job is handed the model: every worker also polls the jobs'
    folder (AGMM_LS_TRAIN_OUT) for a newer ``ready.json`` (written last, only when parity passed) every
    JOB_POLL_S and swaps to it itself (``_follow_jobs``).
    """

    JOB_POLL_S = 5.0

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
        # Freed request buffers back to the kernel every 10 s (reference cycles of refusals, glibc's heaps):
        # without it a worker's memory stays at its peak after bursts (serving/memory.py says why; benchmarks/soak.py).
        self.memory_release = start_release_thread()
        self.model_version = _model_version(self.runner)
        self.swap_error: str | None = None  # why the last new model was not taken, for /info
        self._swapping = threading.Lock()
        ls_settings = LabelStudioSettings.from_env()
        self.label_studio = label_studio_app(self._segment_images, self.meta.classes, lambda: self.model_version,
                                             ls_settings, on_new_model=self.swap_model,
                                             price=self._price_task_image)
        logger.info("serving model_version %s; Label Studio ML backend at /label-studio", self.model_version)
        if SETTINGS.workers > 1:
            threading.Thread(target=self._follow_jobs, args=(ls_settings.train_out,), name="agmm-follow-jobs",
                             daemon=True).start()

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

    def _price(self, data: bytes, name: str) -> transforms.ImageHeader:
        """The image's header, checked against the per-image limits and priced in model inputs, before any pixel
        is decoded; Refusal when over a limit (400 for the image itself, 413 for its cost).

        The inputs are counted on ``header.upright_size``, the size decode_image returns (after EXIF rotation).
        """
        from agmm_deploy.inference import input_count

        limit = SETTINGS.max_upload_bytes
        if len(data) > limit:
            raise Refusal(413, f"{name} is {len(data)} bytes; the limit is {limit} (AGMM_MAX_UPLOAD_BYTES)")
        try:
            header = transforms.read_image_header(data, name)
            transforms.check_image_header(header, name, max_pixels=SETTINGS.max_pixels)
        except transforms.ImageDecodeError as err:
            raise Refusal(400, str(err)) from None
        w, h = header.upright_size
        th, tw = self.runner.input_size
        cost = input_count(h, w, (th, tw))
        if cost > SETTINGS.max_inputs:
            raise Refusal(413, f"{name} is {w}x{h} pixels, which the {tw}x{th} model covers with {cost} "
                               f"sliding-window tiles; the limit is {SETTINGS.max_inputs} model inputs per image "
                               "(AGMM_MAX_INPUTS, reported by /info). Downscale it or send it in parts.")
        return header

    @staticmethod
    def _check_budget(headers: list[tuple[str, "transforms.ImageHeader"]], what: str) -> None:
        """Refuses (413) a request whose images together are over the request's pixels or decoded bytes."""
        try:
            transforms.check_budget(headers, SETTINGS.max_request_pixels, SETTINGS.max_decoded_bytes, what)
        except transforms.ImageDecodeError as err:
            raise Refusal(413, f"{err} (AGMM_MAX_REQUEST_PIXELS, AGMM_MAX_DECODED_BYTES, reported by /info)") from None

    def _price_request(self, images: list[tuple[str, bytes]]) -> None:
        """Prices a request's images (/segment and friends: one) as a whole: each header, then the budget."""
        self._check_budget([(name, self._price(data, name)) for name, data in images], "the request")

    def _decode(self, data: bytes, name: str) -> tuple[np.ndarray, "Tiles"]:  # noqa: F821
        """Priced bytes -> (uint8 RGB (H, W, 3), its Tiles on the runner's device); Refusal when not decodable.

        Runs in a worker thread of the event loop, so requests decode in parallel.
        """
        from agmm_deploy.inference import image_tiles

        try:
            image = transforms.decode_image(data, max_pixels=SETTINGS.max_pixels, name=name)
        except transforms.ImageDecodeError as err:
            raise Refusal(400, str(err)) from None
        return image, image_tiles(self.runner, image, name=name)

    async def _segment(self, data: bytes, answer: Callable[[np.ndarray, np.ndarray], Any],
                       name: str = "the image", request: object = None, priced: bool = False) -> tuple[Any, int]:
        """Price and decode at the door, the model through the batcher, then the label map and ``answer`` in one
        worker thread.

        Args:
            answer: (image (H, W, 3) uint8, label map (H, W) uint8) -> what the endpoint sends (PNG bytes, ...).
            request: a key shared by the images of one request (the batcher never counts them against each
                other); None: the image is the request.
            priced: the request was already priced as a whole (/segment_batch); else the image is priced here,
                as a request of its own, before it is decoded.
        Returns:
            ``answer``'s result and the model inputs of the batch that ran the image's last input; Refusal on any
            failure.
        """
        def decode() -> tuple[np.ndarray, "Tiles"]:  # noqa: F821
            if not priced:
                self._price_request([(name, data)])
            return self._decode(data, name)

        # One hop: pricing (a few ms at most, the header walks are bounded) and decoding in the same thread.
        image, tiles = await anyio.to_thread.run_sync(decode)
        result = await self._run(tiles, request)
        # Here, not in the batcher: the argmax of each image runs in its own request's thread (on the runner's
        # device), while the batcher's thread already runs the next batch; the answer is made in that same
        # thread, one hop instead of one for the argmax and another for the encoding.
        answered = await anyio.to_thread.run_sync(lambda: answer(image, _labels(result.tiles)))
        return answered, result.batch_size

    async def _run(self, tiles: "Tiles", request: object) -> "Result":  # noqa: F821
        """The image's inputs through the batcher; Refusal 503 (overloaded) or 500 (the model failed)."""
        from serving.batcher import Overloaded

        try:
            return await self.batcher.segment(tiles, request)
        except Overloaded as err:
            raise Refusal(503, str(err), headers={"Retry-After": str(err.retry_after_s)}) from None
        except RuntimeError as err:  # the model failed; logged with its traceback by the batcher
            raise Refusal(500, str(err)) from None

    def _price_task_image(self, data: bytes, name: str) -> None:
        """Label Studio's ``price``: a task's image checked and priced from its header as /segment's, before the
        backend decodes it."""
        try:
            self._price(data, name)
        except Refusal as refusal:
            raise Refused(refusal.status, refusal.message) from None

    async def _segment_images(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Label Studio's ``segment``: uint8 RGB images (H, W, 3) -> label maps (H, W) uint8, as /segment makes them.

        Each image was priced from its header by ``_price`` before the backend decoded it (the ``price`` hook);
        here the images of the call are budgeted together as one request, then each goes through the batcher,
        its label map taken in its own thread as in ``_segment``. Refused(status, sentence) when over a limit.
        """
        from agmm_deploy.inference import image_tiles

        names = [f"task image {i}" for i in range(len(images))]
        request = object()  # one request: its images never count against each other in the batcher

        async def one(name: str, image: np.ndarray) -> np.ndarray:
            tiles = await anyio.to_thread.run_sync(lambda: image_tiles(self.runner, image, name=name))
            result = await self._run(tiles, request)
            return await anyio.to_thread.run_sync(_labels, result.tiles)

        try:
            self._check_budget([(name, transforms.ImageHeader("decoded", image.shape[1], image.shape[0], "RGB", 8, 3))
                                for name, image in zip(names, images)], "this Label Studio request")
            tasks = [asyncio.ensure_future(one(name, image)) for name, image in zip(names, images)]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise
        except Refusal as refusal:
            logger.info("/label-studio/predict refused with %d: %s", refusal.status, refusal.message)
            raise Refused(refusal.status, refusal.message) from None

    # ---------------------------------------------------------------- a new model from a training job

    def swap_model(self, path: Path, version: str) -> None:
        """Serves ``path`` as ``version`` from the next batch on (Label Studio's ``on_new_model``, in a thread).

        The new runner is loaded fully and checked here (same classes, input size, normalisation and device as
        the served one, so the queued images' tiles fit it; one input through it gives finite scores) while the
        old one keeps serving; then the batcher takes it between two batches. Raises with the reason when the
        model cannot be served: the old one stays, the job reports failed, /info says why.
        """
        from agmm_deploy.inference import run_slices

        with self._swapping:
            if version == self.model_version:
                return  # already swapped (this worker's job, also seen by _follow_jobs)
            try:
                runner = self._load_checked(Path(path))
            except Exception as err:
                self.swap_error = f"{path} ({version}) was not served: {err}"
                logger.error("new model refused, still serving %s: %s", self.model_version, self.swap_error)
                raise
            self.batcher.replace_run_batch(lambda slices: run_slices(runner.run, slices))
            old, self.runner, self.model_version, self.swap_error = self.runner.path, runner, version, None
            logger.info("now serving model_version %s (%s), after %s", version, runner.path, old)

    def _load_checked(self, path: Path) -> "Runner":  # noqa: F821
        import torch

        from agmm_deploy.inference import Tiles, run_slices
        from agmm_deploy.runtime import backend_for, load_runner

        row = backend_for(path)
        options = {"mem_pattern": False, "threads": SETTINGS.ort_threads or None}
        kwargs = {name: value for name, value in options.items() if name in row.load_options and value is not None}
        runner = load_runner(path, device=str(self.runner.device.type), **kwargs)
        served = (self.meta.classes, tuple(self.runner.input_size), tuple(self.meta.mean), tuple(self.meta.std),
                  self.runner.device)
        new = (runner.meta.classes, tuple(runner.input_size), tuple(runner.meta.mean), tuple(runner.meta.std),
               runner.device)
        if new != served:
            raise ValueError(f"it serves classes, input size, mean, std, device {new}; the served model has "
                             f"{served}, which queued requests were priced for")
        h, w = runner.input_size
        tiles = Tiles(torch.full((3, h, w), 128, dtype=torch.uint8, device=runner.device), (h, w),
                      runner.meta.num_classes, mean=runner.meta.mean, std=runner.meta.std)
        with torch.inference_mode():
            run_slices(runner.run, [(tiles, 0, tiles.count)])
            if not torch.isfinite(tiles.scores()).all():
                raise ValueError("its scores on a grey image are not finite")
        return runner

    def _follow_jobs(self, folder: Path) -> None:
        """With several workers: swaps to the newest ``ready.json`` under ``folder`` written after this worker
        started (a job's last file, only when its parity passed), whichever worker ran the job."""
        from agmm_deploy.labels.loop import READY_FILE

        started, tried = time.time(), set()
        while True:
            time.sleep(self.JOB_POLL_S)
            try:
                ready = max(folder.glob(f"*/{READY_FILE}"), key=lambda p: p.stat().st_mtime, default=None)
                if ready is None or ready in tried or ready.stat().st_mtime < started:
                    continue
                tried.add(ready)
                info = json.loads(ready.read_text())
                self.swap_model(Path(info["model"]), info["model_version"])
            except Exception:  # noqa: BLE001 (logged by swap_model, or an unreadable file: keep serving)
                logger.exception("following the training jobs in %s", folder)

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

        def answer(image: np.ndarray, labels: np.ndarray) -> ImageResult:
            return ImageResult(height=labels.shape[0], width=labels.shape[1],
                               fractions=_fractions(labels, self.meta.num_classes).tolist(),
                               mask_png=base64.b64encode(self._png(image, labels)).decode("ascii"))

        def price(texts: list[str]) -> tuple[dict[int, str], dict[int, bytes]]:
            """Every image's header before any is decoded: (errors by index, bytes of the priced ones by index);
            the priced ones together within the request's budget, else the request is refused (413)."""
            errors, priced, headers = {}, {}, []
            for index, text in enumerate(texts):
                name = f"image {index}"
                try:
                    data = base64.b64decode(text, validate=True)
                except binascii.Error as err:
                    errors[index] = f"{name} is not valid base64 ({err})"
                    continue
                try:
                    headers.append((name, self._price(data, name)))
                except Refusal as refusal:
                    errors[index] = refusal.message
                    continue
                priced[index] = data
            self._check_budget(headers, "this segment_batch request")
            return errors, priced

        async def one(index: int, data: bytes) -> ImageResult:
            try:
                result, batch_size = await self._segment(data, answer, name=f"image {index}", request=ctx,
                                                         priced=True)
            except Refusal as refusal:
                if refusal.status >= 500:
                    raise
                return ImageResult(error=refusal.message)
            result.batch_size = batch_size
            return result

        texts = ctx.request.state.agmm_upload.base64_images
        try:
            errors, priced = await anyio.to_thread.run_sync(price, texts)
        except Refusal as refusal:  # over the request's budget: nothing of it was decoded
            return refusal.response("/segment_batch", ctx)
        tasks = {index: asyncio.ensure_future(one(index, data)) for index, data in priced.items()}
        try:
            done = dict(zip(tasks, await asyncio.gather(*tasks.values())))
        except Refusal as refusal:  # overloaded or the model failed: the whole request, with the sentence
            for task in tasks.values():
                task.cancel()  # their queued work is dropped, never run
            return refusal.response("/segment_batch", ctx)
        return [done[index] if index in done else ImageResult(error=errors[index]) for index in range(len(texts))]

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
            "model_version": self.model_version,
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
            "max_request_pixels": SETTINGS.max_request_pixels,
            "max_decoded_bytes": SETTINGS.max_decoded_bytes,
            "read_timeout_s": SETTINGS.read_timeout_s,
            "admission": ADMISSION,
            "connections": connections.connection_counts(),
            "settings": SETTINGS.by_variable(),
            # The Label Studio backend's training job (state, reason of a failure) and why a new model was refused.
            "training": {**self.label_studio.state.job.status(), "swap_error": self.swap_error},
        }


AgmmSegmenter.add_asgi_middleware(RequestDoor, settings=SETTINGS)
