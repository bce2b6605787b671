"""Segmentation of images of any size, as torch ops on the device the model runs on.

One implementation of the letterbox and of the official sliding window, used by agmm-predict, the service
and training's sliding-window evaluation:

- An image that fits the model input is letterboxed: resized to fit keeping its aspect ratio, padded
  bottom/right with zeros after normalisation (the mean colour), and its logits are cropped and resized back to
  the image's size.
- A larger image (along either axis) is cut into input-size tiles by ``sliding_window_tiles`` (official overlap
  2/3; a tile past a short axis is padded bottom/right with zeros), and the tiles' softmax is averaged where
  they overlap, as in the official sliding-window evaluation.

``Tiles`` holds one image's side of this (its model inputs, made a slice at a time, and the accumulation of
the model's outputs), so that a caller may run the inputs of many images together in batches of its choosing:
``segment_images`` in chunks of ``runner.max_batch``, the service in batches across requests. Everything stays
on the image tensor's device; only the final uint8 label map (or the scores, when asked for) leaves it.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from agmm_deploy.runtime import Runner
from agmm_deploy.transforms import SLIDING_OVERLAP, sliding_window_count, sliding_window_tiles

Forward = Callable[[torch.Tensor], torch.Tensor]  # normalised (N, 3, h, w) float32 -> logits (N, K, h, w)


def input_count(height: int, width: int, input_size: tuple[int, int], overlap: float = SLIDING_OVERLAP) -> int:
    """How many model inputs an image costs: 1 when it fits the input (letterbox), else its sliding-window tiles.

    Computed from the size alone, so that a request's cost is known before any pixel is processed.
    """
    th, tw = input_size
    if height <= th and width <= tw:
        return 1
    return sliding_window_count(height, width, (th, tw), overlap)


class Tiles:
    """One image as model inputs, and the model's outputs gathered back at the image's size.

    Args:
        image: (3, H, W), uint8 RGB when ``mean``/``std`` are given (normalised here, a slice at a time), else
            already normalised float32. Its device is where all the work happens.
        input_size: (th, tw) the model takes.
        num_classes: K.
        mean, std: the model's normalisation (``meta.mean``/``meta.std``) for a uint8 image.
        overlap: sliding-window overlap, 0 <= overlap < 1.
        letterbox: letterbox an image that fits the input (else it is one padded tile, as in training's
            sliding-window evaluation).
    Shape:
        ``inputs(start, stop)``: (stop - start, 3, th, tw) float32; ``add(start, logits)`` takes
        (n, K, th, tw) for the inputs start:start + n; ``scores()``: (K, H, W) float32 summing to 1 over K;
        ``labels()``: (H, W) uint8.
    """

    def __init__(self, image: torch.Tensor, input_size: tuple[int, int], num_classes: int, *,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 overlap: float = SLIDING_OVERLAP, letterbox: bool = True) -> None:
        if not 0 <= overlap < 1:  # checked here too: images that fit the input never reach the tiling
            raise ValueError(f"overlap={overlap} is invalid; expected 0 <= overlap < 1 (the official value is 2/3)")
        self.image = image
        self.input_size = (th, tw) = tuple(input_size)
        self.num_classes = num_classes
        self.size = (h, w) = tuple(image.shape[1:])
        self.device = image.device
        if mean is not None and std is not None:
            self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
            self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(3, 1, 1)
        else:
            self._mean = self._std = None
        self.letterboxed = letterbox and h <= th and w <= tw
        if self.letterboxed:
            scale = min(th / h, tw / w)
            self.resized = (max(1, min(th, round(h * scale))), max(1, min(tw, round(w * scale))))
            self.boxes = [(0, h, 0, w)]
        else:
            self.boxes = sliding_window_tiles(h, w, (th, tw), overlap)
        self.count = len(self.boxes)
        self.added = 0
        self._sum: torch.Tensor | None = None  # letterbox: logits (K, H, W); tiles: summed softmax (K, H, W)
        self._covered: torch.Tensor | None = None  # tiles: how many tiles covered each pixel (1, H, W)

    def _normalised(self, region: torch.Tensor) -> torch.Tensor:
        """(..., 3, h, w) -> float32 (x / 255 - mean) / std, in the order of transforms.normalize (same bits)."""
        if self._mean is None:
            return region.float()
        return (region.float() * (1.0 / 255.0) - self._mean) / self._std

    def inputs(self, start: int, stop: int) -> torch.Tensor:
        """The model inputs start:stop (n, 3, th, tw) float32, made now (a 300-tile image never holds them all)."""
        th, tw = self.input_size
        if self.letterboxed:
            # Bilinear with antialiasing: a plain bilinear shrink would skip pixels and alias. On a CPU the uint8
            # image is resized before normalising: torch's uint8 path is ~4x faster there (500x375 -> 512x384 on
            # 2 cores: 17 ms against 77 ms); CUDA resizes floats only.
            if self.resized == self.size:
                x = self._normalised(self.image)[None]
            elif self.device.type == "cpu" and self.image.dtype == torch.uint8:
                x = self._normalised(F.interpolate(self.image[None], size=self.resized, mode="bilinear",
                                                   align_corners=False, antialias=True))
            else:
                x = F.interpolate(self._normalised(self.image)[None], size=self.resized, mode="bilinear",
                                  align_corners=False, antialias=True)
            rh, rw = self.resized
            return F.pad(x, (0, tw - rw, 0, th - rh))  # zero after normalising: the mean colour
        tiles = []
        for y1, y2, x1, x2 in self.boxes[start:stop]:
            tile = self._normalised(self.image[:, y1:y2, x1:x2])
            tiles.append(F.pad(tile, (0, tw - (x2 - x1), 0, th - (y2 - y1))))  # along an axis shorter than the tile
        return torch.stack(tiles)

    def add(self, start: int, logits: torch.Tensor) -> None:
        """Takes the model's logits (n, K, th, tw) for the inputs start:start + n."""
        if self.letterboxed:
            rh, rw = self.resized
            if self.resized == self.size:
                # An image at the model size: a bilinear resize to the same size samples every pixel at its own
                # centre with weight 1, so it is the identity; skipping it saves ~5 ms of CPU per 256x256 image
                # (K = 21), 1/60 of the model's own time there.
                self._sum = logits[0, :, :rh, :rw]
            else:
                # Pixel-centre aligned bilinear (align_corners=False), as cv2.INTER_LINEAR: (K, H, W).
                self._sum = F.interpolate(logits[:, :, :rh, :rw], size=self.size, mode="bilinear",
                                          align_corners=False)[0]
            self.added = 1
            return
        if self._sum is None:
            self._sum = torch.zeros((self.num_classes, *self.size), dtype=torch.float32, device=logits.device)
            self._covered = torch.zeros((1, *self.size), dtype=torch.float32, device=logits.device)
        probs = torch.softmax(logits.float(), dim=1)
        for (y1, y2, x1, x2), p in zip(self.boxes[start:start + len(logits)], probs):
            self._sum[:, y1:y2, x1:x2] += p[:, :y2 - y1, :x2 - x1]
            self._covered[:, y1:y2, x1:x2] += 1
        self.added += len(logits)

    @property
    def done(self) -> bool:
        return self.added == self.count

    def scores(self) -> torch.Tensor:
        """Class probabilities (K, H, W) float32 on the image's device."""
        assert self.done, f"{self.added} of {self.count} model outputs added"
        if self.letterboxed:
            return torch.softmax(self._sum, dim=0)
        return self._sum / self._covered

    def labels(self) -> torch.Tensor:
        """Class ids (H, W) uint8 on the image's device.

        Neither the letterbox's softmax nor the tiles' division by their cover count changes the argmax, so both
        are skipped. ``max(0).indices`` rather than ``argmax(0)``: on a CPU the latter runs as a per-output loop
        over K strided planes (3x slower at 640x480, K = 21).
        """
        assert self.done, f"{self.added} of {self.count} model outputs added"
        return self._sum.max(dim=0).indices.to(torch.uint8)


