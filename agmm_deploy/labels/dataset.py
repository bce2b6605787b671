"""An export plus its images -> the folder data set the trainer reads, checked in full before anything is written.

Written: ``classes.txt`` (one ``<name> R G B`` per line, the trainer's format), ``train/images/<file>`` (the image
files as they are, EXIF included: the trainer applies the orientation, as the tools did) and
``train/labels/<stem>.png`` (indexed PNG: class id at marked pixels, 255 elsewhere, default palette colours).
Everything goes into a temporary folder beside ``out`` that is renamed to ``out`` at the end, so a failure
leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from agmm_deploy.atomic import atomic_write_bytes
from agmm_deploy.constants import IGNORE_INDEX, default_palette
from agmm_deploy.decode import ImageDecodeError, check_image_header, read_image_header
from agmm_deploy.labels.annotations import Export, ImageAnnotations, LabelsError
from agmm_deploy.labels.rasterize import rasterize
from agmm_deploy.transforms import palette_png

# EXIF orientations 5-8 turn the image by 90 degrees: width and height swap when it is shown upright.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
# At most this many problems are listed; the rest are counted.
_MAX_PROBLEMS = 10


@dataclass
class ImportSummary:
    """What ``import_labels`` wrote.

    pixels_per_class: labelled pixels per class name over all images; clicks / scribbles / regions: per
    written image, in order; unlabelled: images of the export with no shape at all (not written: an image
    without a single label would teach the image-level class loss that no class is present).
    """

    root: Path
    classes: tuple[str, ...]
    images: list[str] = field(default_factory=list)
    pixels_per_class: dict[str, int] = field(default_factory=dict)
    clicks: list[int] = field(default_factory=list)
    scribbles: list[int] = field(default_factory=list)
    regions: list[int] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)


def read_classes(path: Path) -> tuple[str, ...]:
    """Class names from a classes.txt: one per line; a trailing ``R G B`` on a line is allowed and dropped."""
    if not path.is_file():
        raise LabelsError(f"--classes {path} does not exist; expected a text file with one class name per line")
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if len(words) > 3 and all(w.isdigit() and int(w) < 256 for w in words[-3:]):
            words = words[:-3]
        if words:
            names.append(" ".join(words))
    if len(names) < 2 or len(set(names)) != len(names):
        raise LabelsError(f"--classes {path} lists {names}; expected at least 2 distinct class names, one per line")
    return tuple(names)


def _resolve_classes(export: Export, classes: tuple[str, ...] | None) -> tuple[str, ...]:
    used = list(dict.fromkeys(s.label for image in export.images for s in image.shapes))
    known = classes if classes is not None else (export.labels or tuple(used))
    unknown = [name for name in used if name not in known]
    if unknown:
        source = "--classes" if classes is not None else "the export's label list"
        raise LabelsError(f"the export uses label(s) {unknown} that are not in {source} {list(known)}; add them "
                          "there or rename them in the tool")
    if len(known) < 2:
        raise LabelsError(f"the export names {len(known)} class ({list(known)}); the trainer needs at least 2: add "
                          "a background class (label some background) or pass --classes")
    return tuple(known)


def _escapes(name: str) -> bool:
    """True for a name that is not a plain relative path: absolute, a drive or UNC path, or with a '..' part."""
    parts = name.replace("\\", "/").split("/")
    return not name or name.startswith(("/", "\\")) or (name[:1].isalpha() and name[1:2] == ":") or ".." in parts


def _find_image(images_dir: Path, name: str) -> Path | None:
    """The file ``name`` (or its base name) under ``images_dir``, resolved; None when neither is there.

    Raises:
        LabelsError: the name escapes ``images_dir`` (absolute, '..', or a symlink resolving outside). Decided
            from the name and the links alone, before anything is opened, with one sentence whether the file
            it names exists or not.
    """
    root = images_dir.resolve()
    refusal = LabelsError(f"image {name!r} of the export names a file outside --images {images_dir}; refused "
                          "without opening it. Image names must be paths inside --images (no '..', no absolute "
                          "path, no link out of it)")
    if _escapes(name):
        raise refusal
    for candidate in dict.fromkeys((images_dir / name, images_dir / Path(name).name)):
        resolved = candidate.resolve()
        if not resolved.is_relative_to(root):
            raise refusal
        if resolved.is_file():
            return candidate
    return None


def _upright_size(path: Path) -> tuple[tuple[int, int], tuple[int, int], int]:
    """(width, height) as shown (EXIF orientation applied), as stored, and the orientation (1 = none).

    The header is priced by the bounded decoder first, so an image the trainer could not decode is refused here.
    """
    try:
        header = read_image_header(path.read_bytes(), str(path))
        check_image_header(header, str(path))
        with Image.open(path, formats=[header.format]) as image:
            stored = image.size
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except ImageDecodeError as err:
        raise LabelsError(str(err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise LabelsError(f"{path} cannot be read as an image ({err})") from None
    upright = stored[::-1] if orientation in _SWAPPING_ORIENTATIONS else stored
    return upright, stored, orientation


def _check_image(entry: ImageAnnotations, path: Path, size: tuple[int, int], stored: tuple[int, int],
                 orientation: int) -> list[str]:
    problems = []
    width, height = size
    if entry.width is not None and (entry.width, entry.height) != size:
        said = f"{entry.width}x{entry.height}"
        if orientation != 1 and (entry.width, entry.height) == stored:
            problems.append(f"image {entry.name}: the export says {said}, the file's size as stored, but its EXIF "
                            f"orientation {orientation} turns it to {width}x{height} as shown (and as trained); "
                            "re-upload the image with the rotation applied (e.g. exiftran -ai) and annotate it upright")
        else:
            turned = ""
            if orientation != 1:
                turned = f" after its EXIF orientation {orientation} (stored {stored[0]}x{stored[1]})"
            problems.append(f"image {entry.name}: the export says {said} but {path} is {width}x{height}{turned}; "
                            "was the image replaced or resized after annotation?")
        return problems
    for shape in entry.shapes:
        x0, y0, x1, y1 = shape.bounds()
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            problems.append(f"image {entry.name} ({width}x{height}): a {shape.kind} of {shape.label!r} spans "
                            f"x {x0:g}..{x1:g}, y {y0:g}..{y1:g}, outside the image; fix or delete it in the tool")
    return problems


def import_labels(export: Export, images_dir: Path, out: Path, classes: tuple[str, ...] | None = None,
                  click_radius: int = 2, scribble_width: int = 3) -> ImportSummary:
    """Checks an export against its images, then writes the folder data set at ``out``.

    Args:
        export: what a reader returned.
        images_dir: the folder holding the annotated image files (names as in the export, or their base names).
        out: the data root to create; it must not exist, or be an empty folder.
        classes: class names fixing the ids (id = position); None takes the export's label list.
        click_radius: radius in pixels of the disk each click marks.
        scribble_width: width in pixels of each scribble's line.
    Returns:
        An ImportSummary.
    Raises:
        LabelsError: one sentence per problem found, with nothing written.
    """
    if not export.images or not any(image.shapes for image in export.images):
        raise LabelsError(f"the export is empty: {len(export.images)} image(s) and no click, scribble, polygon or mask "
                          "in it; export the annotations (not only the images) from the tool")
    if not images_dir.is_dir():
        raise LabelsError(f"--images {images_dir} is not a folder; expected the folder holding the annotated images")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LabelsError(f"--out {out} already exists and is not an empty folder; choose a new data root")
    names = _resolve_classes(export, classes)
    class_ids = {name: index for index, name in enumerate(names)}

    problems, found, stems = [], [], {}
    for entry in export.images:
        if not entry.shapes:
            continue
        try:
            path = _find_image(images_dir, entry.name)
        except LabelsError as err:
            problems.append(str(err))
            continue
        if path is None:
            problems.append(f"image {entry.name} is annotated in the export but is not in {images_dir} (looked for "
                            f"{images_dir / entry.name}); copy it there or point --images at its folder")
            continue
        try:
            size, stored, orientation = _upright_size(path)
        except LabelsError as err:
            problems.append(str(err))
            continue
        problems += _check_image(entry, path, size, stored, orientation)
        stems.setdefault(path.stem, []).append(entry.name)
        found.append((entry, path, size))
    problems += [f"images {' and '.join(group)} would both write train/labels/{stem}.png; rename one of them"
                 for stem, group in stems.items() if len(group) > 1]
    if problems:
        more = len(problems) - _MAX_PROBLEMS
        raise LabelsError("\n".join(problems[:_MAX_PROBLEMS] + ([f"... and {more} more"] if more > 0 else [])))

    summary = ImportSummary(out, names, unlabelled=[e.name for e in export.images if not e.shapes],
                            ignored=dict(export.ignored), pixels_per_class=dict.fromkeys(names, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp's folder is private; the data root is an ordinary folder
        # The colours the annotation tool showed where the export gives them for every class, else the trainer's
        # default colours; classes.txt records them ("<name> R G B"), so masks and overlays keep the tool's look.
        palette = (tuple(export.colours[n] for n in names) if all(n in export.colours for n in names)
                   else default_palette(len(names)))
        atomic_write_bytes(staging / "classes.txt",
                           "".join(f"{n} {r} {g} {b}\n" for n, (r, g, b) in zip(names, palette)).encode("utf-8"))
        (staging / "train" / "images").mkdir(parents=True)
        for entry, path, (width, height) in found:
            label = rasterize(entry.shapes, class_ids, height, width, click_radius, scribble_width)
            shutil.copyfile(path, staging / "train" / "images" / path.name)
            atomic_write_bytes(staging / "train" / "labels" / f"{path.stem}.png", palette_png(label, palette))
            values, counts = _value_counts(label)
            for value, count in zip(values, counts):
                summary.pixels_per_class[names[value]] += count
            summary.images.append(entry.name)
            summary.clicks.append(sum(len(s.points) for s in entry.shapes if s.kind == "point"))
            summary.scribbles.append(sum(1 for s in entry.shapes if s.kind == "polyline"))
            summary.regions.append(sum(1 for s in entry.shapes if s.kind in ("polygon", "mask")))
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _value_counts(label: np.ndarray) -> tuple[list[int], list[int]]:
    values, counts = np.unique(label[label != IGNORE_INDEX], return_counts=True)
    return values.tolist(), counts.tolist()
