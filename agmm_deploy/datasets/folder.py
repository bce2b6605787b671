"""A user's own data: a folder of images with sparse labels, classes named in classes.txt.

Layout::

    classes.txt                one class per line: "<name>" or "<name> <R> <G> <B>" (its colour)
    train/images/<name>.jpg    any of agmm_deploy.constants.IMAGE_SUFFIXES
    train/labels/<name>.png    sparse labels: class ids 0..K-1, unlabelled pixels 255 (or K)
    val/images/<name>.jpg      optional: without val/ no mIoU is measured and no best.pt written
    val/labels/<name>.png      full labels: class ids, 255 = void

``python -m training.synthetic --dataset folder --out DIR`` writes a small example of this layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from agmm_deploy.constants import IMAGE_SUFFIXES, default_palette
from agmm_deploy.datasets import DataError, DataFormat, Sample, check_files, require_dir, require_root

CLASSES_FILE = "classes.txt"
# The classes of the synthetic example: shapes on a background.
SYNTHETIC_CLASSES = ("background", "disk", "box", "wedge")
SYNTHETIC_CLICKS = 20


def read_classes(root: Path) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """Class names (one per line of classes.txt) and their colours (given on every line, or the VOC colour map)."""
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        raise DataError(f"{path} does not exist; a folder data set needs classes.txt with one class name per line")
    names, colours = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split()
        if not words:
            continue
        if len(words) >= 4 and all(w.isdigit() for w in words[-3:]):  # "<name> R G B"
            colour = tuple(int(w) for w in words[-3:])
            if max(colour) > 255:
                raise DataError(f"{path} line {number}: colour {colour} is outside 0..255")
            names.append(" ".join(words[:-3]))
            colours.append(colour)
        else:
            names.append(line.strip())
    if len(names) < 2:
        raise DataError(f"{path} lists {len(names)} class(es); expected at least 2")
    if colours and len(colours) != len(names):
        raise DataError(f"{path} gives a colour ('<name> R G B') on {len(colours)} of {len(names)} lines; give "
                        "one on every line or on none")
    return tuple(names), tuple(colours) if colours else default_palette(len(names))


def samples(root: str | Path, split: str) -> list[Sample]:
    """(image, label) pairs of ``<root>/<split>/images`` and ``<root>/<split>/labels/<stem>.png``."""
    root = Path(root)
    image_dir = require_dir(root / split / "images", f"the {split} images of a folder data set")
    label_dir = require_dir(root / split / "labels", f"the {split} labels (<image stem>.png) of a folder data set")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return check_files([Sample(img, label_dir / f"{img.stem}.png") for img in images], str(image_dir))


def train_samples(root: Path, options: Mapping[str, Any]) -> list[Sample]:
    return samples(require_root(root), "train")


def val_samples(root: Path, options: Mapping[str, Any]) -> list[Sample] | None:
    root = require_root(root)
    return samples(root, "val") if (root / "val" / "images").is_dir() else None


def official_mode(value: Any) -> dict[str, Any]:
    raise ValueError(": a folder data set has one kind of label (train/labels/); remove the key")


def write_synthetic(root: Path, split: str, index: int, rng: np.random.Generator, height: int, width: int,
                    click_radius: int) -> str:
    """One image of shapes; training images get 20 clicks as their label, validation images the full label."""
    from agmm_deploy.datasets.synthetic import class_texture, object_label, sample_clicks, save_png

    name = f"{split}_{index:05d}"
    full = object_label(rng, height, width, len(SYNTHETIC_CLASSES), void_border=False)
    image = class_texture(full, np.asarray(default_palette(len(SYNTHETIC_CLASSES))), rng)
    save_png(image, root / split / "images" / f"{name}.png")
    label = sample_clicks(full, SYNTHETIC_CLICKS, rng, click_radius) if split == "train" else full
    save_png(label, root / split / "labels" / f"{name}.png")
    return name


def finish_synthetic(root: Path, ids: dict[str, list[str]]) -> None:
    (root / CLASSES_FILE).write_text("".join(f"{name}\n" for name in SYNTHETIC_CLASSES))


FORMAT = DataFormat(
    name="folder",
    title="folder",
    layout="classes.txt, train/images/*, train/labels/<stem>.png, optional val/images/*, val/labels/<stem>.png",
    classes=None,
    palette=None,
    read_classes=read_classes,
    # The Cityscapes architecture (multi-grid, ASPP 12/24/36) with the VOC schedule.
    model=dict(backbone="resnet50", multi_grid=True, aspp_rates=(12, 24, 36)),
    recipe=dict(crop_size=321, epochs=80, batch_size=8, lr=1e-3, head_lr_mult=10.0, colour_aug=False),
    train_samples=train_samples,
    val_samples=val_samples,
    official_mode=official_mode,
    # One's own data is evaluated as it will be served (agmm-predict, the service), in training and after.
    val_mode="served",
    eval_mode="served",
    write_synthetic=write_synthetic,
    finish_synthetic=finish_synthetic,
)