def run_slices(forward: Forward, slices: list[tuple[Tiles, int, int]]) -> int:
    """Runs the model once on the inputs start:stop of every (tiles, start, stop), hands each its logits.

    Returns:
        How many model inputs ran together.
    """
    x = torch.cat([tiles.inputs(start, stop) for tiles, start, stop in slices])
    logits = forward(x)  # (N, K, th, tw)
    offset = 0
    for tiles, start, stop in slices:
        tiles.add(start, logits[offset:offset + stop - start])
        offset += stop - start
    return offset


def chunks(images: list[Tiles], size: int) -> Iterator[list[tuple[Tiles, int, int]]]:
    """The inputs of all ``images``, in order, as slices of at most ``size`` inputs in all."""
    batch: list[tuple[Tiles, int, int]] = []
    room = size
    for tiles in images:
        start = 0
        while start < tiles.count:
            stop = min(tiles.count, start + room)
            batch.append((tiles, start, stop))
            room -= stop - start
            start = stop
            if room == 0:
                yield batch
                batch, room = [], size
    if batch:
        yield batch


def image_tensor(image: np.ndarray, device: torch.device | str, name: str = "image") -> torch.Tensor:
    """A uint8 RGB array (H, W, 3) as a uint8 tensor (3, H, W) on ``device``."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", type(image).__name__)
        dtype = getattr(image, "dtype", "")
        raise ValueError(f"{name} is {shape} {dtype}; expected a uint8 RGB array (H, W, 3), e.g. from "
                         "agmm_deploy.transforms.read_image")
    if not image.flags.writeable:  # e.g. np.asarray of a PIL image; torch wants arrays it could write to
        image = image.copy()
    return torch.from_numpy(image).to(device).permute(2, 0, 1)


def image_tiles(runner: Runner, image: np.ndarray, *, overlap: float = SLIDING_OVERLAP,
                  name: str = "image") -> Tiles:
    """``Tiles`` of a uint8 RGB image (H, W, 3) for ``runner``'s model, on ``runner.device``."""
    meta = runner.meta
    return Tiles(image_tensor(image, runner.device, name), runner.input_size, meta.num_classes,
                   mean=meta.mean, std=meta.std, overlap=overlap)


