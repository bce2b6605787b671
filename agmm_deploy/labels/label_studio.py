"""Label Studio JSON export: read clicks (KeyPointLabels), polygons and brush masks; write predictions.

The export is a list of tasks, ``{"data": {"image": URL}, "annotations": [{"result": [...]}, ...]}``. Each
result carries ``original_width`` / ``original_height`` and a ``value``: keypoints and polygon vertices in
percent of the image size (0-100), brush masks as Label Studio's own RLE (see ``decode_brush_rle``).
Cancelled annotations are skipped; the results of all other annotations of a task are imported together.

The pre-annotations written by ``write`` are tasks with ``predictions``; their result names are
``from_name="label"`` and ``to_name="image"``, so the project's labeling config must name its controls so::

    <View>
      <Image name="image" value="$image"/>
      <BrushLabels name="label" toName="image"> <Label value="sky"/> ... </BrushLabels>
    </View>

(``PolygonLabels name="label"`` for ``--shape polygon``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from agmm_deploy.labels.annotations import Export, ImageAnnotations, LabelsError, PredictedImage, Shape
from agmm_deploy.labels.rasterize import label_regions

FROM_NAME, TO_NAME = "label", "image"
# Label Studio stores uploaded files as "<8 hex digits>-<original name>".
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
_KINDS = {"keypointlabels": "point", "polygonlabels": "polygon", "brushlabels": "mask"}


def detect(head: str) -> bool:
    """True for a Label Studio JSON export: a JSON list (of tasks)."""
    return head.lstrip().startswith("[")


# Brush RLE: a bit stream, most significant bit first. Header: the number of values (32 bits), the word size
# minus 1 (5 bits), then four run-length field sizes minus 1 (4 bits each). Then chunks until all values are
# out: 1 flag bit (1 = one word repeated, 0 = literal words), 2 bits choosing a field size, that many bits
# holding the run length minus 1, then the word (repeat) or run-length words (literal). The values are the
# image's RGBA bytes, row by row; the alpha channel is the mask.
_RUN_BITS = (4, 8, 12, 16)  # the field sizes our encoder declares


class _Bits:
    def __init__(self, data: bytes) -> None:
        self.bits = np.unpackbits(np.frombuffer(bytes(data), np.uint8))
        self.pos = 0

    def read(self, count: int) -> int:
        if self.pos + count > len(self.bits):
            raise LabelsError("brush rle ends early")
        value = 0
        for bit in self.bits[self.pos:self.pos + count]:
            value = (value << 1) | int(bit)
        self.pos += count
        return value


def decode_brush_rle(rle: list[int], width: int, height: int) -> np.ndarray:
    """Label Studio's brush RLE -> (height, width) bool mask (alpha channel > 0)."""
    bits = _Bits(rle)
    num = bits.read(32)
    word_size = bits.read(5) + 1
    run_bits = [bits.read(4) + 1 for _ in range(4)]
    if num != width * height * 4:
        raise LabelsError(f"brush rle holds {num} values; the image's {width}x{height} RGBA needs {width * height * 4}")
    out = np.zeros(num, np.uint16)
    i = 0
    while i < num:
        repeat = bits.read(1)
        end = min(i + 1 + bits.read(run_bits[bits.read(2)]), num)
        if repeat:
            out[i:end] = bits.read(word_size)
        else:
            for k in range(i, end):
                out[k] = bits.read(word_size)
        i = end
    return out.reshape(height, width, 4)[:, :, 3] > 0


def encode_brush_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool -> Label Studio's brush RLE (as a list of byte values), every RGBA byte 255 where set."""
    values = np.repeat(mask.ravel().astype(np.uint8) * 255, 4)
    chunks = ["{:032b}".format(values.size), "{:05b}".format(8 - 1)] + ["{:04b}".format(b - 1) for b in _RUN_BITS]
    changes = np.flatnonzero(np.diff(values)) + 1
    starts = np.concatenate([[0], changes])
    lengths = np.diff(np.concatenate([starts, [values.size]]))
    for start, length in zip(starts.tolist(), lengths.tolist()):
        word = "{:08b}".format(int(values[start]))
        while length > 0:
            run = min(length, 1 << _RUN_BITS[-1])
            choice = next(k for k, b in enumerate(_RUN_BITS) if run - 1 < (1 << b))
            chunks.append("1" + "{:02b}".format(choice) + format(run - 1, f"0{_RUN_BITS[choice]}b") + word)
            length -= run
    bits = "".join(chunks)
    bits += "0" * (-len(bits) % 8)
    return [int(bits[k:k + 8], 2) for k in range(0, len(bits), 8)]


