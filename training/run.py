"""Train DeepLabV3+ with the AGMM loss on sparse labels: ``python -m training.run``.

    python -m training.run --dataset cityscapes --clicks 20 --data-root data/cityscapes --out runs/city
    python -m training.run --dataset pascal --label scribble --data-root data/VOC2012 --out runs/voc
    torchrun --nproc-per-node 8 -m training.run --dataset cityscapes --clicks 100 --data-root ... --amp bf16

Defaults are the official configs (configs/cityscapes.yaml, configs/pascal.yaml of the AGMM code); any value
can be overridden by a flag or a ``--config FILE.yaml`` (flags win over the file, the file over the preset).
An official config file is read as it is: ``mode`` becomes --label (VOC) or --clicks (Cityscapes: 'point' is
100 clicks, as the official code reads), ``replace_stride_with_dilation`` --output-stride; values with no
equivalent here (OHEM criterion, aux head, full-label mode) are refused with the key and the file named.
The resolved configuration is written to ``<out>/config.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.contrib.logging import logging_redirect_tqdm

from agmm_deploy.checkpoint import read_checkpoint, save_checkpoint
from agmm_deploy.constants import IMAGENET_MEAN, IMAGENET_STD
from agmm_deploy.contract import ModelMeta
from agmm_deploy.model import ModelConfig, build_model, count_parameters
from training.data import CITYSCAPES_CLICKS, SegmentationDataset, read_class_names, train_samples, val_samples
from training.distributed import cleanup_distributed, init_distributed, parameters_match_across_ranks
from training.engine import EVAL_MODES, TrainForward, evaluate, poly_factor, train_one_epoch
from training.losses import AGMMLoss, PartialCELoss

NUM_CLASSES = {"cityscapes": 19, "pascal": 21}
# The official configs (configs/cityscapes.yaml, configs/pascal.yaml); lr is for the official GPU count.
PRESETS: dict[str, dict[str, Any]] = {
    "cityscapes": dict(backbone="resnet50", crop_size=721, epochs=240, batch_size=4, lr=5e-3, head_lr_mult=1.0,
                       colour_aug=False, clicks=100),
    "pascal": dict(backbone="resnet101", crop_size=321, epochs=80, batch_size=16, lr=1e-3, head_lr_mult=10.0,
                   colour_aug=True, label="point"),
    "folder": dict(backbone="resnet50", crop_size=321, epochs=80, batch_size=8, lr=1e-3, head_lr_mult=10.0,
                   colour_aug=False),
}
COMMON = dict(stem="deep", output_stride=8, momentum=0.9, weight_decay=1e-4, poly_power=0.9, loss="agmm",
              amp="none", workers=4, seed=0, eval_mode="auto", eval_every=1, device="auto", max_steps=None,
              max_val_images=None, pretrained=None, resume=None, train_list=None, val_list=None, log_every=10,
              multi_grid=None, aspp_rates=None, clicks=None, label=None, colour_aug=None, data_root=None,
              out=None)
# Keys of the official YAML configs, read as ours.
OFFICIAL_KEYS = {"lr_multi": "head_lr_mult", "dilations": "aspp_rates", "aug": "colour_aug"}
# Official keys that need a translation or a check (see _read_official_key). conf_thresh and weight are read by
# no official training script (train_city.py, train_voc.py), so they change nothing there either.
TRANSLATED_OFFICIAL_KEYS = {"mode", "criterion", "nclass", "aux", "replace_stride_with_dilation"}
UNUSED_OFFICIAL_KEYS = {"conf_thresh", "weight"}
# replace_stride_with_dilation of the official ResNet, as our --output-stride.
OUTPUT_STRIDE_OF_DILATION = {(False, True, True): 8, (False, False, True): 16}
# Official Cityscapes schedule: center-crop validation, sliding window for the last 20 epochs.
SLIDING_LAST_EPOCHS = 20


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train DeepLabV3+ with the AGMM loss on sparse labels", allow_abbrev=False)
    # Every default is None: the value then comes from --config, else from the dataset preset (see PRESETS).
    p.add_argument("--config", help="YAML file of settings (our flag names with underscores, or official keys)")
    p.add_argument("--dataset", choices=sorted(PRESETS), help="cityscapes | pascal | folder")
    p.add_argument("--data-root", help="data set root in the Cityscapes / VOC / folder layout")
    p.add_argument("--clicks", type=int, choices=(20, 50, 100), help="Cityscapes sparse labels (default 100)")
    p.add_argument("--label", choices=("point", "scribble"), help="VOC sparse labels (default point)")
    p.add_argument("--train-list", help="split file: '<image> <label>' per line (official format) or VOC ids")
    p.add_argument("--val-list", help="split file of the validation images, same formats")
    p.add_argument("--out", help="output folder (default runs/<dataset>)")
    p.add_argument("--backbone", choices=("resnet18", "resnet34", "resnet50", "resnet101"))
    p.add_argument("--stem", choices=("deep", "torchvision"), help="deep = official v1c stem (default)")
    p.add_argument("--output-stride", type=int, choices=(8, 16))
    p.add_argument("--pretrained", help="backbone weights: official resnet50.pth/resnet101.pth, a torchvision "
                                        "state dict, or 'imagenet' (torchvision stem, needs network)")
    p.add_argument("--crop-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per process (per GPU)")
    p.add_argument("--lr", type=float, help="backbone learning rate; the head gets lr x --head-lr-mult")
    p.add_argument("--head-lr-mult", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--poly-power", type=float)
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (the poly schedule "
                                                 "ends there too); for short runs")
    p.add_argument("--loss", choices=("agmm", "ce"), help="agmm (default) or partial cross-entropy only")
    p.add_argument("--colour-aug", type=_boolean, help="photometric augmentation (default: on for pascal)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), help="mixed precision on CUDA (default none)")
    p.add_argument("--workers", type=int, help="data loader workers per process")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda (default auto)")
    p.add_argument("--eval-mode", choices=("auto", *EVAL_MODES),
                   help="auto: Cityscapes center crop, sliding window in the last 20 epochs; VOC/folder whole image")
    p.add_argument("--eval-every", type=int, help="evaluate every N epochs (and after the last)")
    p.add_argument("--max-val-images", type=int, help="evaluate on the first N validation images only")
    p.add_argument("--log-every", type=int, help="log line every N steps")
    p.add_argument("--resume", help="checkpoint to continue from, or 'auto' for <out>/last.pt if it exists")
    return p


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def resolve_config(flags: dict[str, Any], config_path: str | Path | None = None) -> dict[str, Any]:
    """The run's settings: preset of the dataset < the ``--config`` file < explicit flags.

    Args:
        flags: settings given on the command line, our names with underscores; None means "not given".
        config_path: YAML file of our settings or of official AGMM keys (lr_multi, dilations, aug, mode, ...).
    Returns:
        Every setting of COMMON and the dataset's PRESETS entry, plus dataset, data_root and out.
    """
    from_file: dict[str, Any] = {}
    official: dict[str, Any] = {}
    path = Path(config_path) if config_path else None
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"--config {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path} holds a {type(loaded).__name__}; expected a mapping of settings")
        known = set(COMMON) | {k for preset in PRESETS.values() for k in preset} | {"dataset", "data_root"}
        for key, value in loaded.items():
            key = OFFICIAL_KEYS.get(key.replace("-", "_"), key.replace("-", "_"))
            if key in UNUSED_OFFICIAL_KEYS:
                continue
            if key in TRANSLATED_OFFICIAL_KEYS:
                official[key] = value
                continue
            if key not in known:
                raise ValueError(f"--config {path}: unknown setting {key!r}; expected one of "
                                 f"{sorted(known | TRANSLATED_OFFICIAL_KEYS)}")
            from_file[key] = value
    given = {k: v for k, v in flags.items() if v is not None}
    dataset = given.get("dataset", from_file.get("dataset"))
    if dataset is None:
        raise ValueError("--dataset is required (cityscapes, pascal or folder), as a flag or in --config")
    if dataset not in PRESETS:
        raise ValueError(f"dataset {dataset!r} is not supported; expected one of {sorted(PRESETS)}")
    for key, value in official.items():
        for ours, setting in _read_official_key(key, value, dataset, path).items():
            if ours in from_file and from_file[ours] != setting:
                raise ValueError(f"--config {path}: {key}: {value!r} means {ours}={setting!r}, but the file also "
                                 f"sets {ours}: {from_file[ours]!r}; keep one of the two")
            from_file[ours] = setting
    config = {**COMMON, **PRESETS[dataset], **from_file, **given, "dataset": dataset}
    if config["data_root"] is None:
        raise ValueError("--data-root is required: the folder holding the data set")
    config["out"] = config["out"] or f"runs/{dataset}"
    return config


def _read_official_key(key: str, value: Any, dataset: str, path: Path) -> dict[str, Any]:
    """One official config key as our settings (maybe none), or a ValueError naming the key and the file."""
    where = f"--config {path}: {key}: {value!r}"
    if key == "mode":
        # The official dataset/sass.py: VOC 'point' -> point/segcls, 'scribble' -> scribble/seginst; Cityscapes
        # 'point' -> 100clicks/; its other values mean full labels or a random_50clicks/ folder: not trained on here.
        if dataset == "pascal" and value in ("point", "scribble"):
            return {"label": value}
        clicks = re.fullmatch(r"(\d+)clicks", str(value))
        if dataset == "cityscapes" and (value == "point" or (clicks and int(clicks[1]) in CITYSCAPES_CLICKS)):
            return {"clicks": 100 if value == "point" else int(clicks[1])}  # official 'point' reads 100clicks/
        if dataset == "folder":
            raise ValueError(f"{where}: a folder data set has one kind of label (train/labels/); remove the key")
        expected = {"pascal": "'point' or 'scribble' (or --label)",
                    "cityscapes": "'point' (= 100 clicks) or " + ", ".join(f"'{n}clicks'" for n in CITYSCAPES_CLICKS)
                                  + " (or --clicks)"}[dataset]
        raise ValueError(f"{where} cannot be mapped for dataset {dataset}; expected {expected}. Training on full "
                         "labels is not supported")
    if key == "criterion":
        # The official scripts use plain cross-entropy for name CELoss and OHEM for any other name; we have CE.
        criterion = value if isinstance(value, dict) else {"name": value}
        extra = {k: v for k, v in (criterion.get("kwargs") or {}).items() if (k, v) != ("ignore_index", 255)}
        unknown = set(criterion) - {"name", "kwargs", "use_class_weight"}
        if criterion.get("name") != "CELoss" or criterion.get("use_class_weight") or extra or unknown:
            raise ValueError(f"{where} is not implemented: the seg term here is plain cross-entropy (criterion "
                             "name CELoss, no class weights, ignore_index 255; OHEM is not available). Set name: "
                             "CELoss or remove the key")
        return {}
    if key == "nclass":
        if dataset in NUM_CLASSES and value != NUM_CLASSES[dataset]:
            raise ValueError(f"{where} does not match dataset {dataset} ({NUM_CLASSES[dataset]} classes)")
        if dataset not in NUM_CLASSES:
            raise ValueError(f"{where}: a folder data set takes its classes from classes.txt; remove the key")
        return {}
    if key == "aux":
        if value:
            raise ValueError(f"{where}: the auxiliary head is not implemented; set aux: False or remove the key")
        return {}
    if key == "replace_stride_with_dilation":
        stride = OUTPUT_STRIDE_OF_DILATION.get(tuple(bool(v) for v in value) if isinstance(value, list) else None)
        if stride is None:
            raise ValueError(f"{where} cannot be mapped; expected [False, True, True] (output stride 8) or "
                             "[False, False, True] (output stride 16)")
        return {"output_stride": stride}
    raise AssertionError(f"no translation for official key {key!r}")


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "none":
        return None
    if device.type != "cuda":
        raise ValueError(f"--amp {amp} needs a CUDA device; this run is on {device}. Use --amp none on CPU.")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _logger(out: Path, is_main: bool) -> logging.Logger:
    logger = logging.getLogger("training")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    formatter = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(out / "train.log"))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seeds torch's RNG (dropout) per epoch and rank, so a run resumed at an epoch boundary draws the same."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


@dataclass
class RunResult:
    """Where a training run ended: its folder, the global step and epoch reached, the best validation mIoU
    (percent; -inf without validation) and the checkpoints written."""

    out: Path
    step: int
    epoch: int
    best_miou: float
    last_checkpoint: Path
    best_checkpoint: Path | None


def main(argv: list[str] | None = None) -> RunResult:
    args = vars(get_args_parser().parse_args(argv))
    config_path = args.pop("config")
    cfg = resolve_config(args, config_path)
    dist_info = init_distributed(cfg["device"])
    device, is_main = dist_info.device, dist_info.is_main
    out = Path(cfg["out"])
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    if dist_info.distributed:
        torch.distributed.barrier()
    logger = _logger(out, is_main)
    try:
        return _train(cfg, dist_info, out, logger)
    finally:
        cleanup_distributed()


def _train(cfg: dict[str, Any], dist_info, out: Path, logger: logging.Logger) -> RunResult:
    device, is_main, world = dist_info.device, dist_info.is_main, dist_info.world_size
    amp_dtype = _amp_dtype(cfg["amp"], device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # --- data
    dataset = cfg["dataset"]
    if dataset == "folder":
        classes = read_class_names(cfg["data_root"])
    else:
        classes = ModelMeta.for_dataset(dataset, (1, 1)).classes
    num_classes = len(classes)
    meta = ModelMeta(classes, ModelMeta.for_dataset(dataset, (1, 1), classes).palette,
                     (cfg["crop_size"], cfg["crop_size"]), IMAGENET_MEAN, IMAGENET_STD, dataset)
    train_set = SegmentationDataset(
        train_samples(dataset, cfg["data_root"], clicks=cfg["clicks"], label=cfg["label"] or "point",
                      train_list=cfg["train_list"]),
        num_classes, train=True, crop_size=cfg["crop_size"], colour_aug=bool(cfg["colour_aug"]), seed=cfg["seed"])
    val_list = val_samples(dataset, cfg["data_root"], cfg["val_list"])
    val_set = SegmentationDataset(val_list, num_classes, train=False) if val_list else None
    if cfg["batch_size"] * world > len(train_set):
        raise ValueError(f"{len(train_set)} training images cannot fill one batch of {cfg['batch_size']} x "
                         f"{world} process(es); lower --batch-size or add images")
    if cfg["batch_size"] < 2 and not (device.type == "cuda" and world > 1):
        raise ValueError("--batch-size 1 cannot train BatchNorm (the ASPP image-pool branch sees one value per "
                         "channel); use --batch-size 2 or more, or several GPUs (SyncBatchNorm)")
    sampler = None
    if world > 1:
        sampler = DistributedSampler(train_set, world, dist_info.rank, shuffle=True, seed=cfg["seed"])
    generator = torch.Generator().manual_seed(cfg["seed"])
    train_loader = DataLoader(train_set, batch_size=cfg["batch_size"], shuffle=sampler is None, sampler=sampler,
                              num_workers=cfg["workers"], pin_memory=device.type == "cuda", drop_last=True,
                              generator=generator)
    val_loader = None
    if val_set is not None:
        shard = list(range(len(val_set)))[: cfg["max_val_images"]][dist_info.rank::world]  # no padding duplicates
        val_loader = DataLoader(Subset(val_set, shard), batch_size=1, num_workers=min(2, cfg["workers"]),
                                pin_memory=device.type == "cuda")

    # --- model, loss, optimiser, schedule
    torch.manual_seed(cfg["seed"])
    model_overrides = {"backbone": cfg["backbone"], "stem": cfg["stem"], "output_stride": cfg["output_stride"],
                       "num_classes": num_classes}
    if cfg["multi_grid"] is not None:
        model_overrides["multi_grid"] = bool(cfg["multi_grid"])
    if cfg["aspp_rates"] is not None:
        model_overrides["aspp_rates"] = tuple(cfg["aspp_rates"])
    model_config = ModelConfig.for_dataset(dataset, **model_overrides)
    net = build_model(model_config, pretrained=cfg["pretrained"]).to(device)
    if device.type == "cuda" and world > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    model = TrainForward(net)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    loss_fn = AGMMLoss(num_classes) if cfg["loss"] == "agmm" else PartialCELoss(num_classes)
    head = [p for name, p in net.named_parameters() if not name.startswith("backbone.")]
    optimizer = torch.optim.SGD([{"params": net.backbone.parameters(), "lr": cfg["lr"]},
                                 {"params": head, "lr": cfg["lr"] * cfg["head_lr_mult"]}],
                                lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg["epochs"]
    if cfg["max_steps"] is not None:
        total_steps = min(total_steps, cfg["max_steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: poly_factor(s, total_steps, cfg["poly_power"]))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    # --- resume
    start_epoch, step, best_miou = 0, 0, float("-inf")
    resume = cfg["resume"]
    if resume == "auto":
        resume = out / "last.pt" if (out / "last.pt").is_file() else None
        if resume is None:
            logger.info(f"--resume auto: no {out / 'last.pt'} yet, starting from scratch")
    if resume:
        ckpt = read_checkpoint(resume)
        if ckpt.get("model_config") != model_config.to_dict():
            raise ValueError(f"--resume {resume} was trained with model {ckpt.get('model_config')}, but this run "
                             f"builds {model_config.to_dict()}; use the same --backbone/--stem/--dataset")
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = int(ckpt["epoch"]) + 1, int(ckpt["step"])
        best_miou = float(ckpt.get("best_miou", float("-inf")))
        logger.info(f"resumed from {resume}: epoch {start_epoch}, step {step}, best mIoU {best_miou:.2f}")

    writer = None
    if is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(
            {**cfg, "num_classes": num_classes, "world_size": world, "steps_per_epoch": steps_per_epoch,
             "total_steps": total_steps, "model_config": model_config.to_dict()}, sort_keys=True))
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tensorboard"))
        logger.info(f"DeepLabV3+ {model_config.backbone} ({model_config.stem} stem), "
                    f"{count_parameters(net) / 1e6:.1f} M parameters, {cfg['loss']} loss, on {device} x {world}")
        logger.info(f"{len(train_set)} training images ({steps_per_epoch} steps/epoch), "
                    f"{len(val_set) if val_set else 0} validation images; {total_steps} steps in all")

    # --- epochs
    best_path = out / "best.pt" if (out / "best.pt").is_file() else None
    epoch = start_epoch - 1
    with logging_redirect_tqdm(loggers=[logger]):  # log lines above the progress bar, not through it
        for epoch in range(start_epoch, cfg["epochs"]):
            if step >= total_steps:
                break
            torch.manual_seed(_epoch_seed(cfg["seed"], epoch, dist_info.rank))
            train_set.set_epoch(epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            generator.manual_seed(cfg["seed"] * 1_000_003 + epoch)  # the single-process shuffle order of this epoch
            result = train_one_epoch(model, loss_fn, optimizer, scheduler, train_loader, device=device, epoch=epoch,
                                     step=step, total_steps=total_steps, amp_dtype=amp_dtype, scaler=scaler,
                                     is_main=is_main, writer=writer,
                                     metrics_path=out / "metrics.jsonl" if is_main else None,
                                     logger=logger, log_every=cfg["log_every"])
            step = result.step
            terms = " ".join(f"{k}={v:.4f}" for k, v in result.losses.items())
            logger.info(f"epoch {epoch} done in {result.seconds:.1f}s ({result.steps_run} steps): {terms}")

            miou = None
            last_epoch = epoch == cfg["epochs"] - 1 or step >= total_steps
            if val_loader is not None and ((epoch + 1) % cfg["eval_every"] == 0 or last_epoch):
                mode = cfg["eval_mode"]
                if mode == "auto":
                    sliding = dataset == "cityscapes" and epoch >= cfg["epochs"] - SLIDING_LAST_EPOCHS
                    mode = "sliding" if sliding else ("center" if dataset == "cityscapes" else "whole")
                matrix = evaluate(net, val_loader, device=device, num_classes=num_classes, mode=mode,
                                  crop_size=cfg["crop_size"], amp_dtype=amp_dtype, is_main=is_main)
                miou = matrix.miou()
                logger.info(f"epoch {epoch} validation ({mode}, {int(matrix.mat.sum())} labelled pixels): "
                            f"mIoU {miou:.2f}, "
                            f"pixel accuracy {matrix.pixel_accuracy():.2f}\n{matrix.table(classes)}")
                if writer is not None:
                    writer.add_scalar("val/mIoU", miou, step)
                    for name, value in zip(classes, matrix.iou().tolist()):
                        if value == value:
                            writer.add_scalar(f"val_iou/{name}", value * 100, step)
            if miou is not None and miou > best_miou:
                best_miou = miou
            if is_main:
                state = dict(args=cfg, epoch=epoch, step=step, best_miou=best_miou, optimizer=optimizer.state_dict(),
                             scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                             miou=miou, total_steps=total_steps)
                save_checkpoint(out / "last.pt", net, meta, **state)
                if miou is not None and miou == best_miou:
                    best_path = save_checkpoint(out / "best.pt", net, meta, **state)
                    logger.info(f"new best mIoU {best_miou:.2f}: wrote {best_path}")
                writer.flush()
    if writer is not None:
        writer.close()
    if world > 1:
        same = parameters_match_across_ranks(net.to(device))
        logger.info(f"parameters identical on all {world} ranks: {same}")
        if not same:
            raise RuntimeError("DDP replicas diverged: the ranks hold different parameters after training")
    if is_main:
        logger.info(f"finished at step {step}: last checkpoint {out / 'last.pt'}, best mIoU "
                    f"{best_miou:.2f} ({best_path})")
    return RunResult(out=out, step=step, epoch=epoch, best_miou=best_miou, last_checkpoint=out / "last.pt",
                     best_checkpoint=best_path)


if __name__ == "__main__":
    main()
