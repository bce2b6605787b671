"""Segmentation of uint8 RGB images of any size with any runner: letterbox or sliding-window tiles in, class
probabilities or label maps at the original size out. Used by agmm-predict, the service and the parity checks.
"""

from __future__ import annotations

import numpy as np

from agmm_deploy.runtime import Runner
from agmm_deploy.transforms import (SLIDING_OVERLAP, Letterbox, letterbox, normalize, pad_value, sliding_window_tiles,
                                   unletterbox)


def batch_image_scores(runner: Runner, images: list[np.ndarray], *,
                       overlap: float = SLIDING_OVERLAP) -> list[np.ndarray]:
    """Class probabilities for uint8 RGB images of any sizes, the model run on all of them together.

    An image that fits the model input is letterboxed (resized to fit, padded with the colour that normalises
    to 0) and its logits are mapped back before the softmax. A larger image (along either axis) is cut into
    input-size tiles by ``sliding_window_tiles`` (official overlap 2/3; tiles past a short axis padded bottom/right)
    and the tiles' softmax is averaged where they overlap, as in the official sliding-window evaluation.
    The canvases and tiles of all images go through the runner in chunks of ``runner.max_batch``.

    Args:
        runner: any runner (see ``load_runner``).
        images: uint8 RGB arrays (H_i, W_i, 3).
        overlap: sliding-window overlap for images larger than the model input.
    Returns:
        One float32 array (K, H_i, W_i) per image; it sums to 1 over K.
    """
    return _batch_scores(runner, images, overlap=overlap, softmax_whole=True)


def segment_images(runner: Runner, images: list[np.ndarray], *,
                   overlap: float = SLIDING_OVERLAP) -> list[np.ndarray]:
    """Class ids (H_i, W_i) uint8 for uint8 RGB images of any sizes: the argmax of ``batch_image_scores``.

    Letterboxed images skip the softmax (it does not change the argmax, and on a CPU server it costs about
    as much as the argmax itself), so serving pays only for what the label map needs.
    """
    scores = _batch_scores(runner, images, overlap=overlap, softmax_whole=False)
    return [s.argmax(axis=0).astype(np.uint8) for s in scores]


def _batch_scores(runner: Runner, images: list[np.ndarray], *, overlap: float,
                  softmax_whole: bool) -> list[np.ndarray]:
    """batch_image_scores / segment_images; ``softmax_whole=False`` leaves letterboxed images as logits."""
    if not 0 <= overlap < 1:  # checked here too: images that fit the input never reach the tiling
        raise ValueError(f"overlap={overlap} is invalid; expected 0 <= overlap < 1 (the official value is 2/3)")
    meta = runner.meta
    th, tw = runner.input_size
    fill = pad_value(meta.mean)
    # One runner input per entry: (image index, uint8 (th, tw, 3) canvas or tile, where its output goes).
    inputs: list[tuple[int, np.ndarray, Letterbox | tuple[int, int, int, int]]] = []
    for index, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            shape = getattr(image, "shape", type(image).__name__)
            dtype = getattr(image, "dtype", "")
            raise ValueError(f"image {index} is {shape} {dtype}; expected a uint8 RGB array (H, W, 3), e.g. from "
                             "agmm_deploy.transforms.read_image")
        h, w = image.shape[:2]
        if h <= th and w <= tw:
            canvas, box = letterbox(image, (th, tw), fill=fill)
            inputs.append((index, canvas, box))
            continue
        for y1, y2, x1, x2 in sliding_window_tiles(h, w, (th, tw), overlap):
            tile = image[y1:y2, x1:x2]
            if tile.shape[:2] != (th, tw):  # the image is shorter than the tile along one axis
                padded = np.empty((th, tw, 3), dtype=np.uint8)
                padded[:] = np.asarray(fill, dtype=np.uint8)
                padded[:y2 - y1, :x2 - x1] = tile
                tile = padded
            inputs.append((index, tile, (y1, y2, x1, x2)))

    results: list[np.ndarray | None] = [None] * len(images)
    counts: dict[int, np.ndarray] = {}  # tiled images: how many tiles covered each pixel (H, W)
    for start in range(0, len(inputs), runner.max_batch):
        chunk = inputs[start:start + runner.max_batch]
        logits = runner(normalize(np.stack([item[1] for item in chunk]), meta.mean, meta.std))  # (B, K, th, tw)
        for (index, _, place), scores in zip(chunk, logits):
            if isinstance(place, Letterbox):
                restored = unletterbox(scores, place)
                results[index] = _softmax(restored) if softmax_whole else restored
                continue
            y1, y2, x1, x2 = place
            if results[index] is None:
                h, w = images[index].shape[:2]
                results[index] = np.zeros((meta.num_classes, h, w), dtype=np.float32)
                counts[index] = np.zeros((h, w), dtype=np.float32)
            results[index][:, y1:y2, x1:x2] += _softmax(scores)[:, :y2 - y1, :x2 - x1]
            counts[index][y1:y2, x1:x2] += 1
    for index, count in counts.items():
        results[index] /= count[None]
    return results


def image_scores(runner: Runner, image: np.ndarray, *, overlap: float = SLIDING_OVERLAP) -> np.ndarray:
    """Class probabilities (K, H, W) float32 for one uint8 RGB image (H, W, 3) of any size (see batch_image_scores)."""
    return batch_image_scores(runner, [image], overlap=overlap)[0]


def segment_image(runner: Runner, image: np.ndarray, *, overlap: float = SLIDING_OVERLAP) -> np.ndarray:
    """Class ids (H, W) uint8 for one uint8 RGB image of any size (see segment_images)."""
    return segment_images(runner, [image], overlap=overlap)[0]


def _softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted


__all__ = ["batch_image_scores", "image_scores", "segment_images", "segment_image"]
