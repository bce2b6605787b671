"""CVAT for images 1.1 XML: read clicks, scribbles and painted regions; write predictions as pre-annotations.

Read: ``<points>`` (each point one click), ``<polyline>`` (a scribble), ``<polygon>`` and ``<mask>`` (filled).
A ``<mask>`` holds ``rle="n0, n1, n2, ..."``: run lengths alternating background / foreground, starting with
background, over its ``width`` x ``height`` box row by row, placed at ``left``, ``top``. Boxes, ellipses,
cuboids, skeletons and tags carry no pixel labels: they are counted and reported, not imported.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from agmm_deploy.labels.annotations import (MAX_IMAGE_PIXELS, Export, ImageAnnotations, LabelsError,
                                            PredictedImage, Shape, hex_colour, image_size, integer)
from agmm_deploy.labels.rasterize import label_regions

_POINT_SHAPES = {"points": "point", "polyline": "polyline", "polygon": "polygon"}
_IGNORED = ("box", "ellipse", "cuboid", "skeleton", "tag", "polygon3d")


def detect(head: str) -> bool:
    """True for CVAT XML: an ``<annotations>`` root."""
    return head.lstrip().startswith("<") and "<annotations" in head


def _points(text: str, where: str) -> np.ndarray:
    try:
        points = np.array([[float(v) for v in pair.split(",")] for pair in text.split(";") if pair.strip()])
    except ValueError:
        points = np.zeros((0,))
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0 or not np.isfinite(points).all():
        shown = text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"
        raise LabelsError(f"{where} has points={shown!r}; expected finite numbers 'x1,y1;x2,y2;...'")
    return points


def decode_mask_rle(rle: str, width: int, height: int, where: str) -> np.ndarray:
    """CVAT's mask RLE -> (height, width) bool: runs alternate background / foreground, background first."""
    try:
        counts = [int(v) for v in rle.replace(" ", "").split(",") if v]
    except ValueError:
        raise LabelsError(f"{where} has an rle that is not comma-separated integers") from None
    # The caller bounded width x height by the image, so the runs can only fill a mask of that size.
    if sum(counts) != width * height or any(c < 0 for c in counts):
        raise LabelsError(f"{where} has an rle covering {sum(counts)} pixels; its box is {width}x{height} = "
                          f"{width * height}")
    values = np.arange(len(counts)) % 2 == 1  # odd runs are foreground
    return np.repeat(values, counts).reshape(height, width)


def encode_mask_rle(mask: np.ndarray) -> str:
    """(h, w) bool -> CVAT's mask RLE (row by row, background run first, possibly 0)."""
    flat = mask.ravel().astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return ", ".join(str(c) for c in counts)


def read(path: Path) -> Export:
    """Parses a CVAT for images 1.1 XML export (task, job or project)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise LabelsError(f"{path} is not well-formed XML ({err}); expected a 'CVAT for images 1.1' export") from None
    if root.tag != "annotations":
        raise LabelsError(f"{path} has root <{root.tag}>; expected <annotations> of a 'CVAT for images 1.1' export")
    labels, colours = [], {}
    meta = root.find("meta")
    for label in (meta.iter("label") if meta is not None else ()):
        name = (label.findtext("name") or "").strip()
        if name and name not in labels:
            labels.append(name)
            colour = hex_colour(label.findtext("color") or "")
            if colour:
                colours[name] = colour
    images, ignored = [], {}
    for image in root.iter("image"):
        name = image.get("name", "")
        declared = image.get("width") is not None or image.get("height") is not None
        width, height = (image_size(image.get("width"), image.get("height"), f"{path}: image {name!r}") if declared
                         else (MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS))
        shapes = []
        for element in image:
            where = f"{path}: image {name!r}, <{element.tag} label={element.get('label')!r}>"
            if element.tag in _POINT_SHAPES:
                shapes.append(Shape(_POINT_SHAPES[element.tag], element.get("label", ""),
                                    _points(element.get("points", ""), where)))
            elif element.tag == "mask":
                left, top = (integer(element.get(k), where, k, minimum=-(1 << 31)) for k in ("left", "top"))
                w, h = (integer(element.get(k), where, k, minimum=1) for k in ("width", "height"))
                # Sized from the image before decoding: a few bytes of rle ("0, 10000000000") must not fill GBs.
                if left < 0 or top < 0 or left + w > width or top + h > height:
                    raise LabelsError(f"{where} spans x {left}..{left + w}, y {top}..{top + h}, outside its "
                                      f"{width}x{height} image; refused before decoding its rle")
                if w * h > MAX_IMAGE_PIXELS:  # an image without a declared size: the decoder's limit
                    raise LabelsError(f"{where} is a {w}x{h} mask; the limit is {MAX_IMAGE_PIXELS} pixels")
                mask = decode_mask_rle(element.get("rle", ""), w, h, where)
                shapes.append(Shape("mask", element.get("label", ""), mask=mask, left=left, top=top))
            elif element.tag in _IGNORED:
                ignored[element.tag] = ignored.get(element.tag, 0) + 1
        images.append(ImageAnnotations(name, shapes, width if declared else None, height if declared else None))
    tracks = len(root.findall("track"))
    if tracks:  # video annotation: shapes per frame of a track, not per image
        ignored["track"] = tracks
    return Export(images, tuple(labels), colours, ignored)


def write(images: list[PredictedImage], classes: tuple[str, ...], palette: tuple[tuple[int, int, int], ...],
          shape: str = "polygon", min_area: int = 16) -> bytes:
    """Predicted label maps as a CVAT for images 1.1 XML to upload as annotations (Actions > Upload annotations).

    Args:
        shape: ``polygon`` (one per connected region, outer boundary only) or ``mask`` (CVAT RLE, holes kept).
        min_area: regions smaller than this many pixels are left out (speckle a person would delete anyway).
    Returns:
        The XML document as UTF-8 bytes.
    """
    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<annotations>", "  <version>1.1</version>", "  <meta>",
             "    <task>", "      <labels>"]
    for name, (r, g, b) in zip(classes, palette):
        lines += ["        <label>", f"          <name>{_text(name)}</name>",
                  f"          <color>#{r:02x}{g:02x}{b:02x}</color>", "          <type>any</type>",
                  "          <attributes/>", "        </label>"]
    lines += ["      </labels>", "    </task>", "  </meta>"]
    for index, image in enumerate(images):
        h, w = image.label_map.shape
        lines.append(f'  <image id="{index}" name={quoteattr(image.name)} width="{w}" height="{h}">')
        for region in label_regions(image.label_map, len(classes), min_area):
            label = quoteattr(classes[region.class_id])
            common = f'label={label} source="auto" occluded="0" z_order="0"'
            if shape == "polygon":
                points = ";".join(f"{x:.2f},{y:.2f}" for x, y in region.polygon)
                lines.append(f'    <polygon {common} points="{points}"/>')
            else:
                ys, xs = np.nonzero(region.mask)
                top, left, bottom, right = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
                rle = encode_mask_rle(region.mask[top:bottom, left:right])
                lines.append(f'    <mask {common} rle="{rle}" left="{left}" top="{top}" width="{right - left}" '
                             f'height="{bottom - top}"/>')
        lines.append("  </image>")
    lines.append("</annotations>")
    return ("\n".join(lines) + "\n").encode("utf-8")


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
