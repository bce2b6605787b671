"""Plain CSV, one click per row: ``image,x,y,class`` (x, y in pixels; a header row is optional).

For any tool without a supported export: the image is a file name under ``--images``, the class a name.
Sizes are not stated, so only the image files themselves bound the clicks.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from agmm_deploy.labels.annotations import Export, ImageAnnotations, LabelsError, Shape, number

HEADER = ("image", "x", "y", "class")


def detect(head: str) -> bool:
    """True for a CSV whose first row is the header or has four comma-separated fields."""
    first = head.lstrip().splitlines()[0] if head.strip() else ""
    return tuple(f.strip().lower() for f in first.split(",")) == HEADER or first.count(",") == 3


def read(path: Path) -> Export:
    """Parses an ``image,x,y,class`` CSV."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except UnicodeDecodeError as err:
        raise LabelsError(f"{path} is not UTF-8 text ({err}); expected an image,x,y,class CSV") from None
    except csv.Error as err:  # e.g. a field over the csv module's 131072 characters
        raise LabelsError(f"{path} is not a readable CSV ({err}); expected short image,x,y,class rows") from None
    if rows and tuple(cell.strip().lower() for cell in rows[0]) == HEADER:
        rows = rows[1:]
    images: dict[str, ImageAnnotations] = {}
    labels = []
    for number_, row in enumerate(rows, start=1):
        if len(row) != 4:
            raise LabelsError(f"{path} row {number_} has {len(row)} fields; expected image,x,y,class")
        name, x, y, label = (cell.strip() for cell in row)
        where = f"{path} row {number_}"
        point = np.array([[number(x, where, "x"), number(y, where, "y")]])
        images.setdefault(name, ImageAnnotations(name, [])).shapes.append(Shape("point", label, point))
        if label not in labels:
            labels.append(label)
    return Export(list(images.values()), tuple(labels))
