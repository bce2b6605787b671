"""Evaluate a checkpoint on a validation set: ``python -m training.evaluate CKPT --data-root DIR``.

    python -m training.evaluate runs/city/best.pt --data-root data/cityscapes --mode sliding
    python -m training.evaluate runs/voc/best.pt --data-root data/VOC2012 --mode multiscale --save-png preds/
    torchrun --nproc-per-node 4 -m training.evaluate runs/city/best.pt --data-root ... --mode sliding

The data set, classes and crop size come from the checkpoint; a raw official state dict needs --dataset,
--backbone and --num-classes. Precision and memory layout follow training's defaults (``--amp auto``: bf16
autocast on a CUDA GPU that supports it, fp32 elsewhere; ``--memory-format auto``: channels_last on CUDA), so a
model is evaluated the way its training run evaluated it; ``--amp none --memory-format contiguous`` is exact fp32.
Prints the per-class IoU table and the mIoU (confusion matrix summed over ranks).
Usage and data errors end with one sentence on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from agmm_deploy.checkpoint import load_model
from agmm_deploy.datasets import DATA_FORMATS, DataError, get_format
from training.data import SegmentationDataset
from training.distributed import DistInfo, cleanup_distributed, init_distributed
from training.engine import EVAL_MODE_TEXT, EVAL_MODES, evaluate
from training.cli import run_cli
from training.config import AMP_MODES, MEMORY_FORMATS, resolve_for_device
from training.run import AMP_DTYPES, MEMORY_FORMAT_OF, PRECISION_TEXT


# What --save-png writes: class indices (palette PNG) or the data set's official ids (DataFormat.official_ids).
PNG_IDS = ("class", "official")


@dataclass
class EvalResult:
    """What ``evaluate_checkpoint`` measured: mIoU and per-class IoU in percent (NaN for a class absent from
    both labels and predictions), in the order of ``classes``; the evaluation mode and the number of images."""

    miou: float
    iou: list[float]
    classes: tuple[str, ...]
    mode: str
    images: int


@dataclass(frozen=True)
class EvalPrecision:
    """How the network runs: ``amp`` (auto | none | bf16 | fp16) and ``memory_format`` (auto | channels_last |
    contiguous), ``auto`` until resolve_precision picks the device's choice."""

    amp: str = "auto"
    memory_format: str = "auto"


def resolve_precision(amp: str, memory_format: str, device: torch.device) -> EvalPrecision:
    """``auto`` replaced by what training runs on ``device`` (training.config.resolve_for_device, the one rule for
    both): bf16 + channels_last on a CUDA GPU with bf16, none + channels_last on an older one, none + contiguous on
    the CPU. An explicit --amp bf16|fp16 is checked there: refused on the CPU, and bf16 on a GPU without it."""
    if amp not in AMP_MODES or memory_format not in MEMORY_FORMATS:
        raise ValueError(f"got amp={amp!r}, memory_format={memory_format!r}; expected amp in {AMP_MODES} and "
                         f"memory_format in {MEMORY_FORMATS}")
    return resolve_for_device(EvalPrecision(amp, memory_format), device)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a DeepLabV3+ checkpoint (mIoU over full labels)",
                                allow_abbrev=False)
    p.add_argument("checkpoint", help="best.pt / last.pt from training.run, or an official raw state dict")
    p.add_argument("--data-root", required=True)
    p.add_argument("--dataset", choices=sorted(DATA_FORMATS), help="default: the checkpoint's dataset")
    p.add_argument("--mode", choices=EVAL_MODES, default=None,
                   help="; ".join(f"{m}: {t}" for m, t in EVAL_MODE_TEXT.items()) + " (default: " + ", ".join(
                       f"{row.name} {row.eval_mode}" for row in DATA_FORMATS.values()) + ")")
    p.add_argument("--crop-size", type=int, help="center crop / sliding tile (default: the checkpoint's input size)")
    p.add_argument("--val-list", help="split file of the validation images")
    p.add_argument("--max-images", type=int, help="first N validation images only")
    p.add_argument("--save-png", type=Path, help="write each prediction as <image stem>.png into this folder")
    p.add_argument("--png-ids", choices=PNG_IDS, default="class",
                   help="class: class indices with the model's palette (default); official: the ids of the data "
                        "set's official evaluation (Cityscapes labelIds, for python -m training.cityscapes_eval)")
    p.add_argument("--json", dest="json_path", type=Path, help="write the result as JSON to this file")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="auto (default, as training): bf16 autocast on a CUDA GPU that supports it, none (exact "
                        "fp32) elsewhere")
    p.add_argument("--memory-format", choices=MEMORY_FORMATS, default="auto",
                   help="auto (default, as training): channels_last on CUDA, contiguous on the CPU")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--backbone", help="raw state dicts only: resnet50, resnet101, ...")
    p.add_argument("--num-classes", type=int, help="raw state dicts only")
    return p


def main(argv: list[str] | None = None) -> EvalResult:
    args = vars(get_args_parser().parse_args(argv))
    dist_info = init_distributed(args.pop("device"))
    try:
        return evaluate_checkpoint(**args, dist_info=dist_info)
    finally:
        cleanup_distributed()


