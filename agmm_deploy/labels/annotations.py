"""What every reader returns: shapes per image in pixel coordinates, and the export's own label list.

Coordinates follow the annotation tools: x to the right, y down, (0, 0) the top-left corner of the top-left
pixel, so pixel (row r, column c) covers [c, c + 1) x [r, r + 1) and a click at x = 10.7 marks column 10.
Images are seen as the tools show them: after their EXIF orientation (the trainer reads them that way too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The kinds of shape a reader may return, and how each becomes pixels (see rasterize.py):
# point = a click (a disk), polyline = a scribble (a line of some width), polygon = a filled region,
# mask = a filled bitmap placed at (left, top).
SHAPE_KINDS = ("point", "polyline", "polygon", "mask")


class LabelsError(ValueError):
    """An export that cannot be imported as it is: the message is one sentence saying what to fix."""


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
