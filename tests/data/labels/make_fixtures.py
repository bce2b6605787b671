"""Writes the committed fixtures of tests/test_labels.py with the annotation tools' own writers.

Rerun it when a tool's format changes (a new CVAT / datumaro / Label Studio release), then rerun the tests:

    python -m venv /tmp/labels-venv && /tmp/labels-venv/bin/pip install datumaro label-studio-sdk
    /tmp/labels-venv/bin/python tests/data/labels/make_fixtures.py

It needs only numpy, opencv and Pillow besides the tools' packages; the test suite needs none of the tools.

The same venv checks that the tools' own readers parse our pre-annotations (written with the project's venv):

    agmm-labels preannotate PRED --classes classes.txt --format cvat --shape mask --out /tmp/pre.xml
    agmm-labels preannotate PRED --classes classes.txt --format label-studio --shape mask --out /tmp/pre.json
    /tmp/labels-venv/bin/python tests/data/labels/make_fixtures.py --check /tmp/pre.xml /tmp/pre.json PRED

What writes what:
* ``images/img_{0..3}.png``: small scenes (background, a disk, a box), drawn here; the known shapes let the
  tests check where every label lands.
* ``cvat.xml``: "CVAT for images 1.1" XML written by datumaro's CVAT exporter (CVAT's own dataset library):
  clicks as ``<points>``, scribbles as ``<polyline>``, a ``<polygon>`` and a ``<mask>``.
* ``label_studio.json``: the JSON export of a real Label Studio server (1.23.2), written by
  ``label_studio_server.py export`` beside this file (it posts the same clicks, polygon and painted patch through
  the server's API). Where no server can be run, ``--label-studio-from-schema`` writes a stand-in built here from
  Label Studio's documented export schema, its brush RLE encoded by label-studio-sdk
  (``label_studio_sdk.converter.brush.mask2rle``); the committed file is the server's.
* ``coco_keypoints.json`` and ``clicks.csv``: written here from the COCO keypoints specification and the
  ``image,x,y,class`` layout (no tool involved).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
CLASSES = ("background", "disk", "box")
COLOURS = ((40, 40, 40), (220, 60, 60), (60, 160, 220))
WIDTH, HEIGHT = 64, 48


def scene(index: int) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, full label (H, W) uint8) of image ``index``: a disk and a box on background."""
    label = np.zeros((HEIGHT, WIDTH), np.uint8)
    cx = 14 + 4 * index
    cv2.circle(label, (cx, 16), 9, 1, -1)
    cv2.rectangle(label, (34, 22 + index), (56, 40), 2, -1)
    rng = np.random.default_rng(index)
    image = np.asarray(COLOURS, np.float64)[label] + rng.normal(0, 6, (HEIGHT, WIDTH, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


# Shapes per image, in pixel corner coordinates (x right, y down), all inside their class's region.
def shapes(index: int) -> dict:
    cx = 14 + 4 * index
    return {
        "clicks": [(cx + 0.5, 16.5, 1), (45.5, 31.5, 2), (5.5, 44.5, 0), (60.5, 5.5, 0)],
        "scribble": ([(cx - 5.0, 16.0), (cx + 5.0, 17.0)], 1),
        "polygon": ([(36.0, 34.0), (54.0, 34.0), (54.0, 39.0), (36.0, 39.0)], 2),
        "mask_box": ((2, 28, 10, 8), 0),  # left, top, width, height of a painted background patch
    }


def write_images() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    for index in range(4):
        image, _ = scene(index)
        Image.fromarray(image).save(HERE / "images" / f"img_{index}.png")


def write_cvat() -> None:
    from datumaro.components.annotation import Mask, Points, Polygon, PolyLine
    from datumaro.components.dataset import Dataset
    from datumaro.components.dataset_base import DatasetItem
    from datumaro.components.media import Image as DmImage

    items = []
    for index in range(3):  # img_3 stays unannotated in CVAT: the "image with no label" case
        s = shapes(index)
        annotations = [Points([v for x, y, _ in s["clicks"] if _ == c for v in (x, y)], label=c)
                       for c in range(len(CLASSES))]
        line, c = s["scribble"]
        annotations.append(PolyLine([v for p in line for v in p], label=c))
        polygon, c = s["polygon"]
        annotations.append(Polygon([v for p in polygon for v in p], label=c))
        (left, top, w, h), c = s["mask_box"]
        mask = np.zeros((HEIGHT, WIDTH), bool)
        mask[top:top + h, left:left + w] = True
        annotations.append(Mask(image=mask, label=c))
        items.append(DatasetItem(id=f"img_{index}", media=DmImage.from_file(str(HERE / "images" / f"img_{index}.png")),
                                 annotations=annotations))
    items.append(DatasetItem(id="img_3", media=DmImage.from_file(str(HERE / "images" / "img_3.png"))))
    dataset = Dataset.from_iterable(items, categories=list(CLASSES))
    with tempfile.TemporaryDirectory() as tmp:
        dataset.export(tmp, "cvat", save_media=False)
        written = sorted(Path(tmp).rglob("*.xml"))
        assert len(written) == 1, written
        shutil.copyfile(written[0], HERE / "cvat.xml")


def write_label_studio() -> None:
    """A stand-in for the server's export, from the documented schema (see label_studio_server.py for the real one)."""
    from label_studio_sdk.converter.brush import mask2rle

    tasks = []
    for index in range(3):
        s = shapes(index)
        size = {"original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0, "to_name": "image"}
        result = []
        for k, (x, y, c) in enumerate(s["clicks"]):
            result.append({"id": f"kp{index}{k}", "type": "keypointlabels", "from_name": "kp", **size,
                           "value": {"x": 100 * x / WIDTH, "y": 100 * y / HEIGHT, "width": 0.8,
                                     "keypointlabels": [CLASSES[c]]}})
        polygon, c = s["polygon"]
        result.append({"id": f"pg{index}", "type": "polygonlabels", "from_name": "poly", **size,
                       "value": {"points": [[100 * x / WIDTH, 100 * y / HEIGHT] for x, y in polygon], "closed": True,
                                 "polygonlabels": [CLASSES[c]]}})
        (left, top, w, h), c = s["mask_box"]
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        mask[top:top + h, left:left + w] = 255
        result.append({"id": f"br{index}", "type": "brushlabels", "from_name": "brush", **size,
                       "value": {"format": "rle", "rle": [int(v) for v in mask2rle(mask)],
                                 "brushlabels": [CLASSES[c]]}})
        tasks.append({"id": index + 1, "data": {"image": f"/data/upload/1/{index:08x}-img_{index}.png"},
                      "annotations": [{"id": index + 1, "was_cancelled": False, "result": result}],
                      "predictions": []})
    (HERE / "label_studio.json").write_text(json.dumps(tasks, indent=1) + "\n")


def write_coco_and_csv() -> None:
    images, annotations, rows = [], [], ["image,x,y,class"]
    for index in range(3):
        images.append({"id": index + 1, "file_name": f"img_{index}.png", "width": WIDTH, "height": HEIGHT})
        for x, y, c in shapes(index)["clicks"]:  # one object per click, its one keypoint visible (v = 2)
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": c + 1,
                                "keypoints": [x, y, 2], "num_keypoints": 1})
            rows.append(f"img_{index}.png,{x},{y},{CLASSES[c]}")
    categories = [{"id": c + 1, "name": name, "supercategory": name, "keypoints": ["click"], "skeleton": []}
                  for c, name in enumerate(CLASSES)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (HERE / "coco_keypoints.json").write_text(json.dumps(coco, indent=1) + "\n")
    (HERE / "clicks.csv").write_text("\n".join(rows) + "\n")


def check_preannotations(cvat_xml: Path, ls_json: Path, masks: Path) -> None:
    """Parses our CVAT XML with datumaro and decodes our brush RLE with label-studio-sdk; compares to the maps."""
    from datumaro.components.annotation import AnnotationType
    from datumaro.components.dataset import Dataset
    from label_studio_sdk.converter.brush import decode_rle

    with tempfile.TemporaryDirectory() as tmp:  # datumaro wants the images beside the XML, in images/
        shutil.copyfile(cvat_xml, Path(tmp) / "annotations.xml")
        shutil.copytree(masks, Path(tmp) / "images")
        dataset = Dataset.import_from(str(Path(tmp) / "annotations.xml"), "cvat")
        names = [c.name for c in dataset.categories()[AnnotationType.label]]
        for item in dataset:
            label_map = np.asarray(Image.open(masks / f"{Path(item.id).stem}.png"))
            for ann in item.annotations:
                if ann.type == AnnotationType.mask:
                    assert (label_map[ann.image.astype(bool)] == ann.label).all(), (item.id, names[ann.label])
            kinds = sorted({ann.type.name for ann in item.annotations})
            print(f"datumaro read {cvat_xml} {item.id}: {len(item.annotations)} {kinds} shape(s), labels {names}")
    for task in json.loads(ls_json.read_text()):
        stem = Path(task["data"]["image"]).stem
        label_map = np.asarray(Image.open(masks / f"{stem}.png"))
        for result in task["predictions"][0]["result"]:
            if result["type"] != "brushlabels":
                continue
            h, w = result["original_height"], result["original_width"]
            mask = np.reshape(decode_rle(result["value"]["rle"]), (h, w, 4))[:, :, 3] > 0
            values = np.unique(label_map[mask])
            assert len(values) == 1, (stem, values)
        print(f"label-studio-sdk decoded {len(task['predictions'][0]['result'])} brush mask(s) of {stem}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--check"]:
        check_preannotations(*(Path(a) for a in sys.argv[2:5]))
        sys.exit(0)
    write_images()
    write_cvat()
    if "--label-studio-from-schema" in sys.argv:
        write_label_studio()
    write_coco_and_csv()
    print(f"wrote fixtures to {HERE}")
