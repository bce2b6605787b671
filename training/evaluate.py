"""Evaluate a checkpoint on a validation set: ``python -m training.evaluate CKPT --data-root DIR``.

    python -m training.evaluate runs/city/best.pt --data-root data/cityscapes --mode sliding
    python -m training.evaluate runs/voc/best.pt --data-root data/VOC2012 --mode multiscale --save-png preds/
    torchrun --nproc-per-node 4 -m training.evaluate runs/city/best.pt --data-root ... --mode sliding

The data set, classes and crop size come from the checkpoint; a raw official state dict needs --dataset,
--backbone and --num-classes. Prints the per-class IoU table and the mIoU (confusion matrix summed over ranks).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from agmm_deploy.checkpoint import load_model
from training.data import SegmentationDataset, val_samples
from training.distributed import cleanup_distributed, init_distributed
from training.engine import EVAL_MODES, evaluate


@dataclass
class EvalResult:
    miou: float
    iou: list[float]
    classes: tuple[str, ...]
    mode: str
    images: int


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a DeepLabV3+ checkpoint (mIoU over full labels)",
                                allow_abbrev=False)
    p.add_argument("checkpoint", help="best.pt / last.pt from training.run, or an official raw state dict")
    p.add_argument("--data-root", required=True)
    p.add_argument("--dataset", choices=("cityscapes", "pascal", "folder"),
                   help="default: the checkpoint's dataset")
    p.add_argument("--mode", choices=EVAL_MODES, default=None,
                   help="center | sliding | multiscale | whole (default: sliding on Cityscapes, multiscale on VOC, "
                        "whole otherwise)")
    p.add_argument("--crop-size", type=int, help="center crop / sliding tile (default: the checkpoint's input size)")
    p.add_argument("--val-list", help="split file of the validation images")
    p.add_argument("--max-images", type=int, help="first N validation images only")
    p.add_argument("--save-png", type=Path, help="write colourised predictions (indexed PNGs) into this folder")
    p.add_argument("--json", type=Path, help="write the result as JSON to this file")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--backbone", help="raw state dicts only: resnet50, resnet101, ...")
    p.add_argument("--num-classes", type=int, help="raw state dicts only")
    return p


def main(argv: list[str] | None = None) -> EvalResult:
    args = get_args_parser().parse_args(argv)
    dist_info = init_distributed(args.device)
    try:
        return _evaluate(args, dist_info)
    finally:
        cleanup_distributed()


def _evaluate(args: argparse.Namespace, dist_info) -> EvalResult:
    loaded = load_model(args.checkpoint, backbone=args.backbone, num_classes=args.num_classes, dataset=args.dataset)
    meta = loaded.meta
    dataset = args.dataset or meta.dataset
    if dataset not in ("cityscapes", "pascal", "folder"):
        raise ValueError(f"{args.checkpoint} does not say which data set it was trained on (got {dataset!r}); "
                         "pass --dataset cityscapes|pascal|folder")
    mode = args.mode or {"cityscapes": "sliding", "pascal": "multiscale"}.get(dataset, "whole")
    crop = args.crop_size or meta.input_size[0]
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    if amp_dtype is not None and dist_info.device.type != "cuda":
        raise ValueError(f"--amp {args.amp} needs a CUDA device; this run is on {dist_info.device}. Use --amp none.")
    samples = val_samples(dataset, args.data_root, args.val_list)
    if not samples:
        raise ValueError(f"{args.data_root} has no validation split (expected val/images and val/labels)")
    val_set = SegmentationDataset(samples, meta.num_classes, train=False, mean=meta.mean, std=meta.std)
    shard = list(range(len(val_set)))[: args.max_images][dist_info.rank::dist_info.world_size]
    loader = DataLoader(Subset(val_set, shard), batch_size=1, num_workers=args.workers)
    net = loaded.model.to(dist_info.device)
    matrix = evaluate(net, loader, device=dist_info.device, num_classes=meta.num_classes, mode=mode, crop_size=crop,
                      amp_dtype=amp_dtype, is_main=dist_info.is_main, save_dir=args.save_png, palette=meta.palette,
                      name_of=lambda index: samples[index].label.name)
    images = len(val_set) if args.max_images is None else min(len(val_set), args.max_images)
    result = EvalResult(miou=matrix.miou(), iou=[v * 100 for v in matrix.iou().tolist()], classes=meta.classes,
                        mode=mode, images=images)
    if dist_info.is_main:
        print(f"{args.checkpoint}: {dataset}, {images} validation images, mode {mode} (crop {crop})")
        print(matrix.table(meta.classes))
        print(f"mIoU {result.miou:.2f}  pixel accuracy {matrix.pixel_accuracy():.2f}")
        if args.save_png:
            print(f"wrote {len(shard) if dist_info.world_size == 1 else 'the'} predictions to {args.save_png}")
        if args.json:
            # Classes absent from both labels and predictions have no IoU: null, not NaN (invalid JSON).
            iou = {name: (None if math.isnan(v) else v) for name, v in zip(meta.classes, result.iou)}
            args.json.write_text(json.dumps({"miou": result.miou, "mode": mode, "images": images, "iou": iou},
                                            indent=2, allow_nan=False))
    return result


if __name__ == "__main__":
    main()