def image_name(url: str) -> str:
    """The file name a task's image URL refers to: ``/data/upload/3/1a2b3c4d-a.jpg`` -> ``a.jpg``,
    ``/data/local-files/?d=photos/a.jpg`` -> ``photos/a.jpg``, ``s3://b/x/a.jpg`` -> ``a.jpg``."""
    parsed = urlparse(url)
    if "d" in parse_qs(parsed.query):
        return unquote(parse_qs(parsed.query)["d"][0])
    name = unquote(Path(parsed.path).name)
    if "/data/upload/" in parsed.path:
        name = _UPLOAD_PREFIX.sub("", name)
    return name


def _percent_points(points, width: int, height: int, where: str) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(array) == 0:
        raise LabelsError(f"{where} has no points")
    return array * np.array([width, height]) / 100.0


def read(path: Path) -> Export:
    """Parses a Label Studio JSON export (the "JSON" export of a project, a list of tasks)."""
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LabelsError(f"{path} is not valid JSON ({err}); expected a Label Studio JSON export") from None
    if not isinstance(tasks, list):
        raise LabelsError(f"{path} holds a JSON {type(tasks).__name__}; a Label Studio JSON export is a list of tasks")
    images, labels, ignored = [], [], {}
    for task in tasks:
        data = task.get("data", {}) if isinstance(task, dict) else {}
        url = data.get("image") or next((v for v in data.values() if isinstance(v, str)), "")
        name = image_name(url)
        shapes, width, height = [], None, None
        for annotation in task.get("annotations", []) if isinstance(task, dict) else []:
            if annotation.get("was_cancelled"):
                continue
            for result in annotation.get("result", []):
                kind = _KINDS.get(result.get("type", ""))
                if kind is None:
                    ignored[result.get("type", "?")] = ignored.get(result.get("type", "?"), 0) + 1
                    continue
                value = result.get("value", {})
                label_list = value.get(result["type"], [])
                where = f"{path}: task {task.get('id')} ({name}), {result['type']} {label_list}"
                if result.get("image_rotation"):
                    raise LabelsError(f"{where} was drawn on an image rotated {result['image_rotation']} degrees in "
                                      "Label Studio; remove the rotation there and export again")
                w, h = result.get("original_width"), result.get("original_height")
                if not (isinstance(w, (int, float)) and isinstance(h, (int, float))):
                    raise LabelsError(f"{where} lacks original_width / original_height")
                w, h = int(w), int(h)
                width, height = width or w, height or h
                for label in label_list:
                    if label not in labels:
                        labels.append(label)
                    if kind == "point":
                        points = _percent_points([[value.get("x"), value.get("y")]], w, h, where)
                        shapes.append(Shape("point", label, points))
                    elif kind == "polygon":
                        shapes.append(Shape("polygon", label, _percent_points(value.get("points", []), w, h, where)))
                    else:
                        if value.get("format", "rle") != "rle":
                            raise LabelsError(f"{where} has brush format {value.get('format')!r}; expected 'rle'")
                        try:
                            mask = decode_brush_rle(value.get("rle", []), w, h)
                        except LabelsError as err:
                            raise LabelsError(f"{where}: {err}") from None
                        shapes.append(Shape("mask", label, mask=mask))
        images.append(ImageAnnotations(name, shapes, width, height))
    # A JSON export keeps no label list, only the labels used: in order of first use.
    return Export(images, tuple(labels), {}, ignored)


def write(images: list[PredictedImage], classes: tuple[str, ...], palette: tuple[tuple[int, int, int], ...],
          shape: str = "polygon", min_area: int = 16) -> bytes:
    """Predicted label maps as Label Studio tasks with predictions, to import into a project.

    Args:
        images: ``name`` is written as the task's ``data.image`` (give the URL Label Studio serves it at).
        shape: ``polygon`` (PolygonLabels, one per connected region) or ``mask`` (BrushLabels RLE, holes kept).
        min_area: regions smaller than this many pixels are left out.
    Returns:
        The JSON document as UTF-8 bytes.
    """
    tasks = []
    for image in images:
        h, w = image.label_map.shape
        results = []
        for index, region in enumerate(label_regions(image.label_map, len(classes), min_area)):
            result = {"id": f"agmm-{index}", "from_name": FROM_NAME, "to_name": TO_NAME, "original_width": w,
                      "original_height": h, "image_rotation": 0}
            if shape == "polygon":
                points = (region.polygon / np.array([w, h]) * 100.0).round(4).tolist()
                result.update(type="polygonlabels", value={"points": points, "closed": True,
                                                           "polygonlabels": [classes[region.class_id]]})
            else:
                result.update(type="brushlabels", value={"format": "rle", "rle": encode_brush_rle(region.mask),
                                                         "brushlabels": [classes[region.class_id]]})
            results.append(result)
        tasks.append({"data": {"image": image.name}, "predictions": [{"model_version": "agmm", "result": results}]})
    return (json.dumps(tasks, indent=1) + "\n").encode("utf-8")
