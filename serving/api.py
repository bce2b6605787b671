"""The service's API in one table: each route, what its body holds, its limits, its answers and its refusals.

The door (serving/door.py) reads and checks request bodies by this table, and the OpenAPI document served at
/docs.json is built from it (``openapi_document``), so the two cannot disagree. The endpoints (serving/service.py)
answer with the response models defined here.

=================  ========  ==========================================  ====================================
route              method    body                                        answer
=================  ========  ==========================================  ====================================
/segment           POST      multipart: file ``image``                   palette PNG (pixel value = class id)
/segment_json      POST      multipart: file ``image``                   JSON class fractions
/overlay           POST      multipart: file ``image``, text ``alpha``   PNG: the image blended with colours
/segment_batch     POST      JSON {"images": [base64, ...]}              JSON: one result per image
/info              GET/POST  none                                        JSON: model, batching, settings
/livez, /readyz    GET       none                                        BentoML's health checks
/metrics           GET       none                                        Prometheus text
/label-studio/*    GET/POST  Label Studio's ML backend JSON              the ML backend protocol (health, setup,
                                                                         predict, webhook, train)
=================  ========  ==========================================  ====================================

The /label-studio routes are serving/label_studio.py's, mounted by the service; the door passes them through
(the backend reads its bodies up to its own limit) and they are listed here for the document.

Every refusal is JSON {"error": "<sentence>"} with its status (400, 408, 413, 415, 500, 503 + Retry-After;
the Label Studio routes also 409, 422 and 504).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pydantic

from serving.settings import ServeSettings

TITLE = "agmm_segmenter"
# Bytes a body may hold besides its image: multipart boundaries and part headers, JSON punctuation.
BODY_OVERHEAD_BYTES = 64 * 1024


class ImageResult(pydantic.BaseModel):
    """One image's answer from /segment_batch; ``error`` is set instead when the image was refused."""

    height: int = 0
    width: int = 0
    fractions: list[float] = []  # share of the image's pixels per class; sums to 1
    mask_png: str = ""  # base64 palette PNG at the original size; pixel value = class id
    batch_size: int = 0  # how many model inputs ran together with this image's last one
    error: str | None = None


class ClassFractions(pydantic.BaseModel):
    """/segment_json: the share of the image's pixels per class."""

    classes: list[str]
    fractions: dict[str, float]
    height: int
    width: int
    batch_size: int


@dataclass(frozen=True)
class FormField:
    """One field of a multipart body."""

    name: str
    kind: str  # file | text
    required: bool
    description: str
    schema: tuple[tuple[str, Any], ...] = ()  # JSON schema keywords of a text field's value


@dataclass(frozen=True)
class Route:
    """One row of the API table.

    Attributes:
        path, methods: where it answers (GET of a POST route reaches it as the same POST: /info).
        summary: one line for the document.
        body: what the door reads: multipart | json | none (no body is read; one sent anyway is not read) |
            label-studio (Label Studio's JSON, read by the backend itself, not the door).
        fields: the multipart fields (``image`` the file, others text).
        answer: the 200 content type; ``answer_schema`` its JSON schema name (see ``openapi_document``).
        refusals: the statuses answered with {"error": ...} besides 200.
        owner: door (a body the door reads, then the endpoint) | service (an endpoint without a body) |
            bentoml (BentoML's own route, passed through) | label-studio (the mounted ML backend, passed
            through).
    """

    path: str
    methods: tuple[str, ...]
    summary: str
    body: str = "none"
    fields: tuple[FormField, ...] = ()
    answer: str = "application/json"
    answer_schema: str = ""
    refusals: tuple[int, ...] = ()
    owner: str = "door"

    def text_fields(self) -> set[str]:
        return {f.name for f in self.fields if f.kind == "text"}


