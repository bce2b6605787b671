"""A CVAT auto-annotation function: pre-labels a CVAT task with an exported model (``pip install agmm-deploy[cvat]``).

    cvat-cli --server-host http://cvat:8080 --auth user task auto-annotate TASK_ID \\
        --function-module agmm_deploy.cvat_function -p model=runs/mine/model/model.onnx \\
        [-p labels=car,road] [-p device=cpu] [-p min_area=16] [--conv-mask-to-poly]

The spec lists the model's classes (labels of type ``mask``), matched to the task's labels by name. ``detect``
returns one mask per connected region of each class (holes kept), or its outline as a polygon when CVAT asks
for polygons (``--conv-mask-to-poly``). CVAT refuses a function label the task lacks unless given
``--allow-unmatched-labels`` (e.g. for ``background``); ``-p labels=`` names the task's labels instead, so
that only those classes are predicted and the task's labels the model lacks are named.
"""

from __future__ import annotations

import logging

import numpy as np
import PIL.Image

from agmm_deploy.inference import segment_image
from agmm_deploy.labels.rasterize import label_regions
from agmm_deploy.runtime import load_runner
from agmm_deploy.transforms import to_rgb_uint8

logger = logging.getLogger("agmm.cvat")


def match_task_labels(classes: tuple[str, ...], task_labels: tuple[str, ...]) -> tuple[dict[str, int], str | None]:
    """The model classes the task has (name -> class id), and a sentence naming the task's labels the model lacks
    (None when it has them all). Raises ValueError when the two share no name."""
    shared = {name: classes.index(name) for name in task_labels if name in classes}
    missing = [name for name in task_labels if name not in classes]
    sentence = None
    if missing:
        sentence = (f"the task's labels {missing} are not classes of the model {list(classes)}; they get no "
                    "pre-labels (rename them to the model's class names to have them predicted)")
    if not shared:
        raise ValueError(f"none of the task's labels {list(task_labels)} is a class of the model {list(classes)}; "
                         "labels are matched by name")
    return shared, sentence


class AgmmFunction:
    """The detection function over one model. ``classes``: name -> class id of the labels it predicts."""

    def __init__(self, model: str, device: str = "auto", labels: tuple[str, ...] = (), min_area: int = 16) -> None:
        import cvat_sdk.auto_annotation as cvataa

        self.runner = load_runner(model, device=device)
        classes = self.runner.meta.classes
        self.classes = {name: index for index, name in enumerate(classes)}
        if labels:
            self.classes, sentence = match_task_labels(classes, labels)
            if sentence:
                logger.warning("agmm cvat function: %s", sentence)
        self.min_area = min_area
        self.spec = cvataa.DetectionFunctionSpec(
            labels=[cvataa.label_spec(name, index, type="mask") for name, index in self.classes.items()])

    def detect(self, context, image: PIL.Image.Image) -> list:
        """One mask (or polygon) shape per connected region of each predicted class."""
        import cvat_sdk.auto_annotation as cvataa
        from cvat_sdk.masks import encode_mask

        label_map = segment_image(self.runner, to_rgb_uint8(image))  # (H, W) uint8 class ids
        wanted = set(self.classes.values())
        shapes = []
        for region in label_regions(label_map, self.runner.meta.num_classes, self.min_area):
            if region.class_id not in wanted:
                continue
            if context.conv_mask_to_poly:
                shapes.append(cvataa.polygon(region.class_id, region.polygon.ravel().tolist()))
            else:
                rows, cols = np.flatnonzero(region.mask.any(1)), np.flatnonzero(region.mask.any(0))
                box = [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
                shapes.append(cvataa.mask(region.class_id, encode_mask(region.mask, box)))
        return shapes


def create(model: str, device: str = "auto", labels: str = "", min_area: int = 16) -> AgmmFunction:
    """What ``cvat-cli ... --function-module agmm_deploy.cvat_function -p model=PATH`` calls.

    Args:
        model: any artifact the runtime table reads (model.onnx of an agmm-export folder, a .pt checkpoint...).
        labels: the task's label names, comma-separated; default: every class of the model.
        min_area: regions smaller than this many pixels are left out.
    """
    names = tuple(name.strip() for name in labels.split(",") if name.strip())
    return AgmmFunction(model, device, names, int(min_area))
