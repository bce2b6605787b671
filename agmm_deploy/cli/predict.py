"""agmm-predict MODEL INPUT... --out OUT [--engine local|ray]: label PNGs (and overlays) for images, folders and
manifests, from any model a backend of the runtime table reads (a checkpoint, .onnx, .engine, ...).

For each image ``INPUT/a/b.jpg`` it writes ``OUT/a/b.png`` (indexed PNG: pixel = class id, colours from the
model's palette), ``OUT/a/b_overlay.png`` with ``--overlay``, and ``OUT/manifest.parquet`` (a row per input).
A rerun skips the images already complete. The work is ``agmm_deploy.bulk.predict_images``.

Exit codes: 0 all written; 1 some images failed or could not be read (named on stderr and in the manifest);
2 the model, the inputs or --out are unusable (before any work).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from agmm_deploy.checkpoint import raw_recipes
from agmm_deploy.cli import class_names, positive_int
from agmm_deploy.transforms import DEFAULT_MAX_PIXELS, SLIDING_OVERLAP

# Failures named on stderr at most; the manifest has them all.
SHOWN_FAILURES = 20


def get_args_parser() -> argparse.ArgumentParser:
    from agmm_deploy.bulk import ENGINES

    parser = argparse.ArgumentParser("agmm-predict", description="Segment images with a checkpoint, .onnx, "
                                     ".engine or any model the runtime table reads; writes label PNGs that mirror "
                                     "the input tree, and OUT/manifest.parquet.")
    parser.add_argument("model", type=Path, help="checkpoint (.pt/.pth), model.onnx, model.engine, ...")
    parser.add_argument("images", nargs="+",
                        help="image files, folders (searched recursively) and manifests (.txt: a path per line; "
                        ".csv/.parquet: a 'path' column); also URIs pyarrow reads (s3://bucket/folder, gs://..., "
                        "file:///...), in manifests too")
    parser.add_argument("--out", required=True,
                        help="output folder (local, or mounted on every node of a cluster; not a URI)")
    parser.add_argument("--engine", default="local", choices=[e.name for e in ENGINES],
                        help="local: one process, decoding and encoding overlapping the model (default); "
                        "ray: Ray Data on a cluster or this machine (pip install 'agmm-deploy[ray]')")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="model inputs per model call (default 16 on a GPU, 8 on a CPU)")
    parser.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png")
    parser.add_argument("--overlap", type=float, default=SLIDING_OVERLAP,
                        help="overlap of sliding-window tiles for images larger than the model input "
                        "(default 2/3, as the official evaluation)")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the colours in the overlay")
    parser.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                        help=f"larger images are failed rows, refused from their header (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="local engine: decode/encode threads (default: the CPU count)")
    parser.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                        help="ray engine: the cluster to join (default: RAY_ADDRESS, else a new one on this machine)")
    parser.add_argument("--actors", type=positive_int, default=None,
                        help="ray engine: model actors (default: one per GPU; without GPUs one single-threaded actor per CPU, "
                        "at most 8 a node)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--backbone", default=None, help="raw official state dicts only, e.g. resnet101")
    parser.add_argument("--num-classes", type=int, default=None, help="raw official state dicts only")
    parser.add_argument("--dataset", default=None, choices=raw_recipes(),
                        help="raw official state dicts only: the official recipe it was trained with")
    parser.add_argument("--classes", type=class_names, default=None,
                        help="raw official state dicts only: comma-separated class names, for a model trained on "
                        "other classes than the recipe's")
    return parser


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
    from agmm_deploy.bulk import BulkError, predict_images

    try:
        result = predict_images(
            args.model, args.images, args.out, engine=args.engine, progress=not args.no_progress,
            on_start=lambda line: print(f"agmm-predict: {line}", flush=True),
            device=args.device, batch_size=args.batch_size, overlap=args.overlap, overlay=args.overlay,
            alpha=args.alpha, max_pixels=args.max_pixels, workers=args.workers, ray_address=args.ray_address,
            actors=args.actors, load_kwargs=_raw_state_dict_options(args))
    except (BulkError, ValueError) as err:
        print(f"agmm-predict: error: {err}", file=sys.stderr)
        return 2
    print(f"agmm-predict: {result.summary()}")
    for failure in result.failures[:SHOWN_FAILURES]:
        print(f"agmm-predict: not written: {failure}", file=sys.stderr)
    if len(result.failures) > SHOWN_FAILURES:
        print(f"agmm-predict: and {len(result.failures) - SHOWN_FAILURES} more; every one is a row of "
              f"{result.manifest} with status failed or skipped", file=sys.stderr)
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