@torch.no_grad()
def _segment(runner: Runner, images: list[np.ndarray], overlap: float) -> list[Tiles]:
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap={overlap} is invalid; expected 0 <= overlap < 1 (the official value is 2/3)")
    tiles = [image_tiles(runner, image, overlap=overlap, name=f"image {i}") for i, image in enumerate(images)]
    for batch in chunks(tiles, runner.max_batch):
        run_slices(runner.run, batch)
    return tiles


def batch_image_scores(runner: Runner, images: list[np.ndarray], *,
                       overlap: float = SLIDING_OVERLAP) -> list[np.ndarray]:
    """Class probabilities for uint8 RGB images of any sizes, the model run on all of them together.

    The canvases and tiles of all images go through the runner in chunks of ``runner.max_batch``.

    Args:
        runner: any runner (see ``agmm_deploy.runtime.load_runner``).
        images: uint8 RGB arrays (H_i, W_i, 3).
        overlap: sliding-window overlap for images larger than the model input.
    Returns:
        One float32 array (K, H_i, W_i) per image; it sums to 1 over K.
    """
    return [w.scores().cpu().numpy() for w in _segment(runner, images, overlap)]


def segment_images(runner: Runner, images: list[np.ndarray], *,
                   overlap: float = SLIDING_OVERLAP) -> list[np.ndarray]:
    """Class ids (H_i, W_i) uint8 for uint8 RGB images of any sizes: the argmax of ``batch_image_scores``."""
    return [w.labels().cpu().numpy() for w in _segment(runner, images, overlap)]


def image_scores(runner: Runner, image: np.ndarray, *, overlap: float = SLIDING_OVERLAP) -> np.ndarray:
    """Class probabilities (K, H, W) float32 for one uint8 RGB image (H, W, 3) of any size (see batch_image_scores)."""
    return batch_image_scores(runner, [image], overlap=overlap)[0]


def segment_image(runner: Runner, image: np.ndarray, *, overlap: float = SLIDING_OVERLAP) -> np.ndarray:
    """Class ids (H, W) uint8 for one uint8 RGB image of any size (see segment_images)."""
    return segment_images(runner, [image], overlap=overlap)[0]


@torch.no_grad()
def sliding_window_scores(forward: Forward, image: torch.Tensor, tile: tuple[int, int], num_classes: int, *,
                          overlap: float = SLIDING_OVERLAP, tiles_per_batch: int = 4) -> torch.Tensor:
    """Softmax averaged over overlapping tiles of a normalised image (1, 3, H, W) -> (1, K, H, W), every image
    tiled (one padded tile when it is smaller), as training's sliding-window evaluation does."""
    tiles = Tiles(image[0], tile, num_classes, overlap=overlap, letterbox=False)
    for batch in chunks([tiles], tiles_per_batch):
        run_slices(forward, batch)
    return tiles.scores()[None]


# The old names, kept while other branches still import them: these objects hold an image's tiles (a letterbox
# canvas is one tile), which "windows" did not say. Use Tiles and image_tiles.
Windows = Tiles
image_windows = image_tiles

__all__ = ["Tiles", "Windows", "batch_image_scores", "chunks", "image_scores", "image_tensor", "image_tiles",
           "image_windows", "input_count", "run_slices", "segment_image", "segment_images", "sliding_window_scores"]
