"""Synthetic scenes and sparse labels sampled from full labels, shared by the formats' synthetic writers.

Each class has its own colour (its palette colour) and stripe texture (orientation and period by class id),
so a small network can learn them in minutes on a CPU. The sparse labels follow the paper's settings:
clicks (a small disk inside the clicked segment), VOC points (one click per connected region of each class,
background included) and scribbles (a 3-pixel-wide polyline through each region); unlabelled pixels hold 255.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from agmm_deploy.constants import IGNORE_INDEX


def class_texture(label: np.ndarray, palette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colours a label map: palette colour times a class-specific stripe pattern, plus noise.

    Shape: label (H, W) uint8 (255 = void, painted grey) -> RGB uint8 (H, W, 3).
    """
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    k = np.where(label == IGNORE_INDEX, len(palette), label).astype(np.int64)
    n = len(palette) + 1
    angle = (k * (math.pi / n)).astype(np.float32)  # stripe orientation per class
    period = (4.0 + (k % 5) * 2.0).astype(np.float32)  # stripe period per class, in pixels
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * math.pi) / period
    stripes = 0.75 + 0.25 * np.sin(phase)  # (H, W) in [0.5, 1.0]
    colours = np.vstack([palette.astype(np.float32), [[110.0, 110.0, 110.0]]])[k]  # (H, W, 3)
    image = colours * stripes[..., None] + 40.0 * (1.0 - stripes[..., None])
    image += rng.normal(0.0, 8.0, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def random_shape(canvas: np.ndarray, value: int, rng: np.random.Generator, min_frac: float, max_frac: float) -> None:
    """Paints an ellipse, rectangle or triangle of ``value`` into ``canvas`` (H, W) uint8, in place."""
    h, w = canvas.shape
    size = rng.uniform(min_frac, max_frac) * min(h, w)
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.05, 0.95) * w
    kind = rng.integers(3)
    if kind == 0:
        axes = (max(2, int(size * rng.uniform(0.5, 1.0))), max(2, int(size * rng.uniform(0.3, 0.8))))
        cv2.ellipse(canvas, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, int(value), -1)
    elif kind == 1:
        half_w, half_h = size * rng.uniform(0.4, 1.0), size * rng.uniform(0.4, 1.0)
        cv2.rectangle(canvas, (int(cx - half_w), int(cy - half_h)), (int(cx + half_w), int(cy + half_h)),
                      int(value), -1)
    else:
        angles = rng.uniform(0, 2 * math.pi) + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, 3)
        points = np.stack([cx + size * np.cos(angles), cy + size * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(canvas, [points], int(value))


def object_label(rng: np.random.Generator, height: int, width: int, num_classes: int,
                 void_border: bool) -> np.ndarray:
    """A VOC-like image: background 0 and 1-3 objects of classes 1..K-1, optionally with 255 outlines."""
    label = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        random_shape(label, int(rng.integers(1, num_classes)), rng, 0.15, 0.4)
    if void_border:  # VOC marks object outlines as void (255), about 2 pixels wide at this scale
        edges = cv2.morphologyEx(label, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        label[edges] = IGNORE_INDEX
    return label


def _disk(mask: np.ndarray, y: int, x: int, radius: int) -> np.ndarray:
    out = np.zeros(mask.shape, np.uint8)
    cv2.circle(out, (int(x), int(y)), int(radius), 1, -1)
    return out.astype(bool)


def sample_clicks(full: np.ndarray, num_clicks: int, rng: np.random.Generator, radius: int = 2) -> np.ndarray:
    """``num_clicks`` clicks at uniformly random labelled pixels; each marks a disk inside its segment.

    Returns: sparse label (H, W) uint8 with class ids at clicked pixels and 255 elsewhere.
    """
    sparse = np.full(full.shape, IGNORE_INDEX, dtype=np.uint8)
    ys, xs = np.nonzero(full != IGNORE_INDEX)
    if len(ys) == 0:
        return sparse
    for i in rng.choice(len(ys), size=min(num_clicks, len(ys)), replace=False):
        y, x = ys[i], xs[i]
        inside = _disk(full, y, x, radius) & (full == full[y, x])
        sparse[inside] = full[y, x]
    return sparse


def _regions(full: np.ndarray):
    """Yields (class id, boolean mask) of each connected region of each class (255 excluded)."""
    for value in np.unique(full):
        if value == IGNORE_INDEX:
            continue
        count, components = cv2.connectedComponents((full == value).astype(np.uint8), connectivity=4)
        for index in range(1, count):
            yield int(value), components == index


def sample_points(full: np.ndarray, rng: np.random.Generator, radius: int = 2) -> np.ndarray:
    """One click per connected region of each class (the VOC "point" setting), as a small disk."""
    sparse = np.full(full.shape, IGNORE_INDEX, dtype=np.uint8)
    for value, region in _regions(full):
        ys, xs = np.nonzero(region)
        i = rng.integers(len(ys))
        sparse[_disk(full, ys[i], xs[i], radius) & region] = value
    return sparse


def sample_scribbles(full: np.ndarray, rng: np.random.Generator, thickness: int = 3) -> np.ndarray:
    """A polyline through 3-5 random pixels of each connected region, kept inside the region."""
    sparse = np.full(full.shape, IGNORE_INDEX, dtype=np.uint8)
    for value, region in _regions(full):
        eroded = cv2.erode(region.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        ys, xs = np.nonzero(eroded if eroded.sum() >= 5 else region)
        picks = rng.choice(len(ys), size=min(len(ys), int(rng.integers(3, 6))), replace=False)
        stroke = np.zeros(full.shape, np.uint8)
        cv2.polylines(stroke, [np.stack([xs[picks], ys[picks]], 1).astype(np.int32)], False, 1, thickness)
        sparse[(stroke > 0) & region] = value
    return sparse


def save_png(array: np.ndarray, path: Path, palette=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette is not None:  # VOC ground truth is an indexed PNG
        image = image.convert("P")
        flat = [v for colour in palette for v in colour]
        image.putpalette(flat + [0] * (768 - len(flat)))
    image.save(path)
