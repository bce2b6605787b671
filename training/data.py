"""Cityscapes, VOC and folder data sets with the official AGMM training augmentations.

Layouts (docs/algorithm.md, "Labels"):

* Cityscapes: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png``, full labels
  ``gtFine/{split}/<city>/*_gtFine_labelTrainIds.png``, sparse labels ``{20,50,100}clicks/<gtFine basename>``.
* VOC: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``, sparse ``point/<id>.png`` and
  ``scribble/<id>.png`` (the official ``point/segcls`` and ``scribble/seginst`` sub-folders are found too),
  splits ``ImageSets/Segmentation/{train_aug,train,val}.txt``.
* folder: ``classes.txt``, ``train/images/*``, ``train/labels/<stem>.png`` (sparse), optional
  ``val/images/*`` and ``val/labels/<stem>.png`` (full).

Split files may also be given in the official AGMM format, ``<image> <label>`` per line (paths relative to
the root for Cityscapes, file names for VOC).

Training samples follow the official ``dataset/sass.py``: sparse label read, unlabelled pixels (255 or K)
set to K, ``cls_label`` taken from the whole label, then random scale 0.5-2.0 of the long side, crop with
image padding 0 and label padding 255, horizontal flip, and on VOC colour jitter, grayscale, blur and a
brightness shift. Each sample's randomness comes from (seed, epoch, index), so a resumed run sees the same
crops as an uninterrupted one, whatever the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import Dataset

from agmm_deploy.constants import IGNORE_INDEX, IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD
from agmm_deploy.transforms import normalize, read_image

CITYSCAPES_CLICKS = (20, 50, 100)
VOC_SPARSE_FOLDERS = {"point": ("point/segcls", "point"), "scribble": ("scribble/seginst", "scribble")}


class DataError(ValueError):
    """A data root, split file, image or label is missing or holds values the training cannot use."""


@dataclass(frozen=True)
class Sample:
    image: Path
    label: Path


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path} does not exist or is not a folder; expected {what}. Check --data-root.")
    return path


def _read_list(list_file: Path) -> list[list[str]]:
    if not list_file.is_file():
        raise DataError(f"split file {list_file} does not exist")
    rows = [line.split() for line in list_file.read_text().splitlines() if line.strip()]
    if not rows:
        raise DataError(f"split file {list_file} is empty; expected one '<image> <label>' or '<id>' per line")
    bad = [i + 1 for i, row in enumerate(rows) if len(row) not in (1, 2)]
    if bad:
        raise DataError(f"split file {list_file} line {bad[0]} has {len(rows[bad[0] - 1])} fields; expected "
                        "'<image> <label>' (official AGMM format) or '<id>' (VOC ImageSets format)")
    return rows


def _check_files(samples: list[Sample], source: str) -> list[Sample]:
    if not samples:
        raise DataError(f"no samples found in {source}")
    for sample in samples:
        for path in (sample.image, sample.label):
            if not path.is_file():
                raise DataError(f"{path} is listed by {source} but does not exist")
    return samples


def cityscapes_samples(root: str | Path, split: str, clicks: int | None = None,
                       list_file: str | Path | None = None) -> list[Sample]:
    """(image, label) pairs of a Cityscapes split; the label is ``{clicks}clicks/...`` when clicks is given."""
    root = Path(root)
    _require_dir(root, "a Cityscapes root holding leftImg8bit/ and gtFine/")
    if clicks is not None and clicks not in CITYSCAPES_CLICKS:
        raise DataError(f"clicks={clicks} is not a Cityscapes setting; expected one of {CITYSCAPES_CLICKS}")
    if list_file is not None:
        rows = _read_list(Path(list_file))
        if any(len(row) != 2 for row in rows):
            raise DataError(f"split file {list_file}: Cityscapes lists need '<leftImg8bit path> <gtFine path>'")
        pairs = [(root / img, root / gt) for img, gt in rows]
        source = f"split file {list_file}"
    else:
        image_dir = _require_dir(root / "leftImg8bit" / split, f"Cityscapes images in leftImg8bit/{split}/<city>/")
        images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
        pairs = [(img, root / "gtFine" / split / img.parent.name /
                  img.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")) for img in images]
        source = str(image_dir)
    if clicks is not None:
        sparse_dir = _require_dir(root / f"{clicks}clicks", f"the {clicks}-click labels ({clicks}clicks/<gtFine name>)")
        pairs = [(img, sparse_dir / gt.name) for img, gt in pairs]
    return _check_files([Sample(img, label) for img, label in pairs], source)


def voc_samples(root: str | Path, split: str, label: str = "full", list_file: str | Path | None = None) -> list[Sample]:
    """(image, label) pairs of a VOC split; ``label`` is full (SegmentationClass), point or scribble."""
    root = Path(root)
    _require_dir(root / "JPEGImages", "a VOC root holding JPEGImages/ and SegmentationClass/")
    if label == "full":
        label_dir = _require_dir(root / "SegmentationClass", "VOC full labels in SegmentationClass/")
    elif label in VOC_SPARSE_FOLDERS:
        candidates = [root / sub for sub in VOC_SPARSE_FOLDERS[label]]
        found = [c for c in candidates if c.is_dir()]
        if not found:
            raise DataError(f"no {label} labels under {root}: expected {candidates[1]}/<id>.png "
                            f"(or the official {candidates[0]}/)")
        label_dir = found[0]
    else:
        raise DataError(f"label={label!r} is not a VOC setting; expected point, scribble or full")
    if list_file is None:
        sets = root / "ImageSets" / "Segmentation"
        names = ["train_aug.txt", "train.txt"] if split == "train" else [f"{split}.txt"]
        existing = [sets / n for n in names if (sets / n).is_file()]
        if not existing:
            raise DataError(f"no split file for {split!r}: expected {sets / names[-1]} (or pass --{split}-list)")
        list_file = existing[0]
    rows = _read_list(Path(list_file))
    samples = []
    for row in rows:
        if len(row) == 2:  # official format: "<name>.jpg <name>.png"
            samples.append(Sample(root / "JPEGImages" / row[0], label_dir / Path(row[1]).name))
        else:
            samples.append(Sample(root / "JPEGImages" / f"{row[0]}.jpg", label_dir / f"{row[0]}.png"))
    return _check_files(samples, f"split file {list_file}")


def read_class_names(root: str | Path) -> tuple[str, ...]:
    """The class names of a folder data set, one per line of ``classes.txt``."""
    path = Path(root) / "classes.txt"
    if not path.is_file():
        raise DataError(f"{path} does not exist; a folder data set needs classes.txt with one class name per line")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(names) < 2:
        raise DataError(f"{path} lists {len(names)} class(es); expected at least 2")
    return names


def folder_samples(root: str | Path, split: str) -> list[Sample]:
    """(image, label) pairs of ``<root>/<split>/images`` and ``<root>/<split>/labels/<stem>.png``."""
    root = Path(root)
    image_dir = _require_dir(root / split / "images", f"the {split} images of a folder data set")
    label_dir = _require_dir(root / split / "labels", f"the {split} labels (<image stem>.png) of a folder data set")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return _check_files([Sample(img, label_dir / f"{img.stem}.png") for img in images], str(image_dir))


def read_label(path: Path, num_classes: int) -> np.ndarray:
    """A label PNG as uint8 (H, W), checked: values must be 0..K-1 (classes), K (unlabelled) or 255 (ignore)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"label {path} has mode {image.mode}; expected a single-channel PNG of class ids "
                                "(mode L or P). Convert colour-coded labels to ids first.")
            label = np.asarray(image)
    except (OSError, SyntaxError) as err:
        raise DataError(f"label {path} cannot be read as an image: {err}") from err
    values = np.unique(label)
    # Mode I labels are int32: negative values must be refused here, astype(uint8) would wrap -1 to 255.
    bad = values[((values < 0) | (values > num_classes)) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DataError(f"label {path} holds values {bad[:8].tolist()} outside 0..{num_classes - 1} (classes), "
                        f"{num_classes} (unlabelled) and {IGNORE_INDEX} (ignore); check --dataset / classes.txt "
                        "or convert the file to train ids")
    return label.astype(np.uint8)


def random_scale(image: Image.Image, label: Image.Image, rng: np.random.Generator,
                 ratio: tuple[float, float] = (0.5, 2.0)) -> tuple[Image.Image, Image.Image]:
    """Resizes so that the long side is a random integer in [ratio_lo, ratio_hi] x the original long side."""
    w, h = image.size
    long_side = int(rng.integers(int(max(h, w) * ratio[0]), int(max(h, w) * ratio[1]) + 1))
    if h > w:
        oh, ow = long_side, int(1.0 * w * long_side / h + 0.5)
    else:
        ow, oh = long_side, int(1.0 * h * long_side / w + 0.5)
    return image.resize((ow, oh), Image.BILINEAR), label.resize((ow, oh), Image.NEAREST)


def random_crop(image: Image.Image, label: Image.Image, size: int,
                rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Pads bottom/right to ``size`` (image with 0, label with 255 = no supervision), then crops randomly."""
    w, h = image.size
    pad_w, pad_h = max(size - w, 0), max(size - h, 0)
    if pad_w or pad_h:
        image = ImageOps.expand(image, border=(0, 0, pad_w, pad_h), fill=0)
        label = ImageOps.expand(label, border=(0, 0, pad_w, pad_h), fill=IGNORE_INDEX)
    w, h = image.size
    x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    return image.crop((x, y, x + size, y + size)), label.crop((x, y, x + size, y + size))


def colour_augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The official VOC photometric augmentation: jitter, grayscale, Gaussian blur, brightness shift."""
    if rng.random() < 0.5:  # ColorJitter(0.5, 0.5, 0.5, 0.25), factors in torchvision's random order
        ops = [lambda im: TF.adjust_brightness(im, rng.uniform(0.5, 1.5)),
               lambda im: TF.adjust_contrast(im, rng.uniform(0.5, 1.5)),
               lambda im: TF.adjust_saturation(im, rng.uniform(0.5, 1.5)),
               lambda im: TF.adjust_hue(im, rng.uniform(-0.25, 0.25))]
        for i in rng.permutation(4):
            image = ops[i](image)
    if rng.random() < 0.1:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.random() < 0.5:
        shifted = np.asarray(image, dtype=np.float32) + rng.uniform(-10, 10)
        image = Image.fromarray(np.clip(np.around(shifted), 0, 255).astype(np.uint8))
    return image


class SegmentationDataset(Dataset):
    """Images with sparse labels for training (augmented crops) or full labels for evaluation (whole images).

    Training items: (image (3, S, S) float32 normalised, mask (S, S) int64 with K = unlabelled and
    255 = padding, cls_label (K,) float32, index). Evaluation items: (image (3, H, W), mask (H, W), index).
    """

    def __init__(self, samples: list[Sample], num_classes: int, train: bool, crop_size: int = 321,
                 colour_aug: bool = False, seed: int = 0,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        self.samples = samples
        self.num_classes = num_classes
        self.train = train
        self.crop_size = crop_size
        self.colour_aug = colour_aug
        self.seed = seed
        self.mean, self.std = mean, std
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the augmentation draws of ``epoch`` (call before creating the epoch's iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples[index]
        image = read_image(sample.image)
        label = read_label(sample.label, self.num_classes)
        if image.shape[:2] != label.shape:
            raise DataError(f"image {sample.image} is {image.shape[1]}x{image.shape[0]} but label {sample.label} "
                            f"is {label.shape[1]}x{label.shape[0]}; expected the same size")
        return image, label

    def __getitem__(self, index: int):
        image, label = self._load(index)
        if not self.train:
            tensor = torch.from_numpy(normalize(image, self.mean, self.std)[0])
            return tensor, torch.from_numpy(label.astype(np.int64)), index
        k = self.num_classes
        # Unlabelled pixels (255 or K in the file) become K before cropping, so that crop padding alone is 255.
        label = np.where(label == IGNORE_INDEX, k, label).astype(np.uint8)
        cls_label = np.zeros(k, dtype=np.float32)
        present = np.unique(label)
        cls_label[present[present < k]] = 1.0  # from the whole image, before the crop
        rng = np.random.default_rng([self.seed, self.epoch, index])
        pil_image, pil_label = Image.fromarray(image), Image.fromarray(label)
        pil_image, pil_label = random_scale(pil_image, pil_label, rng)
        pil_image, pil_label = random_crop(pil_image, pil_label, self.crop_size, rng)
        if rng.random() < 0.5:
            pil_image = pil_image.transpose(Image.FLIP_LEFT_RIGHT)
            pil_label = pil_label.transpose(Image.FLIP_LEFT_RIGHT)
        if self.colour_aug:
            pil_image = colour_augment(pil_image, rng)
        tensor = torch.from_numpy(normalize(np.asarray(pil_image), self.mean, self.std)[0])
        mask = torch.from_numpy(np.asarray(pil_label, dtype=np.int64).copy())
        return tensor, mask, torch.from_numpy(cls_label), index


def val_samples(dataset: str, data_root: str | Path, val_list: str | Path | None = None) -> list[Sample] | None:
    """The validation split with full labels (None for a folder data set without val/)."""
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"--data-root {root} does not exist or is not a folder")
    if dataset == "cityscapes":
        return cityscapes_samples(root, "val", list_file=val_list)
    if dataset == "pascal":
        return voc_samples(root, "val", label="full", list_file=val_list)
    if dataset == "folder":
        return folder_samples(root, "val") if (root / "val" / "images").is_dir() else None
    raise DataError(f"dataset={dataset!r} is not supported; expected cityscapes, pascal or folder")


def train_samples(dataset: str, data_root: str | Path, *, clicks: int | None = None, label: str = "point",
                  train_list: str | Path | None = None) -> list[Sample]:
    """The training split with sparse labels: Cityscapes clicks, VOC point/scribble, or folder train/labels."""
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"--data-root {root} does not exist or is not a folder")
    if dataset == "cityscapes":
        return cityscapes_samples(root, "train", clicks=clicks, list_file=train_list)
    if dataset == "pascal":
        return voc_samples(root, "train", label=label, list_file=train_list)
    if dataset == "folder":
        return folder_samples(root, "train")
    raise DataError(f"dataset={dataset!r} is not supported; expected cityscapes, pascal or folder")
