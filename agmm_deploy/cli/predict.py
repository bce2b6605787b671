"""agmm-predict MODEL IMAGES... --out DIR: label PNGs and colour overlays from any model a backend of the runtime
table reads (a checkpoint, .onnx, .engine, ...).

For each image ``foo.jpg`` it writes ``DIR/foo.png`` (indexed PNG: pixel = class id, colours from the model's
palette) and ``DIR/foo_overlay.png``. Images of any size: letterboxed when they fit the model input, sliding
window over input-size tiles when larger. Exit codes: 0 all written; 1 some images failed (named on stderr);
2 the model or the arguments are unusable.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from agmm_deploy.checkpoint import raw_recipes
from agmm_deploy.cli import class_names
from agmm_deploy.constants import IMAGE_SUFFIXES
from agmm_deploy.transforms import SLIDING_OVERLAP


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("agmm-predict", description="Segment images with a checkpoint, .onnx, "
                                     ".engine or any model the runtime table reads; writes label PNGs and overlays.")
    parser.add_argument("model", type=Path, help="checkpoint (.pt/.pth), model.onnx, model.engine, ...")
    parser.add_argument("images", type=Path, nargs="+", help="image files or folders of images")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--overlap", type=float, default=SLIDING_OVERLAP,
                        help="overlap of sliding-window tiles for images larger than the model input "
                        "(default 2/3, as the official evaluation)")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the colours in the overlay")
    parser.add_argument("--backbone", default=None, help="raw official state dicts only, e.g. resnet101")
    parser.add_argument("--num-classes", type=int, default=None, help="raw official state dicts only")
    parser.add_argument("--dataset", default=None, choices=raw_recipes(),
                        help="raw official state dicts only: the official recipe it was trained with")
    parser.add_argument("--classes", type=class_names, default=None,
                        help="raw official state dicts only: comma-separated class names, for a model trained on "
                        "other classes than the recipe's")
    return parser


def _collect(inputs: list[Path]) -> list[Path]:
    paths = []
    for item in inputs:
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(item)
    return paths


def _same_stem(paths: list[Path]) -> list[str]:
    """Inputs whose outputs would overwrite each other (same file stem, e.g. a/x.jpg and b/x.png)."""
    by_stem: dict[str, list[Path]] = {}
    for path in paths:
        by_stem.setdefault(path.stem, []).append(path)
    return [" and ".join(map(str, group)) for group in by_stem.values() if len(group) > 1]


def _raw_state_dict_options(args: argparse.Namespace) -> dict:
    """The raw-state-dict flags that were given, as load_runner keywords; refused for other artifacts."""
    from agmm_deploy.runtime import backend_for

    given = {key: value for key, value in dict(backbone=args.backbone, num_classes=args.num_classes,
                                                dataset=args.dataset, classes=args.classes).items()
             if value is not None}
    if given and args.model.is_file() and backend_for(args.model).name != "pytorch":
        flags = ", ".join(f"--{key.replace('_', '-')}" for key in given)
        raise ValueError(f"{flags} describe raw official state dicts; {args.model.name} is a "
                         f"{backend_for(args.model).artifact}, which carries its own metadata. Drop the flags.")
    return given


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    from tqdm import tqdm

    from agmm_deploy.checkpoint import CheckpointError
    from agmm_deploy.inference import segment_image
    from agmm_deploy.runtime import load_runner
    from agmm_deploy.transforms import ImageDecodeError, encode_png, overlay, palette_png, read_image

    try:
        runner = load_runner(args.model, args.device, **_raw_state_dict_options(args))
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"agmm-predict: error: {err}", file=sys.stderr)
        return 2
    paths = _collect(args.images)
    if not paths:
        print(f"agmm-predict: error: no images in {[str(p) for p in args.images]}; expected files ending in "
              f"{', '.join(IMAGE_SUFFIXES)}", file=sys.stderr)
        return 2
    clashes = _same_stem(paths)
    if clashes:
        print(f"agmm-predict: error: {'; '.join(clashes)} would write the same {args.out}/<stem>.png; predict "
              "them into separate --out folders or rename them", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    h, w = runner.input_size
    print(f"agmm-predict: {runner!r}; {len(paths)} image(s) -> {args.out}")
    failed = []
    start = time.perf_counter()
    for path in tqdm(paths, desc="predict", unit="img"):
        try:
            image = read_image(path)
        except (ImageDecodeError, FileNotFoundError) as err:
            failed.append(f"{path}: {err}")
            continue
        labels = segment_image(runner, image, overlap=args.overlap)  # (H, W) uint8
        (args.out / f"{path.stem}.png").write_bytes(palette_png(labels, runner.meta.palette))
        blended = overlay(image, labels, runner.meta.palette, alpha=args.alpha)
        (args.out / f"{path.stem}_overlay.png").write_bytes(encode_png(blended))
        mode = "letterbox" if image.shape[0] <= h and image.shape[1] <= w else "sliding window"
        tqdm.write(f"  {path.name}: {image.shape[1]}x{image.shape[0]} ({mode}) -> {path.stem}.png, "
                   f"{path.stem}_overlay.png")
    done = len(paths) - len(failed)
    print(f"agmm-predict: wrote {done} label map(s) and overlay(s) to {args.out} in "
          f"{time.perf_counter() - start:.1f} s")
    for failure in failed:
        print(f"agmm-predict: skipped {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
