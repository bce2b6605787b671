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

from agmm_deploy.labels.annotations import (Export, ImageAnnotations, LabelsError, PredictedImage, Shape, image_size,
                                            number, read_json)
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


# A value costs at most 27 bits (a repeat chunk of one value with a 16-bit run field): 4 bytes bound any valid
# stream. Chunks are read one by one (about 5 us each here); a painted mask of a 4000x3000 photo takes ~1e4-1e5 of them
# (one per run of the alpha byte), so more than MAX_BRUSH_CHUNKS is refused rather than decoded for minutes.
_MAX_BYTES_PER_VALUE = 4
MAX_BRUSH_CHUNKS = 1_000_000


def decode_brush_rle(rle: list[int], width: int, height: int) -> np.ndarray:
    """Label Studio's brush RLE -> (height, width) bool mask (alpha channel > 0).

    Sized from the declared width x height before anything is decoded: the header must count width x height x 4
    values and the stream be no longer than such a mask can need, so a short RLE cannot ask for GiBs and a long
    one cannot decode for minutes. The caller bounded width x height (annotations.image_size).
    """
    values = width * height * 4
    data = np.asarray(rle) if isinstance(rle, list) else np.zeros(0, np.uint8)
    if data.ndim != 1 or data.size < 8 or data.dtype.kind not in "iu" or data.min() < 0 or data.max() > 255:
        raise LabelsError("brush rle is not a list of byte values (0..255) of at least 8 bytes")
    if data.size > 8 + _MAX_BYTES_PER_VALUE * values:
        raise LabelsError(f"brush rle holds {data.size} bytes; a {width}x{height} mask needs at most "
                          f"{8 + _MAX_BYTES_PER_VALUE * values}")
    # As text '0101...': int(bits[a:b], 2) reads a field in ~0.2 us, numpy slices read the words.
    bits = (np.unpackbits(data.astype(np.uint8)) + ord("0")).tobytes().decode("ascii")
    num, word_size = int(bits[:32], 2), int(bits[32:37], 2) + 1
    run_bits = [int(bits[37 + 4 * k:41 + 4 * k], 2) + 1 for k in range(4)]
    if num != values:
        raise LabelsError(f"brush rle holds {num} values; the image's {width}x{height} RGBA needs {values}")
    if word_size != 8:
        raise LabelsError(f"brush rle has {word_size}-bit words; Label Studio writes RGBA bytes, 8 bits each")
    mask = np.zeros(width * height, bool)
    pos, i, end_bits, chunks = 53, 0, len(bits), 0
    while i < num:
        chunks += 1
        if chunks > MAX_BRUSH_CHUNKS:
            raise LabelsError(f"brush rle needs more than {MAX_BRUSH_CHUNKS} chunks for its {width}x{height} mask; "
                              "a painted mask takes one per run. Simplify the mask or export it as polygons")
        if pos + 3 > end_bits:
            raise LabelsError("brush rle ends early")
        repeat, field = bits[pos] == "1", run_bits[int(bits[pos + 1:pos + 3], 2)]
        pos += 3
        if pos + field > end_bits:
            raise LabelsError("brush rle ends early")
        end = min(i + 1 + int(bits[pos:pos + field], 2), num)
        pos += field
        # Only the alpha bytes (every 4th value, index 3 mod 4) make the mask: pixels ceil((i - 3) / 4) onward.
        first, stop = -((3 - i) // 4), -((3 - end) // 4)
        if repeat:
            if pos + 8 > end_bits:
                raise LabelsError("brush rle ends early")
            if stop > first and int(bits[pos:pos + 8], 2):
                mask[first:stop] = True
            pos += 8
        else:
            count = end - i
            if pos + 8 * count > end_bits:
                raise LabelsError("brush rle ends early")
            if stop > first:
                words = np.frombuffer(bits[pos:pos + 8 * count].encode(), np.uint8).reshape(count, 8)
                mask[first:stop] = (words[4 * np.arange(first, stop) + 3 - i] != ord("0")).any(axis=1)
            pos += 8 * count
        i = end
    return mask.reshape(height, width)


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
    values = points if isinstance(points, list) else None
    if values and all(isinstance(p, list) and len(p) == 2 for p in values):
        array = np.array([[number(x, where, "x"), number(y, where, "y")] for x, y in values])
    else:
        raise LabelsError(f"{where} has points={points!r:.60}; expected [[x, y], ...] in percent of the image")
    return array * np.array([width, height]) / 100.0


def _dict(value: object, where: str, name: str) -> dict:
    if not isinstance(value, dict):
        raise LabelsError(f"{where} has {name} of type {type(value).__name__}; expected a JSON object")
    return value


def _list(value: object, where: str, name: str) -> list:
    if not isinstance(value, list):
        raise LabelsError(f"{where} has {name} of type {type(value).__name__}; expected a JSON list")
    return value


def read(path: Path) -> Export:
    """Parses a Label Studio JSON export (the "JSON" export of a project, a list of tasks)."""
    tasks = read_json(path, "a Label Studio JSON export")
    if not isinstance(tasks, list):
        raise LabelsError(f"{path} holds a JSON {type(tasks).__name__}; a Label Studio JSON export is a list of tasks")
    images, labels, ignored = [], [], {}
    for number_, task in enumerate(tasks, start=1):
        task = _dict(task, f"{path}: task {number_}", "the task")
        where_task = f"{path}: task {task.get('id', number_)!r:.40}"
        data = _dict(task.get("data", {}), where_task, "data")
        url = data.get("image") or next((v for v in data.values() if isinstance(v, str)), "")
        if not isinstance(url, str):
            raise LabelsError(f"{where_task} has data.image of type {type(url).__name__}; expected the image URL")
        name = image_name(url)
        shapes, width, height = [], None, None
        for annotation in _list(task.get("annotations", []), where_task, "annotations"):
            annotation = _dict(annotation, where_task, "an annotation")
            if annotation.get("was_cancelled"):
                continue
            for result in _list(annotation.get("result", []), where_task, "result"):
                result = _dict(result, where_task, "a result")
                kind_name = result.get("type", "?")
                kind = _KINDS.get(kind_name) if isinstance(kind_name, str) else None
                if kind is None:
                    ignored[str(kind_name)] = ignored.get(str(kind_name), 0) + 1
                    continue
                value = _dict(result.get("value", {}), where_task, "value")
                label_list = value.get(kind_name, [])
                where = f"{where_task} ({name}), {kind_name} {label_list!r:.60}"
                if not isinstance(label_list, list) or not all(isinstance(v, str) for v in label_list):
                    raise LabelsError(f"{where} has value.{kind_name} that is not a list of label names")
                if result.get("image_rotation"):
                    raise LabelsError(f"{where} was drawn on an image rotated {result['image_rotation']!r:.20} "
                                      "degrees in Label Studio; remove the rotation there and export again")
                if result.get("original_width") is None or result.get("original_height") is None:
                    raise LabelsError(f"{where} lacks original_width / original_height")
                w, h = image_size(result["original_width"], result["original_height"], where)
                if width is not None and (w, h) != (width, height):
                    raise LabelsError(f"{where} says the image is {w}x{h}; an earlier result of the task says "
                                      f"{width}x{height}")
                width, height = w, h
                for label in label_list:
                    if label not in labels:
                        labels.append(label)
                    if kind == "point":
                        points = _percent_points([[value.get("x"), value.get("y")]], w, h, where)
                        shapes.append(Shape("point", label, points))
                    elif kind == "polygon":
                        shapes.append(Shape("polygon", label, _percent_points(value.get("points"), w, h, where)))
                    else:
                        if value.get("format", "rle") != "rle":
                            raise LabelsError(f"{where} has brush format {value.get('format')!r:.20}; expected 'rle'")
                        try:
                            mask = decode_brush_rle(value.get("rle"), w, h)
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
