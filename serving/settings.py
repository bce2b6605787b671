"""The service's settings: every ``AGMM_*`` variable of `bentoml serve`, read once into one frozen, typed object.

``read_settings()`` reads the environment when serving/service.py is imported (the CLI process and each worker),
refuses a bad value with a sentence naming the variable and what it takes, and the worker logs the result at
start; /info reports it. ``SETTINGS_TABLE`` (variable, default, meaning) is built from the fields, for the docs.

    AGMM_MODEL=exported/ AGMM_PRECISION=int8 AGMM_MAX_INPUTS=16 bentoml serve --host 127.0.0.1

``AGMM_EXTRA_BACKENDS`` (plug-in rows of the runtime table) is read by agmm_deploy.runtime itself, at call time,
for every command; it is reported here as well.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

from agmm_deploy.runtime import DEVICES, EXTRA_BACKENDS_ENV


class SettingsError(ValueError):
    """An AGMM_* variable whose value the service cannot run with."""


@dataclass(frozen=True)
class Kind:
    """How a variable's text becomes a value: ``parse`` raises ValueError for text it refuses."""

    parse: Callable[[str], Any]
    expected: str  # for the refusal: "AGMM_X='abc' cannot be used: it takes <expected>"


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = convert(text)
        if not ok(value):
            raise ValueError(text)
        return value

    return parse


