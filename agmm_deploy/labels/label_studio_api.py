"""Talking to a Label Studio server: where a task's image may be read from, its project export, its label config.

A task's data is user input: its image URL is read only from the Label Studio server the operator named
(``LABEL_STUDIO_URL``, authenticated with ``LABEL_STUDIO_API_KEY`` as ``Authorization: Token ...``), uploads
included (they arrive as relative URLs, ``/data/upload/4/ab12cd34-img.png``), or from a local-files root the
operator named (``/data/local-files/?d=photos/a.jpg``). Any other URL is refused with a sentence before anything
is fetched. Used by the ML backend (serving/label_studio.py) and by ``agmm-labels train`` (loop.py).

    source = image_source(task_url, ImageSources(url="http://127.0.0.1:8080", local_root=None))
    data = read_source(source, api_key, max_bytes=20 << 20, timeout_s=10)
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlparse

from agmm_deploy.labels.annotations import LabelsError

# The controls whose regions we predict, in the order we look for them: a brush keeps every pixel of the mask,
# a polygon loses holes.
CONTROLS = (("BrushLabels", "brushlabels"), ("PolygonLabels", "polygonlabels"))
# A label config is a short XML document; anything larger is not one.
MAX_CONFIG_CHARS = 1 << 20


@dataclass(frozen=True)
class ImageSources:
    """Where task images may come from: the Label Studio server (its base URL) and a local-files root."""

    url: str | None = None
    local_root: Path | None = None


@dataclass(frozen=True)
class ImageSource:
    """One image, resolved: an http(s) URL on the Label Studio server, or a file under the local-files root."""

    url: str | None = None
    path: Path | None = None


@dataclass(frozen=True)
class LabelControl:
    """The project's control we predict into: its name, the Image it points at, its kind and its labels.

    kind is the result type Label Studio expects: ``brushlabels`` or ``polygonlabels``; value_key the task data
    key holding the image URL (``$image`` -> ``image``).
    """

    name: str
    to_name: str
    kind: str
    value_key: str
    labels: tuple[str, ...]


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = urlparse(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    return parsed.scheme, (parsed.hostname or "").lower(), port


def image_source(url: str, sources: ImageSources) -> ImageSource:
    """Resolves a task's image URL, or refuses it with a sentence (LabelsError) before anything is read.

    ``/data/local-files/?d=REL`` is read from ``sources.local_root / REL`` when a root is set (never outside it),
    else from the server; a relative URL is joined to ``sources.url``; an absolute URL must have the server's
    scheme, host and port.
    """
    if not isinstance(url, str) or not url:
        raise LabelsError(f"the task's image is {url!r}; expected the URL Label Studio gives its image")
    parsed = urlparse(url)
    if parsed.path.rstrip("/").endswith("/data/local-files") and sources.local_root is not None:
        names = parse_qs(parsed.query).get("d", [])
        root = sources.local_root.resolve()
        path = (root / unquote(names[0])).resolve() if names else root
        if not names or not path.is_relative_to(root) or path == root:
            raise LabelsError(f"the task's image {url} is not a file under the local-files root {root}; "
                              "expected /data/local-files/?d=<path inside that root>")
        return ImageSource(path=path)
    if sources.url is None:
        raise LabelsError(f"the task's image {url} would have to be fetched, but LABEL_STUDIO_URL is not set; set it "
                          "(and LABEL_STUDIO_API_KEY) to the Label Studio server the backend reads images from")
    if not parsed.scheme and not parsed.netloc:
        if not url.startswith("/"):
            raise LabelsError(f"the task's image {url!r} is neither an absolute URL nor a path on the Label Studio "
                              "server such as /data/upload/4/ab12cd34-img.png")
        return ImageSource(url=urljoin(sources.url.rstrip("/") + "/", url.lstrip("/")))
    if parsed.scheme not in ("http", "https") or _origin(url) != _origin(sources.url):
        where = f"{parsed.scheme}://{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")
        raise LabelsError(f"the task's image {url} is on {where}, not on LABEL_STUDIO_URL {sources.url}; the backend "
                          "reads images only from that server (uploads, or a storage it serves) or from the "
                          "local-files root its operator named, and fetched nothing")
    return ImageSource(url=url)


def auth_headers(api_key: str | None) -> dict[str, str]:
    """Label Studio's header for an API key (a legacy token; a personal access token needs its own exchange)."""
    return {"Authorization": f"Token {api_key}"} if api_key else {}


