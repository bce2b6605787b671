"""Cityscapes with the paper's click labels.

Layout: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png``, full labels
``gtFine/{split}/<city>/*_gtFine_labelTrainIds.png`` (train ids 0..18, 255 void), sparse labels
``{20,50,100}clicks/<gtFine basename>``; ``*_gtFine_labelIds.png`` (the official ids) are read only by the
official evaluation (``python -m training.cityscapes_eval``). Split files may be given in the official AGMM format,
``<leftImg8bit path> <gtFine path>`` per line, relative to the root.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from agmm_deploy.constants import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, IGNORE_INDEX
from agmm_deploy.datasets import (OFFICIAL_BACKBONE_WEIGHTS, TRAIN_LIST, VAL_LIST, DataError, DataFormat, Flag,
                                  Sample, check_files, read_list, require_dir, require_root)

CLICKS = (20, 50, 100)


def _label_ids() -> tuple[int, ...]:
    """The official labelIds of train ids 0..18 (cityscapesscripts' table): what gtFine_labelIds.png and the
    official evaluation (evalPixelLevelSemanticLabeling) use."""
    from cityscapesscripts.helpers.labels import labels

    return tuple(lab.id for lab in sorted((lab for lab in labels if 0 <= lab.trainId < 255), key=lambda l: l.trainId))


LABEL_IDS = _label_ids()
UNLABELLED_ID = 0  # 'unlabeled': void (train id 255) in gtFine_labelIds.png, ignored by the official evaluation
CITIES = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau")}
# Cityscapes train ids used for a synthetic scene's backdrop: road at the bottom, building in the middle, sky on top.
ROAD, BUILDING, SKY = 0, 2, 10


def samples(root: str | Path, split: str, clicks: int | None = None,
            list_file: str | Path | None = None) -> list[Sample]:
    """(image, label) pairs of a Cityscapes split; the label is ``{clicks}clicks/...`` when clicks is given."""
    root = Path(root)
    require_dir(root, "a Cityscapes root holding leftImg8bit/ and gtFine/")
    if clicks is not None and clicks not in CLICKS:
        raise DataError(f"clicks={clicks} is not a Cityscapes setting; expected one of {CLICKS}")
    if list_file is not None:
        rows = read_list(Path(list_file))
        if any(len(row) != 2 for row in rows):
            raise DataError(f"split file {list_file}: Cityscapes lists need '<leftImg8bit path> <gtFine path>'")
        pairs = [(root / img, root / gt) for img, gt in rows]
        source = f"split file {list_file}"
    else:
        image_dir = require_dir(root / "leftImg8bit" / split, f"Cityscapes images in leftImg8bit/{split}/<city>/")
        images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
        pairs = [(img, root / "gtFine" / split / img.parent.name /
                  img.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")) for img in images]
        source = str(image_dir)
    if clicks is not None:
        sparse_dir = require_dir(root / f"{clicks}clicks", f"the {clicks}-click labels ({clicks}clicks/<gtFine name>)")
        pairs = [(img, sparse_dir / gt.name) for img, gt in pairs]
    return check_files([Sample(img, label) for img, label in pairs], source)


def train_samples(root: Path, options: Mapping[str, Any]) -> list[Sample]:
    return samples(require_root(root), "train", clicks=options.get("clicks"), list_file=options.get("train_list"))


def val_samples(root: Path, options: Mapping[str, Any]) -> list[Sample]:
    return samples(require_root(root), "val", list_file=options.get("val_list"))


def official_mode(value: Any) -> dict[str, Any]:
    """The official dataset/sass.py reads 'point' as 100clicks/; its other values mean full labels or a
    random_50clicks/ folder, not trained on here."""
    clicks = re.fullmatch(r"(\d+)clicks", str(value))
    if value == "point" or (clicks and int(clicks[1]) in CLICKS):
        return {"clicks": 100 if value == "point" else int(clicks[1])}
    expected = "'point' (= 100 clicks) or " + ", ".join(f"'{n}clicks'" for n in CLICKS) + " (or --clicks)"
    raise ValueError(f" cannot be mapped for dataset cityscapes; expected {expected}. Training on full labels is "
                     "not supported")


def street_label(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A Cityscapes-like scene: sky, buildings and road bands, objects of any class, a void ego-car strip."""
    from agmm_deploy.datasets.synthetic import random_shape

    label = np.full((height, width), BUILDING, dtype=np.uint8)
    horizon = int(height * rng.uniform(0.25, 0.4))
    road_top = int(height * rng.uniform(0.55, 0.7))
    label[:horizon] = SKY
    label[road_top:] = ROAD
    for _ in range(int(rng.integers(4, 9))):
        random_shape(label, int(rng.integers(0, len(CITYSCAPES_CLASSES))), rng, 0.08, 0.3)
    label[height - max(1, height // 16):] = IGNORE_INDEX  # ego vehicle: void in Cityscapes ground truth
    return label


def write_synthetic(root: Path, split: str, index: int, rng: np.random.Generator, height: int, width: int,
                    click_radius: int) -> str:
    """One street scene with its full label and, for training images, its 20/50/100-click labels."""
    from agmm_deploy.datasets.synthetic import class_texture, sample_clicks, save_png

    cities = CITIES[split]
    city = cities[index % len(cities)]
    stem = f"{city}_{index:06d}_000019"
    full = street_label(rng, height, width)
    image = class_texture(full, np.asarray(CITYSCAPES_PALETTE), rng)
    save_png(image, root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
    gt_name = f"{stem}_gtFine_labelTrainIds.png"
    save_png(full, root / "gtFine" / split / city / gt_name)
    # The official evaluation reads labelIds ground truth: train ids mapped back, void -> 'unlabeled'.
    label_ids = np.full(256, UNLABELLED_ID, np.uint8)
    label_ids[:len(LABEL_IDS)] = LABEL_IDS
    save_png(label_ids[full], root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    if split == "train":
        for clicks in CLICKS:
            save_png(sample_clicks(full, clicks, rng, click_radius), root / f"{clicks}clicks" / gt_name)
    return stem


def finish_synthetic(root: Path, ids: dict[str, list[str]]) -> None:
    """Nothing to add: the folder tree is the split."""


FORMAT = DataFormat(
    name="cityscapes",
    title="Cityscapes",
    layout="leftImg8bit/{train,val}/<city>/*_leftImg8bit.png, gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png, "
           "{20,50,100}clicks/<gtFine name>",
    classes=CITYSCAPES_CLASSES,
    palette=CITYSCAPES_PALETTE,
    # The official configs/cityscapes.yaml; lr is for the official GPU count.
    model=dict(backbone="resnet50", num_classes=len(CITYSCAPES_CLASSES), multi_grid=True, aspp_rates=(12, 24, 36)),
    recipe=dict(crop_size=721, epochs=240, batch_size=4, lr=5e-3, head_lr_mult=1.0, colour_aug=False),
    flags=(Flag("clicks", int, CLICKS, 100, "sparse labels: the {N}clicks/ folder (default 100)"), TRAIN_LIST,
           VAL_LIST),
    train_samples=train_samples,
    val_samples=val_samples,
    official_mode=official_mode,
    # Official schedule: center-crop validation, sliding window for the last 20 epochs.
    val_mode="center",
    final_val_mode="sliding",
    final_val_epochs=20,
    eval_mode="sliding",
    official_input_size=(721, 721),  # the paper says 769; the official code crops 721
    pretrained_source=OFFICIAL_BACKBONE_WEIGHTS,
    official_ids=LABEL_IDS,
    write_synthetic=write_synthetic,
    finish_synthetic=finish_synthetic,
)
