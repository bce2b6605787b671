"""agmm_deploy.cvat_function through cvat-sdk's own auto-annotation types: its spec validated by
DetectionFunctionSpec, ``detect`` called with the driver's context on real PNG files, its shapes validated and
remapped to a task's label ids by the driver's mapper (what ``cvat-cli task auto-annotate`` runs), and the masks
decoded by cvat_sdk.masks.decode_mask equal to the runner's label map.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

cvat_sdk = pytest.importorskip("cvat_sdk")
from cvat_sdk import models  # noqa: E402
from cvat_sdk.auto_annotation.driver import _AnnotationMapper, _DetectionFunctionContextImpl  # noqa: E402
from cvat_sdk.auto_annotation.exceptions import BadFunctionError  # noqa: E402
from cvat_sdk.masks import decode_mask  # noqa: E402

from agmm_deploy import cvat_function  # noqa: E402
from agmm_deploy.contract import ModelMeta  # noqa: E402
from agmm_deploy.export.onnx import export_onnx  # noqa: E402
from agmm_deploy.inference import segment_image  # noqa: E402
from agmm_deploy.labels.rasterize import polygon_pixels  # noqa: E402
from agmm_deploy.model import ModelConfig, build_model  # noqa: E402
from agmm_deploy.transforms import read_image  # noqa: E402

IMAGES = sorted((Path(__file__).resolve().parent / "data" / "label_studio_backend" / "images").glob("*.png"))
CLASSES = ("background", "disk", "box")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    model = build_model(ModelConfig.for_dataset("folder", backbone="resnet18", stem="torchvision", output_stride=16,
                                                num_classes=len(CLASSES)))
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export_onnx(model, ModelMeta.for_dataset("folder", (64, 64), classes=CLASSES), path, height=64, width=64)
    return path


def task_labels(*names: str, kind: str = "any") -> list[models.Label]:
    """A CVAT task's labels, ids unlike the model's class ids."""
    return [models.Label(id=100 + i, name=name, type=kind, attributes=[], sublabels=[]) for i, name in enumerate(names)]


def run(function, path: Path, labels: list[models.Label], conv_mask_to_poly: bool = False):
    """What the driver does with one frame: detect, then validate and remap to the task's label ids."""
    mapper = _AnnotationMapper(logging.getLogger("test"), function.spec.labels, labels,
                               allow_unmatched_labels=False, conv_mask_to_poly=conv_mask_to_poly)
    context = _DetectionFunctionContextImpl(frame_name=path.name, conv_mask_to_poly=conv_mask_to_poly)
    with Image.open(path) as image:
        shapes = function.detect(context, image.convert("RGB"))
    _, remapped = mapper.validate_and_remap(shapes, 0)
    return remapped


@pytest.mark.parametrize("path", IMAGES, ids=[p.name for p in IMAGES])
def test_detect_gives_masks_per_region_that_decode_to_the_runner_label_map(tiny_model, path):
    function = cvat_function.create(model=str(tiny_model), device="cpu", min_area="1")
    assert [(label.name, label.type) for label in function.spec.labels] == [(n, "mask") for n in CLASSES]
    expected = segment_image(function.runner, read_image(path))
    h, w = expected.shape
    shapes = run(function, path, task_labels("box", "disk", "background"))
    drawn = np.full((h, w), 255, np.uint8)
    for shape in shapes:
        assert shape.type.value == "mask" and shape.frame == 0
        name = {100: "box", 101: "disk", 102: "background"}[shape.label_id]
        region = decode_mask(shape.points, image_width=w, image_height=h)
        assert not (drawn[region] != 255).any(), "regions overlap"
        drawn[region] = CLASSES.index(name)
    assert (drawn == expected).all()


def test_polygons_when_cvat_asks_cover_each_region(tiny_model):
    function = cvat_function.create(model=str(tiny_model), device="cpu", min_area="1")
    path = IMAGES[0]
    expected = segment_image(function.runner, read_image(path))
    h, w = expected.shape
    shapes = run(function, path, task_labels("box", "disk", "background", kind="polygon"), conv_mask_to_poly=True)
    assert shapes and all(s.type.value == "polygon" for s in shapes)
    drawn = np.full((h, w), 255, np.uint8)
    for shape in shapes:
        name = {100: "box", 101: "disk", 102: "background"}[shape.label_id]
        drawn[polygon_pixels(np.reshape(shape.points, (-1, 2)), h, w)] = CLASSES.index(name)
    # outer outlines: every pixel of the label map is covered by its class's polygon where it has no hole
    assert (drawn != 255).all()


def test_a_function_label_the_task_lacks_is_refused_by_cvat_unless_labels_are_named(tiny_model):
    function = cvat_function.create(model=str(tiny_model), device="cpu")
    with pytest.raises(BadFunctionError, match="'background' is not in dataset"):
        run(function, IMAGES[0], task_labels("disk", "box"))
    named = cvat_function.create(model=str(tiny_model), device="cpu", labels="disk, box")
    assert [label.name for label in named.spec.labels] == ["disk", "box"]
    for shape in run(named, IMAGES[0], task_labels("disk", "box")):
        assert shape.label_id in (100, 101)


def test_task_labels_the_model_lacks_are_named_in_a_sentence(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="agmm.cvat"):
        function = cvat_function.create(model=str(tiny_model), device="cpu", labels="disk,car,tree")
    assert [label.name for label in function.spec.labels] == ["disk"]
    assert "['car', 'tree'] are not classes of the model ['background', 'disk', 'box']" in caplog.text
    with pytest.raises(ValueError, match=r"none of the task's labels \['car'\] is a class of the model"):
        cvat_function.create(model=str(tiny_model), device="cpu", labels="car")
