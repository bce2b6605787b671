"""PASCAL VOC 2012 (with SBD's train_aug list) and the paper's point and scribble labels.

Layout: ``JPEGImages/<id>.jpg``, full labels ``SegmentationClass/<id>.png`` (indexed PNG, 255 void), sparse
labels ``point/<id>.png`` and ``scribble/<id>.png`` (the official ``point/segcls`` and ``scribble/seginst``
sub-folders are found too), splits ``ImageSets/Segmentation/{train_aug,val}.txt`` (stock VOC's 1,464-image
``train.txt`` only when named with ``--train-list``: see docs/paper-vs-code.md). Split files may also be in the
official AGMM format, ``<name>.jpg <name>.png`` per line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from agmm_deploy.constants import VOC_CLASSES, VOC_PALETTE
from agmm_deploy.datasets import (OFFICIAL_BACKBONE_WEIGHTS, TRAIN_LIST, VAL_LIST, DataError, DataFormat, Flag,
                                  Sample, check_files, read_list, require_dir, require_root)

LABELS = ("point", "scribble")
# Images in the SBD-augmented VOC training list the paper trains on (train_aug.txt).
AUG_IMAGES = 10582
SPARSE_FOLDERS = {"point": ("point/segcls", "point"), "scribble": ("scribble/seginst", "scribble")}


def samples(root: str | Path, split: str, label: str = "full", list_file: str | Path | None = None) -> list[Sample]:
    """(image, label) pairs of a VOC split; ``label`` is full (SegmentationClass), point or scribble."""
    root = Path(root)
    require_dir(root / "JPEGImages", "a VOC root holding JPEGImages/ and SegmentationClass/")
    if label == "full":
        label_dir = require_dir(root / "SegmentationClass", "VOC full labels in SegmentationClass/")
    elif label in SPARSE_FOLDERS:
        candidates = [root / sub for sub in SPARSE_FOLDERS[label]]
        found = [c for c in candidates if c.is_dir()]
        if not found:
            raise DataError(f"no {label} labels under {root}: expected {candidates[1]}/<id>.png "
                            f"(or the official {candidates[0]}/)")
        label_dir = found[0]
    else:
        raise DataError(f"label={label!r} is not a VOC setting; expected point, scribble or full")
    if list_file is None:
        sets = root / "ImageSets" / "Segmentation"
        list_file = sets / ("train_aug.txt" if split == "train" else f"{split}.txt")
        if split == "train" and not list_file.is_file():
            raise DataError(_missing_train_aug(list_file, sets / "train.txt"))
        if not list_file.is_file():
            raise DataError(f"no split file for {split!r}: expected {list_file} (or pass --{split}-list)")
    rows = read_list(Path(list_file))
    pairs = []
    for row in rows:
        if len(row) == 2:  # official format: "<name>.jpg <name>.png"
            pairs.append(Sample(root / "JPEGImages" / row[0], label_dir / Path(row[1]).name))
        else:
            pairs.append(Sample(root / "JPEGImages" / f"{row[0]}.jpg", label_dir / f"{row[0]}.png"))
    return check_files(pairs, f"split file {list_file}")


def _missing_train_aug(train_aug: Path, train: Path) -> str:
    """The refusal of a VOC root without the paper's training list: stock VOC's train.txt is 7x smaller."""
    found = (f"{train} lists {len(read_list(train))} images (stock VOC 2012: 1,464)" if train.is_file()
             else f"nor is there a {train.name}")
    return (f"{train_aug} does not exist: the paper trains on the {AUG_IMAGES:,}-image SBD-augmented list (shipped "
            f"with the official AGMM code as dataset/splits/pascal/train.txt), and {found}. Save that list as "
            f"{train_aug}, or pass --train-list {train} to train on those images on purpose")


def train_samples(root: Path, options: Mapping[str, Any]) -> list[Sample]:
    return samples(require_root(root), "train", label=options.get("label") or "point",
                   list_file=options.get("train_list"))


def val_samples(root: Path, options: Mapping[str, Any]) -> list[Sample]:
    return samples(require_root(root), "val", label="full", list_file=options.get("val_list"))


def official_mode(value: Any) -> dict[str, Any]:
    """The official dataset/sass.py: 'point' -> point/segcls, 'scribble' -> scribble/seginst."""
    if value in LABELS:
        return {"label": value}
    raise ValueError(" cannot be mapped for dataset pascal; expected 'point' or 'scribble' (or --label). Training on "
                     "full labels is not supported")


def write_synthetic(root: Path, split: str, index: int, rng: np.random.Generator, height: int, width: int,
                    click_radius: int) -> str:
    """One VOC-like image (JPEG), its indexed full label and, for training images, its point and scribble labels."""
    from PIL import Image

    from agmm_deploy.datasets.synthetic import class_texture, object_label, sample_points, sample_scribbles, save_png

    image_id = f"{2007 if split == 'train' else 2008}_{index:06d}"
    full = object_label(rng, height, width, len(VOC_CLASSES), void_border=True)
    image = class_texture(full, np.asarray(VOC_PALETTE), rng)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
    save_png(full, root / "SegmentationClass" / f"{image_id}.png", palette=VOC_PALETTE)
    if split == "train":
        save_png(sample_points(full, rng, click_radius), root / "point" / f"{image_id}.png")
        save_png(sample_scribbles(full, rng), root / "scribble" / f"{image_id}.png")
    return image_id


def finish_synthetic(root: Path, ids: dict[str, list[str]]) -> None:
    """The VOC split files: one image id per line; the training ids also as train_aug.txt, the paper's list."""
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split, split_ids in ids.items():
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
    if "train" in ids:
        (sets / "train_aug.txt").write_text("".join(f"{i}\n" for i in ids["train"]))


FORMAT = DataFormat(
    name="pascal",
    title="PASCAL VOC",
    layout="JPEGImages/<id>.jpg, SegmentationClass/<id>.png, point/<id>.png, scribble/<id>.png, "
           "ImageSets/Segmentation/{train_aug,val}.txt",
    classes=VOC_CLASSES,
    palette=VOC_PALETTE,
    # The official configs/pascal.yaml; lr is for the official GPU count.
    model=dict(backbone="resnet101", num_classes=len(VOC_CLASSES), multi_grid=False, aspp_rates=(6, 12, 18)),
    recipe=dict(crop_size=321, epochs=80, batch_size=16, lr=1e-3, head_lr_mult=10.0, colour_aug=True),
    flags=(Flag("label", str, LABELS, "point", "sparse labels: point/ or scribble/ (default point)"), TRAIN_LIST,
           VAL_LIST),
    train_samples=train_samples,
    val_samples=val_samples,
    official_mode=official_mode,
    val_mode="whole",
    eval_mode="multiscale",
    official_input_size=(321, 321),
    pretrained_source=OFFICIAL_BACKBONE_WEIGHTS,
    write_synthetic=write_synthetic,
    finish_synthetic=finish_synthetic,
)
