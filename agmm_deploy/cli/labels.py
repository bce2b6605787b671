"""agmm-labels: sparse labels from annotation tools into the folder data set, and predictions back to them.

    agmm-labels import annotations.xml --images photos/ --out data/mine
    agmm-labels preannotate predictions/ --classes data/mine/classes.txt --images photos/ --format cvat --out pre.xml

``import`` reads a CVAT for images 1.1 XML, a Label Studio JSON export, a COCO keypoints JSON or an
``image,x,y,class`` CSV (detected from the file; --format forces one) and writes ``classes.txt``,
``train/images`` and ``train/labels`` for ``python -m training.run --dataset folder``. ``preannotate`` turns the
label PNGs that agmm-predict writes into pre-annotations to import into CVAT or Label Studio for correction.
Exit codes: 0 written; 2 bad arguments or a bad export (one sentence per problem, nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from agmm_deploy.atomic import atomic_write_bytes
from agmm_deploy.constants import IGNORE_INDEX, IMAGE_SUFFIXES, default_palette
from agmm_deploy.labels import FORMATS, LabelsError, detect_format, get_format, read_export
from agmm_deploy.labels.annotations import PredictedImage
from agmm_deploy.labels.dataset import ImportSummary, import_labels, read_classes

# As training/synthetic.py draws the paper's label settings from full labels: a click marks a small disk of
# radius 2 (5 pixels across) inside its segment, a scribble is a 3-pixel-wide line through its region, so that
# imported labels look like the ones the recipe was tuned on.
CLICK_RADIUS = 2
SCRIBBLE_WIDTH = 3


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("agmm-labels", description="Sparse labels from CVAT, Label Studio, COCO "
                                     "keypoints or CSV into the folder data set; predictions back as pre-annotations.")
    commands = parser.add_subparsers(dest="command", required=True)
    readable = [f.name for f in FORMATS]
    imp = commands.add_parser("import", help="an export + its images -> classes.txt, train/images, train/labels")
    imp.add_argument("annotations", type=Path, help="the exported annotation file")
    imp.add_argument("--images", type=Path, required=True, help="folder holding the annotated images")
    imp.add_argument("--out", type=Path, required=True, help="data root to create (must not exist or be empty)")
    imp.add_argument("--classes", type=Path, default=None,
                     help="classes.txt fixing the class ids (one name per line, id = line number from 0); default: "
                     "the export's label list (CVAT, COCO) or the labels in order of first use (Label Studio, CSV)")
    imp.add_argument("--format", choices=readable, default=None, help="force the format instead of detecting it")
    imp.add_argument("--click-radius", type=int, default=CLICK_RADIUS,
                     help=f"radius in pixels of the disk each click marks (default {CLICK_RADIUS}: a disk 5 pixels "
                     "across, as the toolkit's synthetic click labels after the paper's; 0 = the clicked pixel)")
    imp.add_argument("--scribble-width", type=int, default=SCRIBBLE_WIDTH,
                     help=f"width in pixels of each scribble line (default {SCRIBBLE_WIDTH}, as the toolkit's "
                     "synthetic VOC-style scribbles); wider lines spill over object edges on small images")
    writable = [f.name for f in FORMATS if f.write is not None]
    pre = commands.add_parser("preannotate", help="agmm-predict label PNGs -> CVAT XML or Label Studio tasks")
    pre.add_argument("masks", type=Path, help="folder of label PNGs written by agmm-predict (<stem>.png)")
    pre.add_argument("--format", choices=writable, required=True)
    pre.add_argument("--classes", type=Path, required=True, help="classes.txt of the data set the model was trained on")
    pre.add_argument("--out", type=Path, required=True, help="file to write (.xml for CVAT, .json for Label Studio)")
    pre.add_argument("--images", type=Path, default=None,
                     help="folder of the original images, to name each image by its file name (a.jpg); "
                     "default: the label PNG's name")
    pre.add_argument("--image-prefix", default="",
                     help="put before each image name: the folder inside the CVAT task, or the URL Label Studio "
                     "serves the images at, e.g. /data/local-files/?d=photos/")
    pre.add_argument("--shape", choices=("polygon", "mask"), default="polygon",
                     help="one polygon per connected region (outer boundary), or a mask (CVAT RLE / Label Studio "
                     "brush) that keeps holes")
    pre.add_argument("--min-area", type=int, default=16, help="leave out regions smaller than this many pixels")
    train = commands.add_parser("train", help="a Label Studio project's annotations -> fine-tuned, exported model")
    train.add_argument("--label-studio", required=True, metavar="URL", help="the Label Studio server, e.g. "
                       "http://127.0.0.1:8080 (its API key from LABEL_STUDIO_API_KEY)")
    train.add_argument("--project", type=int, required=True, help="the project's id")
    train.add_argument("--out", type=Path, required=True, help="the round's folder (export, data, run, model)")
    train.add_argument("--from", dest="start", type=Path, default=None,
                       help="checkpoint (last.pt of a run) to fine-tune from; default: a new model")
    train.add_argument("--classes", type=Path, default=None, help="classes.txt fixing the class ids (the served "
                       "model's); default: those of --from, else the labels in order of first use")
    train.add_argument("--train-args", default="", help="more flags for training.run, e.g. \"--max-steps 200\"")
    return parser


def run_train(args: argparse.Namespace) -> None:
    import os
    import shlex

    from agmm_deploy.labels.loop import train_from_label_studio

    train_from_label_studio(args.label_studio, os.environ.get("LABEL_STUDIO_API_KEY"), args.project, args.out,
                            args.start, read_classes(args.classes) if args.classes else None,
                            shlex.split(args.train_args), log=lambda line: print(line, flush=True))


def _mean_range(values: list[int]) -> str:
    return f"mean {np.mean(values):.1f} (min {min(values)}, max {max(values)})" if values else "none"


def print_summary(summary: ImportSummary, source: str) -> None:
    print(f"agmm-labels: imported {len(summary.images)} image(s) from {source} into {summary.root}")
    print(f"  classes.txt: {', '.join(f'{i} {n}' for i, n in enumerate(summary.classes))}")
    print("  labelled pixels per class: " + ", ".join(f"{n} {c}" for n, c in summary.pixels_per_class.items()))
    print(f"  clicks per image: {_mean_range(summary.clicks)}; scribbles per image: {_mean_range(summary.scribbles)}; "
          f"filled regions per image: {_mean_range(summary.regions)}")
    never = [n for n, c in summary.pixels_per_class.items() if c == 0]
    if never:
        print(f"  classes with no labelled pixel: {', '.join(never)}")
    if summary.unlabelled:
        shown = ", ".join(summary.unlabelled[:10]) + (" ..." if len(summary.unlabelled) > 10 else "")
        print(f"  images with no label at all (not written): {len(summary.unlabelled)}: {shown}")
    else:
        print("  images with no label at all: 0")
    if summary.ignored:
        counts = ", ".join(f"{kind} {count}" for kind, count in summary.ignored.items())
        print(f"  shapes without pixel labels, not imported: {counts}")
    print(f"next: python -m training.run --dataset folder --data-root {summary.root} --out runs/mine")


def run_import(args: argparse.Namespace) -> None:
    if args.click_radius < 0 or args.scribble_width < 1:
        raise LabelsError(f"--click-radius {args.click_radius} / --scribble-width {args.scribble_width}: expected a "
                          "radius >= 0 and a width >= 1 pixels")
    if not args.annotations.is_file():
        raise LabelsError(f"annotation file {args.annotations} does not exist")
    fmt = get_format(args.format) if args.format else detect_format(args.annotations)
    classes = read_classes(args.classes) if args.classes else None
    export = read_export(args.annotations, fmt)
    summary = import_labels(export, args.images, args.out, classes, args.click_radius, args.scribble_width)
    print_summary(summary, f"{args.annotations} ({fmt.name})")


def _read_label_map(path: Path, num_classes: int) -> np.ndarray:
    from PIL import Image

    from agmm_deploy.decode import ImageDecodeError, check_image_header, read_image_header

    try:  # priced by its header first, as every image is
        header = read_image_header(path.read_bytes(), str(path))
        check_image_header(header, str(path))
    except ImageDecodeError as err:
        raise LabelsError(str(err)) from None
    with Image.open(path, formats=[header.format]) as image:
        if image.mode not in ("P", "L"):
            raise LabelsError(f"{path} has mode {image.mode}; expected a label PNG of class ids as agmm-predict writes")
        label = np.asarray(image)
    bad = np.setdiff1d(np.unique(label), [*range(num_classes), IGNORE_INDEX])
    if bad.size:
        raise LabelsError(f"{path} holds class ids {bad[:8].tolist()} but --classes lists {num_classes} classes; "
                          "pass the classes.txt the model was trained with")
    return label


def run_preannotate(args: argparse.Namespace) -> None:
    classes = read_classes(args.classes)
    if not args.masks.is_dir():
        raise LabelsError(f"{args.masks} is not a folder; expected the --out folder of agmm-predict")
    paths = sorted(p for p in args.masks.glob("*.png") if not p.stem.endswith("_overlay"))
    if not paths:
        raise LabelsError(f"{args.masks} holds no label PNGs (<stem>.png); run agmm-predict with --out there first")
    originals = {}
    if args.images is not None:
        originals = {p.stem: p.name for p in sorted(args.images.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        missing = [p.name for p in paths if p.stem not in originals]
        if missing:
            raise LabelsError(f"label PNG(s) {missing[:5]} have no image of the same stem in --images {args.images}")
    images = [PredictedImage(args.image_prefix + originals.get(p.stem, p.name), _read_label_map(p, len(classes)))
              for p in paths]
    fmt = get_format(args.format)
    atomic_write_bytes(args.out, fmt.write(images, classes, default_palette(len(classes)), args.shape, args.min_area))
    print(f"agmm-labels: wrote {len(images)} image(s) of pre-annotations ({fmt.name}, {args.shape}s) to {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.command == "import":
            run_import(args)
        elif args.command == "train":
            run_train(args)
        else:
            run_preannotate(args)
    except LabelsError as err:
        for line in str(err).splitlines():
            print(f"agmm-labels: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
