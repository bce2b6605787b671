"""COCO keypoints JSON: each visible keypoint of an object is a click of the object's category.

``{"images": [{"id", "file_name", "width", "height"}], "categories": [{"id", "name", ...}],
"annotations": [{"image_id", "category_id", "keypoints": [x1, y1, v1, ...], "segmentation": ...}]}``.
Keypoints with visibility v = 0 are unlabelled in COCO and skipped. Polygon ``segmentation`` entries, where
present, are filled regions; RLE segmentations (crowd regions) are counted and not imported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agmm_deploy.labels.annotations import (Export, ImageAnnotations, LabelsError, Shape, image_size, number,
                                            read_json)


def detect(head: str) -> bool:
    """True for a COCO JSON file: a JSON object (with images / annotations / categories)."""
    return head.lstrip().startswith("{")


def _entry(entry: object, where: str, keys: tuple[str, ...]) -> dict:
    if not isinstance(entry, dict):
        raise LabelsError(f"{where} is a {type(entry).__name__}; expected an object with {', '.join(keys)}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise LabelsError(f"{where} lacks {', '.join(missing)}; a COCO entry there has {', '.join(keys)}")
    return entry


def _id(value: object, where: str, name: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise LabelsError(f"{where} has {name}={value!r:.40}; expected an integer id")
    return value


def _id_order(key: int | str) -> tuple[bool, int | str]:
    return isinstance(key, str), key  # numbers in numeric order, then any string ids


def _coordinates(values: object, where: str, name: str, group: int) -> np.ndarray:
    """A flat list of finite numbers, a multiple of ``group`` long, as (N, group) float64."""
    if not isinstance(values, list) or len(values) % group:
        raise LabelsError(f"{where} has {name} that is not a flat list of numbers in groups of {group}")
    return np.array([number(v, where, name) for v in values], np.float64).reshape(-1, group)


def read(path: Path) -> Export:
    """Parses a COCO keypoints (or COCO instances with polygons) JSON file."""
    coco = read_json(path, "a COCO keypoints file")
    if not isinstance(coco, dict):
        raise LabelsError(f"{path} holds a JSON {type(coco).__name__}; a COCO file is an object with images, "
                          "annotations and categories")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(coco.get(key), list)]
    if missing:
        raise LabelsError(f"{path} lacks the list(s) {missing}; a COCO file has images, annotations and categories")
    categories = {}
    for number_, category in enumerate(coco["categories"], start=1):
        where = f"{path}: categories[{number_ - 1}]"
        category = _entry(category, where, ("id", "name"))
        if not isinstance(category["name"], str):
            raise LabelsError(f"{where} has name={category['name']!r:.40}; expected a class name")
        categories[_id(category["id"], where, "id")] = category["name"]
    by_id = {}
    for number_, image in enumerate(coco["images"]):
        where = f"{path}: images[{number_}]"
        image = _entry(image, where, ("id", "file_name"))
        if not isinstance(image["file_name"], str):
            raise LabelsError(f"{where} has file_name={image['file_name']!r:.40}; expected a file name")
        size = ((None, None) if image.get("width") is None and image.get("height") is None
                else image_size(image.get("width"), image.get("height"), where))
        by_id[_id(image["id"], where, "id")] = ImageAnnotations(image["file_name"], [], *size)
    ignored = {}
    for number_, ann in enumerate(coco["annotations"]):
        where = f"{path}: annotations[{number_}]"
        ann = _entry(ann, where, ("image_id", "category_id"))
        where = f"{path}: annotation {ann.get('id', number_)!r:.40}"
        image = by_id.get(ann["image_id"]) if isinstance(ann["image_id"], (int, str)) else None
        if image is None:
            raise LabelsError(f"{where} refers to image_id {ann['image_id']!r:.40}, which is not in images")
        if not isinstance(ann["category_id"], (int, str)) or ann["category_id"] not in categories:
            raise LabelsError(f"{where} has category_id {ann['category_id']!r:.40}, which is not in categories "
                              f"{sorted(categories, key=_id_order)[:20]}")
        label = categories[ann["category_id"]]
        keypoints = _coordinates(ann.get("keypoints") or [], where, "keypoints", 3)
        visible = keypoints[keypoints[:, 2] > 0, :2]
        if len(visible):
            image.shapes.append(Shape("point", label, visible))
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list):
            for polygon in segmentation:
                points = _coordinates(polygon, where, "segmentation", 2)
                if len(points) < 3:
                    raise LabelsError(f"{where} has a segmentation polygon of {len(points)} point(s); expected 3 "
                                      "or more")
                image.shapes.append(Shape("polygon", label, points))
        elif segmentation:
            ignored["rle segmentation"] = ignored.get("rle segmentation", 0) + 1
    labels = tuple(categories[k] for k in sorted(categories, key=_id_order))
    return Export(list(by_id.values()), labels, {}, ignored)