IMAGE = FormField("image", "file", True, "the image file: JPEG, PNG, WebP, TIFF, BMP, ... (curl -F image=@photo.jpg)")
ALPHA = FormField("alpha", "text", False, "the weight of the class colours in the blend, 0 (the image) to 1 (the "
                  "colours)", (("type", "number"), ("minimum", 0), ("maximum", 1), ("default", 0.5)))
IMAGE_REFUSALS = (400, 408, 413, 415, 500, 503)

LABEL_STUDIO = "/label-studio"  # where the service mounts serving/label_studio.py

ROUTES: tuple[Route, ...] = (
    Route("/segment", ("POST",), "The label map as a palette PNG at the image's size (pixel value = class id)",
          body="multipart", fields=(IMAGE,), answer="image/png", refusals=IMAGE_REFUSALS),
    Route("/segment_json", ("POST",), "Per-class pixel fractions of the predicted label map (they sum to 1)",
          body="multipart", fields=(IMAGE,), answer_schema="ClassFractions", refusals=IMAGE_REFUSALS),
    Route("/overlay", ("POST",), "The image blended with its predicted class colours, PNG", body="multipart",
          fields=(IMAGE, ALPHA), answer="image/png", refusals=IMAGE_REFUSALS),
    Route("/segment_batch", ("POST",), "Segments base64-encoded image files of any sizes; a bad image gets its "
          "error in its result, the others are answered", body="json", answer_schema="ImageResults",
          refusals=IMAGE_REFUSALS),
    Route("/info", ("GET", "POST"), "What is served: classes, palette, input size, backend, precision, batching, "
          "admission, limits and every setting", answer_schema="Info", owner="service"),
    Route("/livez", ("GET",), "Liveness: 200 while the server process runs", answer="text/plain", owner="bentoml"),
    Route("/readyz", ("GET",), "Readiness: 200 once the model is loaded and warmed up, 503 before",
          answer="text/plain", refusals=(503,), owner="bentoml"),
    Route("/metrics", ("GET",), "Prometheus metrics (agmm_batch_inputs: model inputs per batch; BentoML's request "
          "metrics)", answer="text/plain", owner="bentoml"),
    Route(f"{LABEL_STUDIO}/health", ("GET",), "Label Studio ML backend: {status: UP, model_class, model_version}, "
          "never waiting on a batch", answer_schema="LabelStudio", owner="label-studio"),
    Route(f"{LABEL_STUDIO}/setup", ("POST",), "Label Studio ML backend: the project's label config -> "
          "{model_version}; labels the model lacks are a 422 sentence", body="label-studio",
          answer_schema="LabelStudio", refusals=(400, 413, 422), owner="label-studio"),
    Route(f"{LABEL_STUDIO}/predict", ("POST",), "Label Studio ML backend: tasks -> one brush (or polygon) "
          "prediction per task, masks as /segment's, images only from LABEL_STUDIO_URL or the local-files root",
          body="label-studio", answer_schema="LabelStudio", refusals=(400, 413, 422, 500, 503, 504),
          owner="label-studio"),
    Route(f"{LABEL_STUDIO}/webhook", ("POST",), "Label Studio webhook: START_TRAINING (and every "
          "AGMM_LS_TRAIN_EVERY annotations) starts a training job; other events are acknowledged",
          body="label-studio", answer_schema="LabelStudio", refusals=(400, 409, 413, 422), owner="label-studio"),
    Route(f"{LABEL_STUDIO}/train", ("GET", "POST"), "The training job: GET its status, POST (older Label Studio "
          "versions) starts one", body="label-studio", answer_schema="LabelStudio", refusals=(400, 409, 413, 422),
          owner="label-studio"),
)
ROUTES_BY_PATH = {route.path: route for route in ROUTES}
PASSED_THROUGH = ("bentoml", "label-studio")  # owners whose requests the door hands on unread

