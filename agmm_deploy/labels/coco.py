"""COCO keypoints JSON: each visible keypoint of an object is a click of the object's category.

``{"images": [{"id", "file_name", "width", "height"}], "categories": [{"id", "name", ...}],
"annotations": [{"image_id", "category_id", "keypoints": [x1, y1, v1, ...], "segmentation": ...}]}``.
Keypoints with visibility v = 0 are unlabelled in COCO and skipped. Polygon ``segmentation`` entries, where
present, are filled regions; RLE segmentations (crowd regions) are counted and not imported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from agmm_deploy.labels.annotations import Export, ImageAnnotations, LabelsError, Shape


def detect(head: str) -> bool:
    """True for a COCO JSON file: a JSON object (with images / annotations / categories)."""
    return head.lstrip().startswith("{")


def read(path: Path) -> Export:
    """Parses a COCO keypoints (or COCO instances with polygons) JSON file."""
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LabelsError(f"{path} is not valid JSON ({err}); expected a COCO keypoints file") from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(coco.get(key), list)]
    if missing:
        raise LabelsError(f"{path} lacks the list(s) {missing}; a COCO file has images, annotations and categories")
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    by_id = {image["id"]: ImageAnnotations(image["file_name"], [], image.get("width"), image.get("height"))
             for image in coco["images"]}
    ignored = {}
    for ann in coco["annotations"]:
        where = f"{path}: annotation {ann.get('id')}"
        image = by_id.get(ann.get("image_id"))
        if image is None:
            raise LabelsError(f"{where} refers to image_id {ann.get('image_id')}, which is not in images")
        if ann.get("category_id") not in categories:
            raise LabelsError(f"{where} has category_id {ann.get('category_id')}, which is not in categories "
                              f"{sorted(categories)}")
        label = categories[ann["category_id"]]
        keypoints = np.asarray(ann.get("keypoints") or [], dtype=np.float64).reshape(-1, 3)
        visible = keypoints[keypoints[:, 2] > 0, :2]
        if len(visible):
            image.shapes.append(Shape("point", label, visible))
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list):
            for polygon in segmentation:
                image.shapes.append(Shape("polygon", label, np.asarray(polygon, dtype=np.float64).reshape(-1, 2)))
        elif segmentation:
            ignored["rle segmentation"] = ignored.get("rle segmentation", 0) + 1
    labels = tuple(categories[k] for k in sorted(categories))
    return Export(list(by_id.values()), labels, {}, ignored)