def read_source(source: ImageSource, api_key: str | None, max_bytes: int, timeout_s: float) -> bytes:
    """The bytes of a resolved image, at most ``max_bytes``, within ``timeout_s`` per read (blocking)."""
    if source.path is not None:
        if not source.path.is_file():
            raise LabelsError(f"image {source.path} does not exist under the local-files root")
        if source.path.stat().st_size > max_bytes:
            raise LabelsError(f"image {source.path} is {source.path.stat().st_size} bytes; the limit is {max_bytes}")
        return source.path.read_bytes()
    return _get(source.url, api_key, max_bytes, timeout_s)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect could point anywhere: the server's answer is taken as it is.
    def redirect_request(self, *args, **kwargs):
        return None


def _get(url: str, api_key: str | None, max_bytes: int, timeout_s: float) -> bytes:
    request = urllib.request.Request(url, headers=auth_headers(api_key))
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=timeout_s) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as err:
        hint = " (check LABEL_STUDIO_API_KEY)" if err.code in (401, 403) else ""
        raise LabelsError(f"Label Studio answered {err.code} {err.reason} for {url}{hint}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise LabelsError(f"could not read {url} within {timeout_s:g} s: {getattr(err, 'reason', err)}") from None
    if len(data) > max_bytes:
        raise LabelsError(f"{url} is larger than {max_bytes} bytes; the limit")
    return data


def export_tasks(url: str, api_key: str | None, project: int, timeout_s: float = 300.0,
                 max_bytes: int = 1 << 30) -> list[dict]:
    """The project's annotated tasks through Label Studio's export API (the JSON export, a list of tasks)."""
    export = f"{url.rstrip('/')}/api/projects/{int(project)}/export?exportType=JSON&download_all_tasks=false"
    data = _get(export, api_key, max_bytes, timeout_s)
    try:
        tasks = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LabelsError(f"the export of project {project} from {url} is not JSON ({err})") from None
    if not isinstance(tasks, list):
        raise LabelsError(f"the export of project {project} from {url} is a JSON {type(tasks).__name__}; expected "
                          "a list of tasks")
    return tasks


def read_label_control(label_config: str) -> LabelControl:
    """The project's BrushLabels control (else its PolygonLabels) and its Image, from the label config XML."""
    if not isinstance(label_config, str) or not label_config.strip() or len(label_config) > MAX_CONFIG_CHARS:
        raise LabelsError("the project's label config is empty or not text; expected the <View> XML of a project "
                          "with a BrushLabels or PolygonLabels control on an Image")
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError as err:
        raise LabelsError(f"the project's label config is not valid XML ({err})") from None
    images = {e.get("name"): e for e in root.iter("Image")}
    for tag, kind in CONTROLS:
        for control in root.iter(tag):
            image = images.get(control.get("toName"))
            if image is None or not (image.get("value") or "").startswith("$"):
                continue
            labels = tuple(e.get("value") for e in control.iter("Label") if e.get("value"))
            return LabelControl(control.get("name"), control.get("toName"), kind, image.get("value")[1:], labels)
    found = sorted({e.tag for e in root.iter()} - {"View", "Header", "Style", "Label"})
    raise LabelsError(f"the project's label config has no BrushLabels or PolygonLabels control on an Image with "
                      f"value=\"$...\" (it has {', '.join(found) or 'nothing'}); add one, e.g. <BrushLabels "
                      "name=\"label\" toName=\"image\"> with one <Label value=...> per class")


def match_labels(control: LabelControl, classes: tuple[str, ...]) -> dict[str, int]:
    """Label name -> model class id for every label of the control; labels the model lacks are refused."""
    missing = [label for label in control.labels if label not in classes]
    if missing or not control.labels:
        raise LabelsError(f"the labels {list(control.labels)} of the project's {control.kind} control "
                          f"{control.name!r} do not all name classes of the model {list(classes)}: "
                          f"{missing or 'none given'} missing; rename the labels to the "
                          "model's class names (matched by name) or serve a model trained on these classes")
    return {label: classes.index(label) for label in control.labels}