REFUSAL_MEANINGS = {
    400: "the body or the image is malformed, or a field is missing or unknown; the sentence says which",
    408: "the request body did not arrive within AGMM_READ_TIMEOUT_S (or its headers within AGMM_HEADER_TIMEOUT_S)",
    413: "over a limit, priced from the images' headers before any is decoded: body bytes, images per batch, "
         "model inputs per image, or the request's pixels and decoded bytes together (AGMM_MAX_REQUEST_PIXELS, "
         "AGMM_MAX_DECODED_BYTES; all reported by /info)",
    415: "the wrong Content-Type: multipart/form-data for the image routes, application/json for /segment_batch",
    409: "a training job is running; one runs at a time",
    422: "Label Studio's request cannot be served: labels the model lacks, an image URL outside LABEL_STUDIO_URL, "
         "an image over a limit; the sentence says which",
    500: "the model failed on the batch that held this image",
    503: "the server is busy: the work ahead would outlast AGMM_MAX_LATENCY_MS (or every connection of the worker "
         "is answering a request, AGMM_MAX_CONNECTIONS); retry after Retry-After seconds",
    504: "a task's image did not arrive from Label Studio in time",
}


def body_limit(route: Route, settings: ServeSettings) -> int:
    """The most bytes the door reads of ``route``'s body: one image file's worth (as base64 for JSON: 4/3)."""
    image_bytes = settings.max_upload_bytes * 4 // 3 if route.body == "json" else settings.max_upload_bytes
    return image_bytes + BODY_OVERHEAD_BYTES


def describe_routes() -> str:
    """e.g. 'POST /segment, ... (multipart field 'image'), POST /segment_batch (JSON), GET or POST /info', for
    sentences that point a client at the API."""
    parts = []
    for route in ROUTES:
        if route.owner == "bentoml":
            continue
        body = {"multipart": " (multipart field 'image')", "json": " (JSON)", "none": "",
                "label-studio": " (Label Studio's JSON)"}[route.body]
        parts.append(f"{' or '.join(route.methods)} {route.path}{body}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- the document

ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "string", "description": "one sentence: what was received, what is expected"}}}


def _info_schema() -> dict[str, Any]:
    number_list = {"type": "array", "items": {"type": "number"}}
    return {"type": "object", "properties": {
        "classes": {"type": "array", "items": {"type": "string"}},
        "palette": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
        "input_size": {"type": "array", "items": {"type": "integer"}, "description": "[height, width]"},
        "mean": number_list, "std": number_list,
        "backend": {"type": "string"}, "precision": {"type": "string"}, "device": {"type": "string"},
        "model": {"type": "string"}, "chosen_by": {"type": "string"},
        "max_batch_size": {"type": "integer"}, "max_latency_ms": {"type": "integer"},
        "max_upload_bytes": {"type": "integer"}, "max_pixels": {"type": "integer"},
        "max_inputs": {"type": "integer"}, "max_batch_images": {"type": "integer"},
        "max_request_pixels": {"type": "integer"}, "max_decoded_bytes": {"type": "integer"},
        "admission": {"type": "object", "description": "how requests are admitted to the batcher"},
        "connections": {"type": "object", "description": "the header deadline, the connection cap and what they "
                        "closed in this worker"},
        "settings": {"type": "object", "description": "every AGMM_* setting and its value"},
    }, "additionalProperties": True}


def _request_body(route: Route, settings: ServeSettings) -> dict[str, Any] | None:
    limit = body_limit(route, settings)
    if route.body == "multipart":
        properties = {}
        for f in route.fields:
            schema = {"type": "string", "format": "binary"} if f.kind == "file" else dict(f.schema)
            properties[f.name] = {**schema, "description": f.description}
        schema = {"type": "object", "required": [f.name for f in route.fields if f.required],
                  "properties": properties, "additionalProperties": False}
        return {"required": True, "description": f"at most {limit} bytes; one file field 'image'",
                "content": {"multipart/form-data": {"schema": schema}}}
    if route.body == "json":
        schema = {"type": "object", "required": ["images"], "additionalProperties": False, "properties": {
            "images": {"type": "array", "minItems": 0, "maxItems": settings.max_batch_images,
                       "items": {"type": "string", "format": "byte",
                                 "description": "base64 of an image file (JPEG, PNG, WebP, TIFF, ...)"}}}}
        return {"required": True, "description": f"at most {limit} bytes",
                "content": {"application/json": {"schema": schema}}}
    if route.body == "label-studio":
        return {"required": True, "description": "Label Studio's ML backend request, as Label Studio sends it",
                "content": {"application/json": {"schema": {"type": "object", "additionalProperties": True}}}}
    return None


