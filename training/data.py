"""Training and evaluation items of any data format, with the official AGMM training augmentations.

The data formats (layouts, split files, classes) are rows of ``agmm_deploy.datasets``; this module reads their
(image, label) pairs. Labels are checked before training starts (``check_labels``: the header of every image and
label, the values of every label), so a bad file stops the run at start-up, not at the step that reaches it.

Training samples follow the official ``dataset/sass.py``: sparse label read, unlabelled pixels (255 or K)
set to K, ``cls_label`` taken from the whole label, then random scale 0.5-2.0 of the long side, crop with
image padding 0 and label padding 255, horizontal flip, and on VOC colour jitter, grayscale, blur and a
brightness shift. Each sample's randomness comes from (seed, epoch, index), so a resumed run sees the same
crops as an uninterrupted one, whatever the number of workers.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from agmm_deploy.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from agmm_deploy.datasets import DataError, Sample
from agmm_deploy.transforms import ImageDecodeError, normalize, read_image

# The most loader workers a process gets by default: at paper scale (2048x1024 PNG decode + scale + crop, about
# 15 images/s per worker) 16 feed one GPU's bf16 step; more only add memory and start-up time.
MAX_DEFAULT_WORKERS = 16
# Modes of a label file of class ids: 8-bit grey or indexed (the usual), 32-bit or 16-bit integers.
LABEL_MODES = ("L", "P", "I", "I;16")


def _label_values(label: np.ndarray) -> np.ndarray:
    """The distinct values of a label array (a 256-bin count for uint8: linear time, no sort)."""
    if label.dtype == np.uint8:
        return np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    return np.unique(label)


def _refuse_values(path: Path, values: np.ndarray, num_classes: int) -> None:
    # Mode I labels are int32: negative values must be refused here, astype(uint8) would wrap -1 to 255.
    bad = values[((values < 0) | (values > num_classes)) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DataError(f"label {path} holds values {bad[:8].tolist()} outside 0..{num_classes - 1} (classes), "
                        f"{num_classes} (unlabelled) and {IGNORE_INDEX} (ignore); check --dataset / classes.txt "
                        "or convert the file to train ids")


def _refuse_mode(path: Path, mode: str) -> None:
    if mode not in LABEL_MODES:
        raise DataError(f"label {path} has mode {mode}; expected a single-channel PNG of class ids "
                        "(mode L or P). Convert colour-coded labels to ids first.")


def read_label(path: Path, num_classes: int) -> np.ndarray:
    """A label PNG as uint8 (H, W), checked: values must be 0..K-1 (classes), K (unlabelled) or 255 (ignore)."""
    try:
        with Image.open(path) as image:
            _refuse_mode(path, image.mode)
            label = np.array(image)  # a writable copy (np.asarray of a PIL image is read-only)
    except (OSError, SyntaxError) as err:
        raise DataError(f"label {path} cannot be read as an image: {err}") from err
    _refuse_values(path, _label_values(label), num_classes)
    return label.astype(np.uint8, copy=False)


def _check_sample(sample: Sample, num_classes: int) -> int:
    """Checks one pair from the files' headers and the label's values; returns its number of labelled pixels."""
    try:
        with Image.open(sample.image) as image:  # the header only: no pixels decoded
            image_size = image.size
    except (OSError, SyntaxError) as err:
        reason = "not a recognised image format" if isinstance(err, UnidentifiedImageError) else str(err)
        raise DataError(f"image {sample.image} cannot be read as an image ({reason})") from err
    try:
        with Image.open(sample.label) as label:
            _refuse_mode(sample.label, label.mode)
            label_size = label.size
            if label.mode in ("L", "P"):  # 8-bit: the histogram is the count of each value, in C
                counts = np.asarray(label.histogram()[:256])
                values = np.flatnonzero(counts)
            else:
                array = np.asarray(label)
                values, counts = np.unique(array, return_counts=True)
                counts = dict(zip(values.tolist(), counts.tolist()))
    except (OSError, SyntaxError) as err:
        raise DataError(f"label {sample.label} cannot be read as an image: {err}") from err
    if image_size != label_size:
        raise DataError(f"image {sample.image} is {image_size[0]}x{image_size[1]} but label {sample.label} is "
                        f"{label_size[0]}x{label_size[1]}; expected the same size")
    _refuse_values(sample.label, values, num_classes)
    if isinstance(counts, dict):
        return sum(n for v, n in counts.items() if 0 <= v < num_classes)
    return int(counts[:num_classes].sum())


def check_labels(samples: list[Sample], num_classes: int, what: str, threads: int = 4) -> int:
    """Checks every pair before training: image and label readable and the same size, label single-channel with
    values 0..K-1, K or 255, and at least one labelled pixel in all.

    Args:
        what: the split in words, for the error ("training labels under data/city").
        threads: labels decoded in parallel (PIL releases the GIL while decoding).
    Returns:
        The number of labelled pixels (values 0..K-1) over all labels.
    """
    with ThreadPoolExecutor(max(1, threads)) as pool:
        labelled = sum(pool.map(lambda sample: _check_sample(sample, num_classes), samples))
    if labelled == 0:
        raise DataError(f"none of the {len(samples)} {what} holds a labelled pixel (every value is {num_classes} or "
                        f"{IGNORE_INDEX}): there is nothing to learn from. Check --data-root and that the labels hold "
                        f"class ids 0..{num_classes - 1}")
    return labelled


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which containers and torchrun may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(local_world_size: int = 1, cores: int | None = None) -> int:
    """Loader workers per process when ``--workers`` is not given: this node's cores shared among its processes
    (one per GPU), less one core for the process itself (it runs the step and pins batches), in 1..MAX_DEFAULT_WORKERS.
    """
    cores = usable_cores() if cores is None else cores
    return max(1, min(MAX_DEFAULT_WORKERS, cores // max(1, local_world_size) - 1))


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


def random_crop(image: np.ndarray, label: np.ndarray, size: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pads bottom/right to ``size`` (image with 0, label with 255 = no supervision), then crops randomly.

    Shape: image (H, W, 3), label (H, W) uint8 -> (size, size, 3), (size, size).
    """
    h, w = label.shape
    pad_h, pad_w = max(size - h, 0), max(size - w, 0)
    if pad_h or pad_w:
        padded_image = np.zeros((h + pad_h, w + pad_w, 3), np.uint8)
        padded_image[:h, :w] = image
        padded_label = np.full((h + pad_h, w + pad_w), IGNORE_INDEX, np.uint8)
        padded_label[:h, :w] = label
        image, label = padded_image, padded_label
        h, w = label.shape
    x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    return image[y:y + size, x:x + size], label[y:y + size, x:x + size]


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

    Training items: (image (3, S, S) float32 normalised, mask (S, S) uint8 with K = unlabelled and
    255 = padding, cls_label (K,) float32, index). Evaluation items: (image (3, H, W), mask (H, W) uint8, index).
    Masks stay uint8 through the loader (an eighth of int64 through worker IPC, pinning and the copy to the
    device); the training loop makes them int64 on the device.
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
        # In shared memory: persistent loader workers hold copies of this dataset made when they started, and
        # read the epoch set later by the main process from here.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Selects the augmentation draws of ``epoch`` (call before creating the epoch's iterator), in this process
        and in the persistent workers of a loader over this dataset."""
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples[index]
        try:
            image = read_image(sample.image)
        except (ImageDecodeError, FileNotFoundError) as err:
            raise DataError(str(err)) from err
        label = read_label(sample.label, self.num_classes)
        if image.shape[:2] != label.shape:
            raise DataError(f"image {sample.image} is {image.shape[1]}x{image.shape[0]} but label {sample.label} "
                            f"is {label.shape[1]}x{label.shape[0]}; expected the same size")
        return image, label

    def __getitem__(self, index: int):
        image, label = self._load(index)
        if not self.train:
            tensor = torch.from_numpy(normalize(image, self.mean, self.std)[0])
            return tensor, torch.from_numpy(label), index
        k = self.num_classes
        # Unlabelled pixels (255 or K in the file) become K before cropping, so that crop padding alone is 255.
        label = np.where(label == IGNORE_INDEX, k, label).astype(np.uint8)
        cls_label = np.zeros(k, dtype=np.float32)
        present = _label_values(label)
        cls_label[present[present < k]] = 1.0  # from the whole image, before the crop
        rng = np.random.default_rng([self.seed, self.epoch, index])
        # PIL resizes (bilinear / nearest, as the official code); crop and flip are array slices.
        pil_image, pil_label = random_scale(Image.fromarray(image), Image.fromarray(label), rng)
        image, label = random_crop(np.asarray(pil_image), np.asarray(pil_label), self.crop_size, rng)
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.colour_aug:
            image = np.asarray(colour_augment(Image.fromarray(np.ascontiguousarray(image)), rng))
        tensor = torch.from_numpy(normalize(image, self.mean, self.std)[0])
        mask = torch.from_numpy(np.array(label))  # contiguous and writable
        return tensor, mask, torch.from_numpy(cls_label), index




class EpochSampler(Sampler[int]):
    """The training images of one rank in one epoch, from (seed, epoch) alone, after the images already trained on.

    The epoch's order is a permutation drawn from seed + epoch (as DistributedSampler draws it), padded with its own
    first images to a multiple of the process count; rank r takes every world-th image from position r (so ranks
    get disjoint shards). Step j of an epoch therefore trains on positions [j B W, (j + 1) B W) of the order for
    batch B and W processes: a run stopped after k steps resumes at position ``start`` = k B W, also with another
    process count at the same global batch B W.
    """

    def __init__(self, size: int, world_size: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.size, self.world_size, self.rank, self.seed = size, world_size, rank, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects ``epoch``'s order, beginning at position ``start`` (the images of the epoch trained before)."""
        self.epoch, self.start = epoch, start

    def _padded(self) -> int:
        return -(-self.size // self.world_size) * self.world_size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        order += order[:self._padded() - self.size]
        return iter(order[self.start:][self.rank::self.world_size])

    def __len__(self) -> int:
        return max(0, self._padded() - self.start) // self.world_size


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the training loader: its workers ignore SIGTERM and SIGINT, which a scheduler or a
    terminal may send to the whole process group; the main process finishes its step and checkpoints with them
    still running, and they end with it (a worker watches its parent)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
