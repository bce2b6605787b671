"""Shapes to sparse label maps, and label maps back to regions (polygons, masks) for pre-annotations.

A sparse label holds a class id where the person clicked, scribbled or painted and IGNORE_INDEX (255)
elsewhere, the form the trainer's folder data set reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from agmm_deploy.constants import IGNORE_INDEX
from agmm_deploy.labels.annotations import Shape

# cv2 draws with fixed-point coordinates: 4 fractional bits keep sub-pixel vertices from the tools.
_SHIFT = 4
# Filled regions first, then scribbles, then clicks: where shapes overlap, the more deliberate mark wins
# (a click placed inside a painted region keeps its class).
_DRAW_ORDER = {"mask": 0, "polygon": 0, "polyline": 1, "point": 2}


def _fixed(points: np.ndarray) -> np.ndarray:
    """Corner coordinates (the tools') -> cv2's pixel-centre coordinates, in fixed point. Shape (N, 1, 2)."""
    return np.rint((points - 0.5) * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)


def click_pixel(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """The pixel (column, row) a click at corner coordinates (x, y) falls in; x = width counts as the last column."""
    return min(int(np.floor(x)), width - 1), min(int(np.floor(y)), height - 1)


def polygon_pixels(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """The pixels whose centres lie inside a polygon (corner coordinates), as a (H, W) bool array.

    A pixel-centre test, not cv2.fillPoly: fillPoly counts pixels touched by the outline, so a polygon drawn
    along pixel edges (x = 36 .. 54, the usual way around pixels 36..53) would gain a column and a row.
    """
    from matplotlib.path import Path as _Path  # C++ point-in-polygon; matplotlib is a base dependency

    inside = np.zeros((height, width), bool)
    x0, y0 = np.floor(points.min(0)).astype(int).clip(0, [width, height])
    x1, y1 = np.ceil(points.max(0)).astype(int).clip(0, [width, height])
    if x1 <= x0 or y1 <= y0:
        return inside
    yy, xx = np.mgrid[y0:y1, x0:x1]
    centres = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
    inside[y0:y1, x0:x1] = _Path(points).contains_points(centres).reshape(yy.shape)
    return inside


def shape_pixels(shape: Shape, height: int, width: int, click_radius: int,
                 scribble_width: int) -> tuple[int, int, np.ndarray]:
    """The pixels one shape marks, within its own box: (top, left, (h, w) bool) placed at row top, column left.

    Drawn in the shape's bounding box (plus the click radius / scribble width), clipped to the image, so a shape
    costs its own size: an export of 100,000 clicks on a large photo must not fill 100,000 image-sized canvases.
    The shape lies inside the image (checked by the caller).
    """
    if shape.kind == "mask":
        h, w = shape.mask.shape
        top, left = shape.top, shape.left
        # Masks may touch the border; the part inside the image is drawn (outside was refused earlier).
        view = shape.mask[max(0, -top):height - top, max(0, -left):width - left]
        return max(0, top), max(0, left), view.astype(bool)
    x_min, y_min, x_max, y_max = shape.bounds()
    pad = max(click_radius, scribble_width) + 2
    left, top = max(0, int(np.floor(x_min)) - pad), max(0, int(np.floor(y_min)) - pad)
    right, bottom = min(width, int(np.ceil(x_max)) + pad + 1), min(height, int(np.ceil(y_max)) + pad + 1)
    offset = np.array([left, top])
    if shape.kind == "polygon":  # the pixel-centre test is the same in the box, moved by whole pixels
        return top, left, polygon_pixels(shape.points - offset, bottom - top, right - left)
    canvas = np.zeros((bottom - top, right - left), np.uint8)
    if shape.kind == "point":
        for x, y in shape.points:
            column, row = click_pixel(x, y, width, height)
            cv2.circle(canvas, (column - left, row - top), click_radius, 1, -1)
    elif shape.kind == "polyline":
        if len(shape.points) == 1:  # a scribble of one point (a tap) is a dot of the scribble's width
            column, row = click_pixel(*shape.points[0], width, height)
            cv2.circle(canvas, (column - left, row - top), max(scribble_width // 2, 0), 1, -1)
        else:
            cv2.polylines(canvas, [_fixed(shape.points) - (offset << _SHIFT)], False, 1, scribble_width, cv2.LINE_8,
                          _SHIFT)
    else:
        raise AssertionError(f"unknown shape kind {shape.kind!r}")
    return top, left, canvas.astype(bool)


def rasterize(shapes: list[Shape], class_ids: dict[str, int], height: int, width: int, click_radius: int,
              scribble_width: int) -> np.ndarray:
    """Draws the shapes of one image into a sparse label map.

    Args:
        shapes: the image's shapes; every label must be a key of class_ids (checked by the caller).
        class_ids: class name -> id.
        click_radius: radius in pixels of the disk each click marks (0 = the clicked pixel alone).
        scribble_width: width in pixels of each scribble's line.
    Returns:
        (H, W) uint8: class ids where marked, IGNORE_INDEX elsewhere.
    """
    label = np.full((height, width), IGNORE_INDEX, np.uint8)
    for shape in sorted(shapes, key=lambda s: _DRAW_ORDER[s.kind]):  # stable: export order within a kind
        top, left, pixels = shape_pixels(shape, height, width, click_radius, scribble_width)
        h, w = pixels.shape
        label[top:top + h, left:left + w][pixels] = class_ids[shape.label]
    return label


@dataclass(frozen=True)
class Region:
    """One connected region of one class in a predicted label map.

    polygon: (N, 2) corner coordinates of its outer boundary, a quarter pixel inside the pixels' outline so that
        every pixel centre is clearly in or out (holes are not kept: the tools' polygons have none);
    mask: its (H, W) bool pixels, holes included.
    """

    class_id: int
    polygon: np.ndarray
    mask: np.ndarray


def label_regions(label_map: np.ndarray, num_classes: int, min_area: int = 1) -> list[Region]:
    """Connected regions (8-connected) of each class 0..num_classes-1 with at least min_area pixels.

    Shape: label_map (H, W) uint8; values >= num_classes (255 = unlabelled) are skipped.
    """
    regions = []
    for class_id in range(num_classes):
        binary = (label_map == class_id).astype(np.uint8)
        if not binary.any():
            continue
        count, components, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        for index in range(1, count):
            if stats[index, cv2.CC_STAT_AREA] < min_area:
                continue
            mask = components == index
            # Traced at twice the resolution, the boundary runs through the centres of the outer half-pixels: a
            # quarter pixel inside the outline, so polygon_pixels gives back exactly these pixels.
            double = cv2.resize(mask.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(double, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            outer = max(contours, key=len).reshape(-1, 2).astype(np.float64)
            regions.append(Region(class_id, (outer + 0.5) / 2, mask))
    return regions