def _flag(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(text)
    return lowered in ("1", "true", "yes", "on")


COUNT = Kind(_checked(int, lambda v: v >= 1), "a whole number >= 1")
COUNT_OR_ZERO = Kind(_checked(int, lambda v: v >= 0), "a whole number >= 0")
SECONDS = Kind(_checked(float, lambda v: 0 < v < float("inf")), "a number of seconds > 0")
MILLISECONDS = Kind(_checked(float, lambda v: 0 <= v < float("inf")), "a number of milliseconds >= 0")
FLAG = Kind(_flag, "1 or 0 (true/false, yes/no, on/off)")
DEVICE = Kind(_checked(str, lambda v: v in DEVICES), " | ".join(DEVICES))
TEXT = Kind(str, "text")


def _setting(env: str, default: Any, kind: Kind, meaning: str) -> Any:
    """A field read from the variable ``env`` as ``kind`` (unset or empty: ``default``)."""
    return field(default=default, metadata={"env": env, "kind": kind, "meaning": meaning})


@dataclass(frozen=True)
class ServeSettings:
    """Every setting of the service; each field names its variable, its parser and its meaning (SETTINGS_TABLE).

    None for a batching setting means: derived from the device and the warm-up at start (serving/service.py);
    for the request budget (max_request_pixels, max_decoded_bytes): derived from max_pixels when made.
    """

    # Which model: a file or an agmm-export folder, or a BentoML store entry; within a folder, which artifact.
    model: str = _setting("AGMM_MODEL", "", TEXT, "the artifact to serve: a file of the runtime table, or an "
                          "agmm-export folder to choose from")
    bento_model: str = _setting("AGMM_BENTO_MODEL", "", TEXT, "name:version of a BentoML model store entry to "
                                "serve instead of AGMM_MODEL")
    precision: str = _setting("AGMM_PRECISION", "", TEXT, "within a folder: serve the artifact of this precision "
                              "(default fp32)")
    model_file: str = _setting("AGMM_MODEL_FILE", "", TEXT, "within a folder: serve this file")
    device: str = _setting("AGMM_DEVICE", "auto", DEVICE, "where the model runs; auto = CUDA when available and "
                           "the artifact's runtime runs there")
    ort_threads: int = _setting("AGMM_ORT_THREADS", 0, COUNT_OR_ZERO, "intra-op threads of the model's runtime where it "
                                "takes a count (ONNX Runtime, OpenVINO); 0: its default, one per core")
    workers: int = _setting("AGMM_WORKERS", 1, COUNT, "worker processes, each with its own model and batcher")
    # Limits of one request, checked at the door and when the image is priced.
    max_upload_bytes: int = _setting("AGMM_MAX_UPLOAD_BYTES", 20 * 1024 * 1024, COUNT,
                                     "bytes of one image file (a /segment_batch body may hold 4/3 of it as "
                                     "base64)")
    # An image's pixels (from its header, before decoding); the label map's scores hold K float32 planes of this.
    max_pixels: int = _setting("AGMM_MAX_PIXELS", 8 * 1024 * 1024, COUNT, "pixels of one image")
    # 2048x1024 on a 512x1024 model is 16 tiles, 640x480 on 512x512 is 2; a 1024x768 photo on a 128x128 model
    # would be 352, and is refused with 413.
    max_inputs: int = _setting("AGMM_MAX_INPUTS", 32, COUNT, "model inputs one image may cost (1 letterboxed "
                               "canvas, or its sliding-window tiles)")
    max_batch_images: int = _setting("AGMM_MAX_BATCH_IMAGES", 16, COUNT, "images per /segment_batch request")
    # A request's images priced together from their headers, before any is decoded: 16 copies of a 19 KB 16-bit
    # 4096x2048 PNG are each within the per-image limits, and 134 Mpx (268 MB of samples) together.
    max_request_pixels: int | None = _setting("AGMM_MAX_REQUEST_PIXELS", None, COUNT, "pixels of all the images "
                                              "of one request together (derived: 4 x AGMM_MAX_PIXELS)")
    max_decoded_bytes: int | None = _setting("AGMM_MAX_DECODED_BYTES", None, COUNT, "bytes of decoded samples of "
                                             "all the images of one request together, at their files' depth "
                                             "(derived: 4 bytes per pixel of AGMM_MAX_REQUEST_PIXELS)")
    read_timeout_s: float = _setting("AGMM_READ_TIMEOUT_S", 30.0, SECONDS, "seconds for a whole request body to "
                                     "arrive (408 after)")
    # Connections, per worker (serving/connections.py).
    header_timeout_s: float = _setting("AGMM_HEADER_TIMEOUT_S", 10.0, SECONDS, "seconds for a request's headers to "
                                       "arrive, from the connection's start or its previous response's end "
                                       "(closed after; 408 when part of them came)")
    max_connections: int = _setting("AGMM_MAX_CONNECTIONS", 1000, COUNT, "open connections per worker; over it "
                                    "the one waiting longest for its headers is closed (503 when all are busy)")
    # Batching; None: derived from the device and the warm-up (AgmmSegmenter._start_batcher).
    max_batch_size: int | None = _setting("AGMM_MAX_BATCH_SIZE", None, COUNT, "model inputs per batch "
                                          "(derived: 16 on a GPU, 8 on a CPU)")
    max_latency_ms: int | None = _setting("AGMM_MAX_LATENCY_MS", None, COUNT, "how long a request may wait for "
                                          "the work queued ahead of it (derived: 3 full batches, at least 1 s)")
    batch_wait_ms: float | None = _setting("AGMM_BATCH_WAIT_MS", None, MILLISECONDS, "how long a batch that is "
                                           "not full waits for more inputs (derived: 2 inputs' time on a GPU, 0 on "
                                           "a CPU)")
    # The API's documents.
    api_docs: bool = _setting("AGMM_API_DOCS", True, FLAG, "publish the OpenAPI document (/docs.json), Swagger UI "
                              "(/docs) and BentoML's /schema.json; 0 closes all three (404)")
    extra_backends: str = _setting(EXTRA_BACKENDS_ENV, "", TEXT, "plug-in rows of the runtime table, "
                                   "module:ATTRIBUTE, comma-separated (read by agmm_deploy.runtime)")

    def __post_init__(self) -> None:
        # The request budget follows the per-image limit unless set: derived once here, so /info, the log and
        # the refusals all show the number in force (the docs' table says "derived").
        if self.max_request_pixels is None:
            object.__setattr__(self, "max_request_pixels", 4 * self.max_pixels)
        if self.max_decoded_bytes is None:
            object.__setattr__(self, "max_decoded_bytes", 4 * self.max_request_pixels)

    def by_variable(self) -> dict[str, Any]:
        """{variable: value} of every setting, what /info reports and the start-up log line shows."""
        return {f.metadata["env"]: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        """One line for the log: the variables that were set, then the others' values."""
        return " ".join(f"{name}={'' if value is None else value}" for name, value in self.by_variable().items())


def read_settings(environ: Mapping[str, str] | None = None) -> ServeSettings:
    """The settings from ``environ`` (default: os.environ); SettingsError naming the variable when one is bad."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServeSettings):
        env, kind = f.metadata["env"], f.metadata["kind"]
        text = environ.get(env, "")
        if not text:
            continue
        try:
            values[f.name] = kind.parse(text if kind is TEXT else text.strip())
        except ValueError:
            raise SettingsError(f"{env}={text[:60]!r} cannot be used: it takes {kind.expected} "
                                f"({f.metadata['meaning']})") from None
    return ServeSettings(**values)


# (variable, default, meaning) of every setting, in field order: the docs' settings table.
SETTINGS_TABLE: tuple[tuple[str, str, str], ...] = tuple(
    (f.metadata["env"], "derived" if f.default is None else repr(f.default) if f.default == "" else str(f.default),
     f.metadata["meaning"]) for f in dataclasses.fields(ServeSettings))
