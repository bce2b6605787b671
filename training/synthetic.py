"""Synthetic data sets in the real Cityscapes, VOC and folder layouts, for tests and the demo.

Each class has its own colour (its palette colour) and stripe texture (orientation and period by class id),
so a small network can learn them in minutes on a CPU. Every image comes with its full label and with the
sparse labels of the paper's settings, sampled from the full label:

* Cityscapes: ``{20,50,100}clicks/<gtFine basename>``: that many clicks per image, each a small disk
  inside the clicked segment; unlabelled pixels hold 255.
* VOC: ``point/<id>.png`` (one click per connected region of each class, background included) and
  ``scribble/<id>.png`` (a 3-pixel-wide polyline through each region).
* folder: ``train/labels/<name>.png`` with 20 clicks per image, ``classes.txt``.

    python -m training.synthetic --dataset cityscapes --out data/city --num-train 40 --num-val 8 \\
        --height 128 --width 256 --seed 0
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from agmm_deploy.constants import (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, IGNORE_INDEX, VOC_CLASSES,
                                   VOC_PALETTE, default_palette)

CLICK_SETTINGS = (20, 50, 100)
FOLDER_CLASSES = ("background", "disk", "box", "wedge")
CITIES = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau")}
# Cityscapes train ids used for the scene's backdrop: road at the bottom, building in the middle, sky on top.
ROAD, BUILDING, SKY = 0, 2, 10


@dataclass(frozen=True)
class SyntheticDataset:
    """What ``generate`` wrote: the data root and the number of images per split."""

    root: Path
    dataset: str
    num_train: int
    num_val: int


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


def _random_shape(canvas: np.ndarray, value: int, rng: np.random.Generator, min_frac: float, max_frac: float) -> None:
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


def street_label(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A Cityscapes-like scene: sky, buildings and road bands, objects of any class, a void ego-car strip."""
    label = np.full((height, width), BUILDING, dtype=np.uint8)
    horizon = int(height * rng.uniform(0.25, 0.4))
    road_top = int(height * rng.uniform(0.55, 0.7))
    label[:horizon] = SKY
    label[road_top:] = ROAD
    for _ in range(int(rng.integers(4, 9))):
        _random_shape(label, int(rng.integers(0, len(CITYSCAPES_CLASSES))), rng, 0.08, 0.3)
    label[height - max(1, height // 16):] = IGNORE_INDEX  # ego vehicle: void in Cityscapes ground truth
    return label


def object_label(rng: np.random.Generator, height: int, width: int, num_classes: int,
                 void_border: bool) -> np.ndarray:
    """A VOC-like image: background 0 and 1-3 objects of classes 1..K-1, optionally with 255 outlines."""
    label = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        _random_shape(label, int(rng.integers(1, num_classes)), rng, 0.15, 0.4)
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


def _save_png(array: np.ndarray, path: Path, palette=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette is not None:  # VOC ground truth is an indexed PNG
        image = image.convert("P")
        flat = [v for colour in palette for v in colour]
        image.putpalette(flat + [0] * (768 - len(flat)))
    image.save(path)


def _write_cityscapes(root: Path, split: str, index: int, rng, height: int, width: int, click_radius: int) -> None:
    cities = CITIES[split]
    city = cities[index % len(cities)]
    stem = f"{city}_{index:06d}_000019"
    full = street_label(rng, height, width)
    image = class_texture(full, np.asarray(CITYSCAPES_PALETTE), rng)
    _save_png(image, root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
    gt_name = f"{stem}_gtFine_labelTrainIds.png"
    _save_png(full, root / "gtFine" / split / city / gt_name)
    if split == "train":
        for clicks in CLICK_SETTINGS:
            _save_png(sample_clicks(full, clicks, rng, click_radius), root / f"{clicks}clicks" / gt_name)


def _write_voc(root: Path, split: str, index: int, rng, height: int, width: int, click_radius: int) -> str:
    image_id = f"{2007 if split == 'train' else 2008}_{index:06d}"
    full = object_label(rng, height, width, len(VOC_CLASSES), void_border=True)
    image = class_texture(full, np.asarray(VOC_PALETTE), rng)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
    _save_png(full, root / "SegmentationClass" / f"{image_id}.png", palette=VOC_PALETTE)
    if split == "train":
        _save_png(sample_points(full, rng, click_radius), root / "point" / f"{image_id}.png")
        _save_png(sample_scribbles(full, rng), root / "scribble" / f"{image_id}.png")
    return image_id


def _write_folder(root: Path, split: str, index: int, rng, height: int, width: int, click_radius: int) -> None:
    name = f"{split}_{index:05d}"
    full = object_label(rng, height, width, len(FOLDER_CLASSES), void_border=False)
    image = class_texture(full, np.asarray(default_palette(len(FOLDER_CLASSES))), rng)
    _save_png(image, root / split / "images" / f"{name}.png")
    label = sample_clicks(full, 20, rng, click_radius) if split == "train" else full
    _save_png(label, root / split / "labels" / f"{name}.png")


def generate(dataset: str, out: str | Path, num_train: int, num_val: int, height: int, width: int,
             seed: int = 0, click_radius: int = 2, progress: bool = True) -> SyntheticDataset:
    """Writes a synthetic ``cityscapes`` | ``pascal`` | ``folder`` data set under ``out``.

    Image ``i`` of a split depends only on (seed, split, i), so data sets of different sizes share images.
    """
    writers = {"cityscapes": _write_cityscapes, "pascal": _write_voc, "folder": _write_folder}
    if dataset not in writers:
        raise ValueError(f"dataset={dataset!r} is not supported; expected one of {sorted(writers)}")
    if min(height, width) < 16 or num_train < 1 or num_val < 0:
        raise ValueError(f"need height, width >= 16, num_train >= 1 and num_val >= 0; got {height}x{width}, "
                         f"{num_train} train, {num_val} val")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    ids: dict[str, list[str]] = {"train": [], "val": []}
    jobs = [("train", i) for i in range(num_train)] + [("val", i) for i in range(num_val)]
    for split, index in tqdm(jobs, desc=f"synthetic {dataset}", disable=not progress, unit="img"):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
        ids[split].append(writers[dataset](root, split, index, rng, height, width, click_radius))
    if dataset == "pascal":  # the VOC split files: one image id per line
        sets = root / "ImageSets" / "Segmentation"
        sets.mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids[split]))
    if dataset == "folder":
        (root / "classes.txt").write_text("".join(f"{name}\n" for name in FOLDER_CLASSES))
    return SyntheticDataset(root=root, dataset=dataset, num_train=num_train, num_val=num_val)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a synthetic data set in the Cityscapes, VOC or folder layout")
    parser.add_argument("--dataset", choices=("cityscapes", "pascal", "folder"), default="cityscapes")
    parser.add_argument("--out", required=True, help="data root to write")
    parser.add_argument("--num-train", type=int, default=40)
    parser.add_argument("--num-val", type=int, default=8)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--click-radius", type=int, default=2, help="radius in pixels of each click's disk")
    return parser


def main(argv: list[str] | None = None) -> SyntheticDataset:
    args = get_args_parser().parse_args(argv)
    result = generate(args.dataset, args.out, args.num_train, args.num_val, args.height, args.width, args.seed,
                      args.click_radius)
    print(f"wrote {result.num_train} train and {result.num_val} val images ({result.dataset} layout) to {result.root}")
    return result


if __name__ == "__main__":
    main()
