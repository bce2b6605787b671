"""What every reader returns: shapes per image in pixel coordinates, and the export's own label list.

Coordinates follow the annotation tools: x to the right, y down, (0, 0) the top-left corner of the top-left
pixel, so pixel (row r, column c) covers [c, c + 1) x [r, r + 1) and a click at x = 10.7 marks column 10.
Images are seen as the tools show them: after their EXIF orientation (the trainer reads them that way too).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agmm_deploy.decode import DEFAULT_MAX_PIXELS

# The kinds of shape a reader may return, and how each becomes pixels (see rasterize.py):
# point = a click (a disk), polyline = a scribble (a line of some width), polygon = a filled region,
# mask = a filled bitmap placed at (left, top).
SHAPE_KINDS = ("point", "polyline", "polygon", "mask")


class LabelsError(ValueError):
    """An export that cannot be imported as it is: the message is one sentence saying what to fix."""


# An export is third-party input: every value is checked where it is read, and a bad one named with its field.
# A mask or brush RLE is sized from its declared image before it is decoded, and no image (declared or on
# disk) is larger than the bounded decoder takes.
MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS


def number(value: object, where: str, name: str) -> float:
    """``value`` as a finite float; a sentence naming ``where`` and the field ``name`` otherwise."""
    raw = value
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise LabelsError(f"{where} has {name}={_short(raw)}; expected a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LabelsError(f"{where} has {name}={_short(raw)}; expected a finite number")
    return float(value)


def integer(value: object, where: str, name: str, minimum: int = 0, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum] (an integral float such as 64.0 is accepted, as tools write)."""
    result = number(value, where, name)
    if result != int(result) or result < minimum or (maximum is not None and result > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise LabelsError(f"{where} has {name}={_short(value)}; expected a whole number {bounds}")
    return int(result)


def image_size(width: object, height: object, where: str) -> tuple[int, int]:
    """A declared image size, refused when it is not two positive integers or exceeds MAX_IMAGE_PIXELS."""
    w, h = integer(width, where, "width", 1), integer(height, where, "height", 1)
    if w * h > MAX_IMAGE_PIXELS:
        raise LabelsError(f"{where} declares an image of {w}x{h} = {w * h} pixels; the limit is "
                          f"{MAX_IMAGE_PIXELS} (the image decoder's)")
    return w, h


def read_json(path: Path, what: str) -> object:
    """Parses a JSON export; invalid JSON, bad UTF-8 or nesting deeper than the parser goes is one sentence."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LabelsError(f"{path} is not valid JSON ({err}); expected {what}") from None
    except RecursionError:
        raise LabelsError(f"{path} nests JSON lists or objects deeper than the parser goes; expected {what}, "
                          "which nests a few levels") from None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


@dataclass
class Shape:
    """One annotated shape.

    Args:
        kind: one of SHAPE_KINDS.
        label: the class name as written in the export.
        points: (N, 2) float64 x, y in pixels (empty for masks).
        mask: (h, w) bool bitmap for masks, placed with its top-left pixel at (left, top).
    """

    kind: str
    label: str
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    mask: np.ndarray | None = None
    left: int = 0
    top: int = 0

    def bounds(self) -> tuple[float, float, float, float]:
        """(x_min, y_min, x_max, y_max) of the shape in pixels; a mask covers whole pixels."""
        if self.kind == "mask":
            h, w = self.mask.shape
            return float(self.left), float(self.top), float(self.left + w), float(self.top + h)
        return (float(self.points[:, 0].min()), float(self.points[:, 1].min()),
                float(self.points[:, 0].max()), float(self.points[:, 1].max()))


@dataclass
class ImageAnnotations:
    """The shapes of one image; width and height as the export states them (None where it states none)."""

    name: str
    shapes: list[Shape]
    width: int | None = None
    height: int | None = None


@dataclass
class Export:
    """A parsed export: its images, and its label list in the export's order (empty when it keeps none).

    colours maps a label to the (R, G, B) the tool showed it in, where the export says; ignored counts the
    shapes of kinds that carry no sparse label (boxes, ellipses, tags...), reported in the summary.
    """

    images: list[ImageAnnotations]
    labels: tuple[str, ...] = ()
    colours: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)  # shapes of kinds we do not import (boxes...), by kind


def hex_colour(text: str) -> tuple[int, int, int] | None:
    """'#fa3253' -> (250, 50, 83); None for anything else."""
    text = text.strip().lstrip("#")
    if len(text) != 6:
        return None
    try:
        return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)
    except ValueError:
        return None


@dataclass(frozen=True)
class PredictedImage:
    """A predicted label map to hand back to a tool: the image's file name and the map (H, W) uint8 of ids."""

    name: str
    label_map: np.ndarray
