"""Constants shared by training, export and serving: the ignore index, normalisation, classes, palettes."""

from __future__ import annotations

# Pixels holding this value receive no supervision at all (crop padding, "void" in full labels).
# Unlabelled pixels of a sparse label are different: they hold K (the number of classes), see docs/algorithm.md.
IGNORE_INDEX = 255

# ImageNet statistics, in RGB order, for images scaled to [0, 1]; both backbone layouts were trained with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# File endings read as images when a folder is given (data sets, parity image folders, agmm-predict).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _cityscapes_train_labels():
    """Cityscapes classes with train ids 0..18, read from the official cityscapesscripts table."""
    from cityscapesscripts.helpers.labels import labels

    train = sorted((lab for lab in labels if 0 <= lab.trainId < 255), key=lambda lab: lab.trainId)
    assert [lab.trainId for lab in train] == list(range(19)), "cityscapesscripts train ids are not 0..18"
    return train


def _voc_palette(num_colors: int) -> list[tuple[int, int, int]]:
    """The standard PASCAL VOC colour map: bits of the class index spread over R, G and B."""
    palette = []
    for index in range(num_colors):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append((r, g, b))
    return palette


CITYSCAPES_CLASSES: tuple[str, ...] = tuple(lab.name for lab in _cityscapes_train_labels())
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    tuple(lab.color) for lab in _cityscapes_train_labels()
)

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_PALETTE: tuple[tuple[int, int, int], ...] = tuple(_voc_palette(len(VOC_CLASSES)))


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """A palette for a user's own classes: the VOC colour map extended to any length."""
    return tuple(_voc_palette(num_classes))
