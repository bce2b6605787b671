"""The door: ASGI middleware in front of BentoML that reads, bounds and parses every request body, once.

It follows the API table (serving/api.py): for each route, which body it takes, its fields and its limits.

- 413 when the body is over the limit: from Content-Length before reading, or while reading.
- 408 when the whole body has not arrived within AGMM_READ_TIMEOUT_S (slow or stalled clients).
- 415 when an image route gets anything but multipart/form-data, or /segment_batch anything but JSON.
- 400 when the multipart body is malformed, lacks exactly one file upload named ``image``, or carries other
  fields; or the JSON of /segment_batch is not {"images": [...]}.
- 499 (the nginx convention, for the log; nobody receives it) when the client leaves before its body came.
- The mounted Label Studio backend's routes (/label-studio/...) and BentoML's own are passed through unread.
- The API's documents: /docs.json (the OpenAPI document of the table), /docs (Swagger UI, from the assets
  BentoML ships in its package: no CDN), / (to /docs) and BentoML's /schema.json; AGMM_API_DOCS=0 closes all of
  them (404). BentoML's own OpenAPI document never goes out: it describes BentoML's body parsing, replaced here.

The parsed upload goes to the endpoint in the request's state, and BentoML gets an empty body, so its own body
parsing (URL downloads for file fields, file names used as temporary paths) never runs. Every refusal is a JSON
{"error": "<sentence>"} and one log line without the upload's content.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from serving.api import PASSED_THROUGH, ROUTES_BY_PATH, Route, body_limit, describe_routes, openapi_document
from serving.settings import ServeSettings

# BentoML configures the "bentoml" logger tree in its workers and disables loggers it does not know.
logger = logging.getLogger("bentoml.agmm_deploy")

DOC_PATHS = ("/", "/docs", "/docs.json", "/schema.json")
ASSETS_PREFIX = "/docs/static/"
# Swagger UI's files as BentoML ships them (bentoml/_internal/server/static_content): what /docs loads.
SWAGGER_ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js",
                  "favicon-light-32x32.png")
# validatorUrl null: Swagger UI would otherwise show a badge fetched from validator.swagger.io.
SWAGGER_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>agmm_segmenter API</title>
  <link rel="stylesheet" href="{prefix}swagger-ui.css">
  <link rel="icon" type="image/png" href="{prefix}favicon-light-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{prefix}swagger-ui-bundle.js"></script>
  <script src="{prefix}swagger-ui-standalone-preset.js"></script>
  <script>
    window.ui = SwaggerUIBundle({{url: "/docs.json", dom_id: "#swagger-ui", validatorUrl: null,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset], layout: "BaseLayout"}});
  </script>
</body>
</html>
"""


def swagger_assets_folder() -> Path:
    """Where BentoML's package keeps Swagger UI's static files."""
    from bentoml._internal import server  # BentoML's own /docs page serves them from here

    return Path(server.__file__).parent / "static_content"


class Refusal(Exception):
    """A request answered with a 4xx/5xx sentence instead of a result."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def response(self, route: str, ctx: Any = None) -> JSONResponse:
        """The JSON answer, logged as one line without the upload's content (user errors are the clients' own).

        In an endpoint, pass its ``ctx`` (bentoml.Context): BentoML gives every response an endpoint returns the context's status.
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
    base64_images: list[str] | None = None  # /segment_batch: the base64 text of each image file, not yet decoded