def evaluate_checkpoint(checkpoint: str | Path, data_root: str | Path, *, dist_info: DistInfo,
                        dataset: str | None = None, mode: str | None = None, crop_size: int | None = None,
                        val_list: str | Path | None = None, max_images: int | None = None,
                        save_png: Path | None = None, png_ids: str = "class", json_path: Path | None = None,
                        amp: str = "auto", memory_format: str = "auto", workers: int = 2,
                        backbone: str | None = None, num_classes: int | None = None) -> EvalResult:
    """mIoU of a checkpoint on the validation split of ``data_root`` (this rank's shard, matrix summed over ranks).

    Args:
        checkpoint: best.pt / last.pt of training.run, or an official raw state dict (then dataset, backbone
            and num_classes say what it is).
        mode: one of EVAL_MODES; default the data format's ``eval_mode`` (the paper's protocol for Cityscapes and
            VOC, ``served`` for folder data).
        crop_size: center crop / sliding tile; default the checkpoint's input size.
        save_png, json_path: optional outputs, written by the main process; predictions are named after their
            image (``<image stem>.png``, a name the official Cityscapes evaluation matches).
        png_ids: ``class`` (indices, palette) or ``official`` (the data format's ``official_ids``).
        amp, memory_format: as training.run's flags, ``auto`` resolved for the device by resolve_precision.
    Returns:
        EvalResult; raises ValueError when the validation labels hold no labelled pixel (no mIoU exists).
    """
    loaded = load_model(checkpoint, backbone=backbone, num_classes=num_classes, dataset=dataset)
    meta = loaded.meta
    dataset = dataset or meta.dataset
    if dataset not in DATA_FORMATS:
        raise ValueError(f"{checkpoint} does not say which data set it was trained on (got {dataset!r}); "
                         f"pass --dataset {'|'.join(DATA_FORMATS)}")
    data = get_format(dataset)
    if png_ids not in PNG_IDS:
        raise ValueError(f"--png-ids {png_ids!r} is not supported; expected one of {PNG_IDS}")
    if png_ids == "official" and data.official_ids is None:
        raise ValueError(f"--png-ids official: {data.title} has no official ids other than its class indices; use "
                         "--png-ids class")
    mode = mode or data.eval_mode
    crop = crop_size or meta.input_size[0]
    precision = resolve_precision(amp, memory_format, dist_info.device)
    if val_list is not None and "val_list" not in {flag.name for flag in data.flags}:
        raise ValueError(f"--val-list is not used by --dataset {dataset} (its layout: {data.layout}); remove it")
    samples = data.val_samples(Path(data_root), {"val_list": val_list})
    if not samples:
        raise DataError(f"{data_root} has no validation split ({data.title} layout: {data.layout})")
    val_set = SegmentationDataset(samples, meta.num_classes, train=False, mean=meta.mean, std=meta.std)
    shard = list(range(len(val_set)))[:max_images][dist_info.rank::dist_info.world_size]
    loader = DataLoader(Subset(val_set, shard), batch_size=1, num_workers=workers)
    # channels_last on the network's weights is enough: convolutions then return channels_last outputs.
    net = loaded.model.to(dist_info.device, memory_format=MEMORY_FORMAT_OF[precision.memory_format])
    if dist_info.is_main:
        print(f"precision {precision.amp} ({PRECISION_TEXT[precision.amp]}), memory format "
              f"{precision.memory_format} on {dist_info.device}", flush=True)
    matrix = evaluate(net, loader, device=dist_info.device, num_classes=meta.num_classes, mode=mode, crop_size=crop,
                      amp_dtype=AMP_DTYPES[precision.amp], is_main=dist_info.is_main, save_dir=save_png,
                      palette=meta.palette,
                      name_of=lambda index: f"{samples[index].image.stem}.png",
                      official_ids=data.official_ids if png_ids == "official" else None)
    images = len(val_set) if max_images is None else min(len(val_set), max_images)
    # The matrix is summed over ranks, so every rank sees the same total and raises together.
    if int(matrix.mat.sum()) == 0:
        raise ValueError(f"the {images} validation label(s) under {data_root} hold no labelled pixel (every value "
                         f"is {meta.num_classes} or 255), so there is no mIoU; check --data-root / --val-list point "
                         "at full labels")
    result = EvalResult(miou=matrix.miou(), iou=[v * 100 for v in matrix.iou().tolist()], classes=meta.classes,
                        mode=mode, images=images)
    if dist_info.is_main:
        print(f"{checkpoint}: {dataset}, {images} validation images, mode {mode} (crop {crop}): "
              f"{EVAL_MODE_TEXT[mode]}")
        print(matrix.table(meta.classes))
        print(f"mIoU {result.miou:.2f}  pixel accuracy {matrix.pixel_accuracy():.2f}  (mode {mode})")
        if save_png:
            ids = "official ids (single channel)" if png_ids == "official" else "class indices (palette PNG)"
            print(f"wrote {len(shard) if dist_info.world_size == 1 else 'the'} predictions as {ids} to {save_png}")
        if json_path:
            # Classes absent from both labels and predictions have no IoU: null, not NaN (invalid JSON).
            iou = {name: (None if math.isnan(v) else v) for name, v in zip(meta.classes, result.iou)}
            json_path.write_text(json.dumps({"miou": result.miou, "mode": mode, "measures": EVAL_MODE_TEXT[mode],
                                             "images": images, "iou": iou},
                                            indent=2, allow_nan=False))
    return result


def cli(argv: list[str] | None = None) -> int:
    """``main`` for the command line: exit code 0, or 2 with one sentence for an error the user can fix."""
    # ValueError: DataError, CheckpointError, DeviceError and the refusals above, the user's to fix.
    return run_cli(main, argv, (ValueError,))


if __name__ == "__main__":
    sys.exit(cli())
