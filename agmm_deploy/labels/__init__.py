"""Sparse labels from annotation tools into the folder data set, and predictions back as pre-annotations.

One row per format: its name, the file endings it usually has, how to recognise it from the file's first
characters, its reader (file -> Export) and its pre-annotation writer (None where the tool takes none from us).
Adding a format is a new module with ``detect`` / ``read`` (/ ``write``) and a row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from agmm_deploy.labels import coco, csv, cvat, label_studio
from agmm_deploy.labels.annotations import Export, LabelsError


@dataclass(frozen=True)
class LabelFormat:
    name: str
    suffixes: tuple[str, ...]
    detect: Callable[[str], bool]
    read: Callable[[Path], Export]
    write: Callable[..., bytes] | None


# Detection tries the rows in order: the first whose detect() accepts the file's head wins.
FORMATS: tuple[LabelFormat, ...] = (
    LabelFormat("cvat", (".xml",), cvat.detect, cvat.read, cvat.write),
    LabelFormat("label-studio", (".json",), label_studio.detect, label_studio.read, label_studio.write),
    LabelFormat("coco", (".json",), coco.detect, coco.read, None),
    LabelFormat("csv", (".csv", ".txt"), csv.detect, csv.read, None),
)
# Enough of the file to recognise it, without reading a large export twice.
_HEAD_CHARS = 65536


def get_format(name: str) -> LabelFormat:
    """The row of ``name``; an unknown name is refused with the known ones."""
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise LabelsError(f"format {name!r} is not supported; expected one of {[f.name for f in FORMATS]}")


def detect_format(path: Path) -> LabelFormat:
    """The format of the export at ``path``, recognised from its first characters."""
    if not path.is_file():
        raise LabelsError(f"annotation file {path} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(_HEAD_CHARS)
    if not head.strip():
        raise LabelsError(f"the export {path} is empty; export the annotations from the tool again")
    for fmt in FORMATS:
        if fmt.detect(head):
            return fmt
    raise LabelsError(f"{path} is none of {[f.name for f in FORMATS]} as far as its first lines tell; "
                      "pass --format if it is one of them")


def read_export(path: Path, fmt: LabelFormat) -> Export:
    """``fmt.read(path)``, with anything the reader did not foresee in a third-party file as one sentence too.

    The readers check every value they use and name its field; this is the net beneath them, so that no export
    ends in a traceback.
    """
    try:
        return fmt.read(path)
    except LabelsError:
        raise
    except OSError as err:
        raise LabelsError(f"annotation file {path} cannot be read ({err.strerror or err})") from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError,
            MemoryError) as err:
        detail = str(err)[:200]
        raise LabelsError(f"{path} could not be read as a {fmt.name} export ({type(err).__name__}: {detail}); "
                          "export it from the tool again or pass --format if it is another format") from None


__all__ = ["FORMATS", "Export", "LabelFormat", "LabelsError", "detect_format", "get_format", "read_export"]
