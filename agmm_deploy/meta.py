"""What a deployed model must know besides its weights: classes, colours, preprocessing and input size.

Stored in checkpoints, in ONNX ``metadata_props`` and in engine sidecar JSON, so that export, prediction and
serving never hard-code preprocessing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from agmm_deploy.constants import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VOC_CLASSES,
    VOC_PALETTE,
    default_palette,
)


@dataclass(frozen=True)
class ModelMeta:
    """Attributes:
        classes: class names, index = label value.
        palette: one (R, G, B) per class.
        input_size: (H, W) the model was trained/exported at (the training crop).
        mean, std: per-channel RGB normalisation of images scaled to [0, 1].
        dataset: cityscapes | pascal | folder (informational).
    """

    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    input_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dataset: str = "folder"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "palette", tuple(tuple(int(v) for v in color) for color in self.palette))
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.palette) != len(self.classes):
            raise ValueError(f"palette has {len(self.palette)} colours for {len(self.classes)} classes; expected one each")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size={self.input_size!r} is invalid; expected (height, width) > 0")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values each with std > 0; got mean={self.mean}, std={self.std}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def for_dataset(cls, dataset: str, input_size: tuple[int, int],
                    classes: tuple[str, ...] | None = None) -> "ModelMeta":
        """Classes and palette of ``cityscapes`` / ``pascal``, or of a user's ``folder`` class list."""
        if dataset == "cityscapes":
            return cls(CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, input_size, dataset=dataset)
        if dataset == "pascal":
            return cls(VOC_CLASSES, VOC_PALETTE, input_size, dataset=dataset)
        if classes is None:
            raise ValueError(f"dataset={dataset!r} needs an explicit class list")
        return cls(tuple(classes), default_palette(len(classes)), input_size, dataset=dataset)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (lists for tuples) as stored in checkpoints, ONNX metadata and sidecars."""
        data = dataclasses.asdict(self)
        for key in ("classes", "input_size", "mean", "std"):
            data[key] = list(data[key])
        data["palette"] = [list(c) for c in self.palette]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelMeta":
        """The metadata of a to_dict() result; unknown keys are ignored, classes/palette/input_size required."""
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted({"classes", "palette", "input_size"} - set(data))
        if missing:
            raise ValueError(f"model metadata lacks {missing}; expected at least classes, palette and input_size")
        return cls(**{k: v for k, v in data.items() if k in known})