class RequestDoor:
    """ASGI middleware in front of BentoML: reads, bounds and parses every request body of the service, once
    (the module docstring lists its answers). ``settings`` holds its limits and whether the documents are open.
    """

    def __init__(self, app: Any, settings: ServeSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].rstrip("/") or "/"
        if scope["method"] in ("GET", "HEAD") and (path in DOC_PATHS or path.startswith(ASSETS_PREFIX)):
            answer = self._document(path)
            if answer is not None:
                await answer(scope, receive, send)
                return
        route = ROUTES_BY_PATH.get(path)
        if route is None or route.owner in PASSED_THROUGH or scope["method"] not in route.methods:
            await self.app(scope, receive, send)
            return
        if route.body == "none":
            # It takes no body (one sent anyway is not read). BentoML routes its endpoints for POST only; a GET,
            # what a browser or `curl URL/info` sends for a read, reaches it as the same POST.
            await self.app({**_without_body(scope, Upload()), "method": "POST"}, _empty_body(receive), send)
            return
        try:
            upload = await self._read(route, scope, receive)
        except Exception as err:  # noqa: BLE001 (a request the door cannot read is answered, never left hanging)
            if not isinstance(err, Refusal):
                logger.exception("the door failed on a request to %s", path)
                err = Refusal(500, f"the server failed to read this request ({type(err).__name__}); it is logged")
            # The rest of the body, if any, is never read: uvicorn closes the connection after this answer
            # instead of reading on (a Content-Length of 1e15 would otherwise be read, and discarded, to its end).
            err.headers.setdefault("Connection", "close")
            await err.response(path)(scope, receive, send)
            return
        await self.app(_without_body(scope, upload), _empty_body(receive), send)

    def _document(self, path: str) -> Response | None:
        """The answer to a GET of the API's documents; None to pass it on to BentoML (/schema.json when open)."""
        if not self.settings.api_docs:
            return Refusal(404, "this server does not publish its API documents (AGMM_API_DOCS=0); its endpoints "
                                f"are {describe_routes()}").response(path)
        if path == "/docs.json":
            return JSONResponse(openapi_document(self.settings))
        if path == "/docs":
            return HTMLResponse(SWAGGER_PAGE.format(prefix=ASSETS_PREFIX))
        if path == "/":
            return RedirectResponse("/docs")
        if path.startswith(ASSETS_PREFIX):
            name = path[len(ASSETS_PREFIX):]
            if name not in SWAGGER_ASSETS:  # a fixed list: no path from the request reaches the file system
                return Refusal(404, f"/docs has no asset {name[:60]!r}").response(path)
            return FileResponse(swagger_assets_folder() / name)
        return None  # /schema.json: BentoML's description of its service, which BentoML's own clients read

    async def _read(self, route: Route, scope: dict, receive: Any) -> Upload:
        headers = Headers(scope=scope)
        content_type = headers.get("content-type", "")
        limit = body_limit(route, self.settings)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise _too_large(int(length), limit)
        timeout_s = self.settings.read_timeout_s
        if route.body == "json":
            if not content_type.lower().startswith("application/json"):
                raise Refusal(415, f'{route.path[1:]} takes JSON: {{"images": ["<base64 of an image file>", ...]}}; '
                                   f"got Content-Type {content_type or 'none'}")
            return _batch_upload(await _read_body(receive, limit, timeout_s), self.settings.max_batch_images)
        fields = route.text_fields()
        if not content_type.lower().startswith("multipart/form-data"):
            raise Refusal(415, f"{route.path[1:]} takes a multipart/form-data upload with a file field 'image' "
                               f"(curl -F image=@photo.jpg); got Content-Type {content_type or 'none'}")
        body = await _read_body(receive, limit, timeout_s)

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
            expected = {f.name: f.kind for f in route.fields}
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


async def _read_body(receive: Any, limit: int, timeout_s: float) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413), a body slower than ``timeout_s`` (408), or a
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
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise Refusal(408, f"the request body did not arrive within {timeout_s:g} s (AGMM_READ_TIMEOUT_S); "
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


def _batch_upload(body: bytes, max_images: int) -> Upload:
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        request = None
    except RecursionError:  # the parser recurses per level: nesting is bounded by Python's recursion limit
        raise Refusal(400, f"the JSON body nests deeper than {sys.getrecursionlimit()} levels; segment_batch takes "
                           '{"images": ["<base64 of an image file>", ...]}, 2 deep') from None
    images = request.get("images") if isinstance(request, dict) else None
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise Refusal(400, 'segment_batch takes JSON {"images": ["<base64 of an image file>", ...]}; got '
                           f"{'invalid JSON' if request is None else 'another shape'}")
    if len(images) > max_images:
        raise Refusal(413, f"segment_batch got {len(images)} images; the limit is {max_images} per request "
                           "(AGMM_MAX_BATCH_IMAGES, reported by /info). Send them in several requests, or one "
                           "per request to /segment: the server batches concurrent requests itself.")
    return Upload(base64_images=images)


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