def _answer(route: Route) -> dict[str, Any]:
    if route.answer == "image/png":
        content = {"image/png": {"schema": {"type": "string", "format": "binary"}}}
        headers = {"X-AGMM-Batch-Size": {"description": "model inputs in the batch that ran the image's last input",
                                         "schema": {"type": "integer"}}}
        return {"description": "the PNG", "headers": headers, "content": content}
    if route.answer == "text/plain":
        return {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
    return {"description": "OK", "content": {route.answer: {"schema": {"$ref": f"#/components/schemas/"
                                                                              f"{route.answer_schema}"}}}}


def _refusal(route: Route, status: int) -> dict[str, Any]:
    if route.owner == "bentoml":
        return {"description": "not ready yet", "content": {"text/plain": {"schema": {"type": "string"}}}}
    answer: dict[str, Any] = {"description": REFUSAL_MEANINGS[status],
                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if status == 503:
        answer["headers"] = {"Retry-After": {"description": "seconds until the queue should have room",
                                             "schema": {"type": "integer"}}}
    return answer


def openapi_document(settings: ServeSettings, version: str = "0.1.0") -> dict[str, Any]:
    """The OpenAPI 3.0 document of ROUTES with the limits of ``settings``."""
    paths: dict[str, Any] = {}
    for route in ROUTES:
        for method in route.methods:
            operation: dict[str, Any] = {
                "summary": route.summary,
                "operationId": f"{method.lower()}_{route.path.strip('/')}",
                "responses": {"200": _answer(route), **{str(s): _refusal(route, s) for s in route.refusals}},
            }
            if method == "POST" and (body := _request_body(route, settings)) is not None:
                operation["requestBody"] = body
            paths.setdefault(route.path, {})[method.lower()] = operation
    schemas = {
        "Error": ERROR_SCHEMA,
        "ClassFractions": ClassFractions.model_json_schema(),
        "ImageResult": ImageResult.model_json_schema(),
        "ImageResults": {"type": "array", "items": {"$ref": "#/components/schemas/ImageResult"}},
        "Info": _info_schema(),
        "LabelStudio": {"type": "object", "additionalProperties": True,
                        "description": "Label Studio's ML backend protocol answer"},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": TITLE, "version": version, "description": (
            "DeepLabV3+ trained with the AGMM loss on sparse labels. Limits: "
            f"{settings.max_upload_bytes} bytes and {settings.max_pixels} pixels per image, "
            f"{settings.max_inputs} model inputs per image, {settings.max_batch_images} images per /segment_batch, "
            f"{settings.max_request_pixels} pixels and {settings.max_decoded_bytes} decoded bytes per request, "
            f"bodies within {settings.read_timeout_s:g} s. Every refusal is JSON {{\"error\": \"a sentence\"}}: what was received and what is expected.")},
        "paths": paths,
        "components": {"schemas": _openapi_30(schemas)},
    }


def _openapi_30(schema: Any) -> Any:
    """pydantic writes JSON Schema 2020-12 (``anyOf`` with ``{"type": "null"}``); OpenAPI 3.0 says ``nullable``."""
    if isinstance(schema, list):
        return [_openapi_30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: _openapi_30(value) for key, value in schema.items()}
    options = schema.get("anyOf")
    if options and {"type": "null"} in options:
        rest = [option for option in options if option != {"type": "null"}]
        del schema["anyOf"]
        schema.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
        schema["nullable"] = True
    return schema
