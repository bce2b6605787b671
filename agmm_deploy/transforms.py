"""Pre- and post-processing shared by evaluation, parity checks, agmm-predict and serving.

Images travel as uint8 RGB arrays (H, W, 3). The network sees float32 NCHW normalised by the model's
metadata (mean/std); nothing here hard-codes a dataset.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# The bounded decoder lives in agmm_deploy.decode; its names stay importable from here.
from agmm_deploy.decode import (DEFAULT_MAX_PIXELS, ImageDecodeError, ImageHeader,  # noqa: F401
                                check_budget, check_image_header, decode_image, read_image, read_image_header,
                                to_rgb_uint8)

# The official sliding-window evaluation (pre_slide) moves its tiles by a third of the tile: overlap 2/3.
SLIDING_OVERLAP = 2 / 3


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 RGB (H, W, 3) or (N, H, W, 3) -> float32 (N, 3, H, W): (x / 255 - mean) / std."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images shaped (H, W, 3) or (N, H, W, 3); got {images.shape}")
    scale = np.float32(1.0 / 255.0)
    mean_arr = np.asarray(mean, dtype=np.float32)
    std_arr = np.asarray(std, dtype=np.float32)
    out = (images.astype(np.float32) * scale - mean_arr) / std_arr
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


@dataclass(frozen=True)
class Letterbox:
    """Where an image of ``original`` (H, W) sits inside the model input: resized to ``resized``, top-left."""

    original: tuple[int, int]
    resized: tuple[int, int]
    canvas: tuple[int, int]


def letterbox(image: np.ndarray, size: tuple[int, int],
              fill: tuple[int, int, int] = (0, 0, 0)) -> tuple[np.ndarray, Letterbox]:
    """Resizes ``image`` (H, W, 3) to fit ``size`` keeping its aspect ratio and pads bottom/right with ``fill``.

    Pass ``fill=pad_value(meta.mean)`` so that padding normalises to (almost exactly) zero.
    Returns:
        (canvas uint8 (size_h, size_w, 3), Letterbox to map predictions back with ``unletterbox``).
    """
    h, w = image.shape[:2]
    th, tw = size
    scale = min(th / h, tw / w)
    rh, rw = max(1, min(th, round(h * scale))), max(1, min(tw, round(w * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = image if (rh, rw) == (h, w) else cv2.resize(image, (rw, rh), interpolation=interp)
    canvas = np.empty((th, tw, 3), dtype=np.uint8)
    canvas[:] = np.asarray(fill, dtype=np.uint8)
    canvas[:rh, :rw] = resized
    return canvas, Letterbox(original=(h, w), resized=(rh, rw), canvas=(th, tw))


def pad_value(mean: tuple[float, ...]) -> tuple[int, int, int]:
    """The uint8 colour that normalises to zero (used to fill letterbox padding)."""
    return tuple(int(round(m * 255)) for m in mean)


def sliding_window_tiles(height: int, width: int, tile: int | tuple[int, int],
                         overlap: float = SLIDING_OVERLAP) -> list[tuple[int, int, int, int]]:
    """The windows of the official sliding-window evaluation, each once (the official loop ran every tile twice).

    Tiles move by stride = ceil(tile * (1 - overlap)) along each axis; the last row/column is flush with the
    bottom/right border. Along an axis shorter than the tile there is one window covering the whole axis (the
    caller pads it to the tile size).

    Args:
        height, width: image size.
        tile: tile size, one int (square) or (tile_h, tile_w): the model input.
        overlap: fraction of a tile shared with its neighbour, 0 <= overlap < 1 (official: 2/3).
    Returns:
        (y1, y2, x1, x2) per window, row by row.
    """
    tile_h, tile_w = _check_tiling(height, width, tile, overlap)
    rows, columns = _spans(height, tile_h, overlap), _spans(width, tile_w, overlap)
    return [(y1, y2, x1, x2) for y1, y2 in rows for x1, x2 in columns]


def sliding_window_count(height: int, width: int, tile: int | tuple[int, int],
                         overlap: float = SLIDING_OVERLAP) -> int:
    """len(sliding_window_tiles(...)), counted per axis without listing the windows (a 1 x 8M image has 195k)."""
    tile_h, tile_w = _check_tiling(height, width, tile, overlap)
    return _span_count(height, tile_h, overlap) * _span_count(width, tile_w, overlap)


def _check_tiling(height: int, width: int, tile: int | tuple[int, int], overlap: float) -> tuple[int, int]:
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap={overlap} is invalid; expected 0 <= overlap < 1 (the official value is 2/3)")
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    if tile_h < 1 or tile_w < 1 or height < 1 or width < 1:
        raise ValueError(f"cannot tile a {height}x{width} image with {tile_h}x{tile_w} tiles; expected sizes >= 1")
    return tile_h, tile_w


def _span_count(length: int, size: int, overlap: float) -> int:
    """Windows along one axis: the last one flush with the border; one when the axis is shorter than the tile."""
    stride = max(1, math.ceil(size * (1 - overlap)))
    return max(1, math.ceil((length - size) / stride) + 1)


def _spans(length: int, size: int, overlap: float) -> list[tuple[int, int]]:
    stride = max(1, math.ceil(size * (1 - overlap)))
    ends = [min(i * stride + size, length) for i in range(_span_count(length, size, overlap))]
    return [(max(end - size, 0), end) for end in ends]


def colorize(labels: np.ndarray, palette: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    """Label map (H, W) -> RGB (H, W, 3); labels outside the palette (e.g. 255) are black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return lut[labels.astype(np.uint8)]


def palette_png(labels: np.ndarray, palette: tuple[tuple[int, int, int], ...]) -> bytes:
    """Label map (H, W) as an indexed ("P" mode) PNG: pixel values are class ids, colours from the palette."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [v for color in palette for v in color]
    image.putpalette(flat + [0] * (768 - len(flat)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def overlay(image: np.ndarray, labels: np.ndarray, palette: tuple[tuple[int, int, int], ...],
            alpha: float = 0.5) -> np.ndarray:
    """Blends the colourised labels over the RGB image: (1 - alpha) * image + alpha * colours."""
    colors = colorize(labels, palette)
    blended = image.astype(np.float32) * (1 - alpha) + colors.astype(np.float32) * alpha
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    """uint8 RGB (H, W, 3) (e.g. an overlay) as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
