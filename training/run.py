"""Train DeepLabV3+ with the AGMM loss on sparse labels: ``python -m training.run``.

    python -m training.run --dataset cityscapes --clicks 20 --data-root data/cityscapes --pretrained resnet50.pth
    python -m training.run --dataset pascal --label scribble --data-root data/VOC2012 --pretrained resnet101.pth
    torchrun --nproc-per-node 8 -m training.run --dataset cityscapes --clicks 100 --data-root ... --pretrained ...
    python -m training.run --dataset folder --data-root data/mine --backbone resnet18 --crop-size 256 --batch-size 4

The paper's data sets refuse to start without ``--pretrained`` (``--pretrained none`` for random weights on
purpose); docs/paper-vs-code.md lists where this recipe departs from the paper and the official code.

Defaults are the data format's recipe (the official configs for Cityscapes and VOC, see agmm_deploy.datasets);
any value can be overridden by a flag or a ``--config FILE.yaml`` (flags win over the file, the file over the
recipe), and official AGMM config files are read as they are (training/config.py). The resolved configuration is
written to ``<out>/config.yaml``. Usage, data and disk errors, and a diverged run, end with one sentence on stderr
and exit code 2. ``last.pt`` is also written within epochs (``--save-every``, default every 15 minutes); SIGTERM or
SIGINT writes it after the current step and exits 75; ``--resume auto`` continues at the next batch (multi-node,
preemption and torchrun restarts: docs/training-cluster.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Subset

from agmm_deploy.checkpoint import CheckpointError, first_nonfinite, read_checkpoint, save_checkpoint
from agmm_deploy.contract import ModelMeta
from agmm_deploy.datasets import DATA_FORMATS, DataError, format_flags
from agmm_deploy.model import BACKBONE_DEPTHS, ModelConfig, build_model, count_parameters
from training.config import (AMP_MODES, LOSSES, MEMORY_FORMATS, SAVE_EVERY_SECONDS, ConfigError, TrainConfig,
                             missing_pretrained, random_weights, resolve_config, resolve_for_device)
from training.data import (EpochSampler, SegmentationDataset, check_labels, default_workers, ignore_stop_signals,
                           usable_cores)
from training.distributed import (DeviceError, DistInfo, any_rank, cleanup_distributed, init_distributed,
                                  parameters_match_across_ranks, same_on_every_rank)
from training.engine import (EVAL_MODE_TEXT, EVAL_MODES, NonFiniteError, SaveSchedule, TrainForward, evaluate,
                             poly_factor, train_one_epoch)
from training.preemption import EXIT_PREEMPTED, Preempted, StopSignals
from training.resume import resume_changes, resume_point
from training.logger import RunLogger, WriteError, write_failed
from training.losses import AGMMLoss, PartialCELoss
from training.cli import run_cli

# The autocast dtype of each resolved --amp (auto is resolved per device first, training.config.resolve_for_device).
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_TEXT = {"none": "fp32, no autocast", "bf16": "bf16 autocast", "fp16": "fp16 autocast, loss scaling"}
MEMORY_FORMAT_OF = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# What a user can fix: printed as their one sentence, exit code 2 (see cli()); a stop on a signal exits
# EXIT_PREEMPTED (75) after its log line.
USER_ERRORS = (ConfigError, DataError, CheckpointError, WriteError, DeviceError, NonFiniteError)
# No trained network holds a weight near this (they are O(1)); a run reaching it has diverged (--lr 1e6 reached
# 1.8e24 within a few steps while its loss was still finite), and its weights are not written.
WEIGHT_LIMIT = 1e6
# The files this run writes atomically; a kill mid-write leaves ".<name>.<random>.tmp" beside them.
ATOMIC_OUTPUTS = ("last.pt", "best.pt", "metrics.jsonl")


def get_args_parser() -> argparse.ArgumentParser:
    layouts = "\n".join(f"  {row.name}: {row.layout}" for row in DATA_FORMATS.values())
    p = argparse.ArgumentParser(description="Train DeepLabV3+ with the AGMM loss on sparse labels", allow_abbrev=False,
                                epilog=f"data formats:\n{layouts}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Every default is None: the value then comes from --config, else from the data format's recipe.
    p.add_argument("--config", help="YAML file of settings (our flag names with underscores, or official keys)")
    p.add_argument("--dataset", choices=sorted(DATA_FORMATS), help="the data format (layouts below)")
    p.add_argument("--data-root", help="data set root in the layout of --dataset")
    for name, flag in format_flags().items():  # flags of some data formats only; the others refuse them
        users = ", ".join(row.name for row in DATA_FORMATS.values() if flag in row.flags)
        p.add_argument(f"--{name.replace('_', '-')}", type=flag.type, choices=flag.choices,
                       help=f"{flag.help} [{users}]")
    p.add_argument("--out", help="output folder (default runs/<dataset>)")
    p.add_argument("--backbone", choices=sorted(BACKBONE_DEPTHS))
    p.add_argument("--stem", choices=("deep", "torchvision"), help="deep = official v1c stem (default)")
    p.add_argument("--output-stride", type=int, choices=(8, 16))
    p.add_argument("--pretrained", help="backbone weights: official resnet50.pth/resnet101.pth, a torchvision "
                                        "state dict, 'imagenet' (torchvision stem, needs network), or 'none' for "
                                        "random weights (required for cityscapes/pascal, whose recipe starts "
                                        "from ImageNet weights)")
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
    p.add_argument("--loss", choices=LOSSES, help="agmm (default) or partial cross-entropy only")
    p.add_argument("--colour-aug", type=_boolean, help="photometric augmentation (default: the recipe's)")
    p.add_argument("--amp", choices=AMP_MODES, help="mixed precision of the network (the loss is always fp32); "
                                                    "auto (default): bf16 on a CUDA GPU that supports it, none "
                                                    "(exact fp32) on the CPU. --amp none is the paper's fp32")
    p.add_argument("--memory-format", choices=MEMORY_FORMATS,
                   help="tensor layout of the network; auto (default): channels_last on CUDA, contiguous on the "
                        "CPU. contiguous with --amp none is the exact fp32 path")
    p.add_argument("--workers", type=int, help="data loader workers per process (default: the cores per process "
                                               "less one, at most 16)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda (default auto)")
    p.add_argument("--eval-mode", choices=("auto", *EVAL_MODES),
                   help="validation mode; auto: the data format's schedule (" + "; ".join(
                       f"{row.name} {row.val_mode}" + (f", {row.final_val_mode} in the last {row.final_val_epochs} "
                                                       "epochs" if row.final_val_mode else "")
                       for row in DATA_FORMATS.values()) + "). served = as agmm-predict and the service")
    p.add_argument("--eval-every", type=int, help="evaluate every N epochs (and after the last)")
    p.add_argument("--table-every", type=int, help="per-class IoU table every N evaluations and at the end "
                                                   "(default 10; the mIoU line comes with every evaluation)")
    p.add_argument("--max-val-images", type=int, help="evaluate on the first N validation images only")
    p.add_argument("--log-every", type=int, help="log line (and losses copied from the device) every N steps")
    p.add_argument("--save-every", type=int, help="write last.pt every N optimiser steps within an epoch too (0: "
                                                  "at epoch ends only; default: every "
                                                  f"{SAVE_EVERY_SECONDS // 60} minutes of training)")
    p.add_argument("--resume", help="checkpoint to continue from, or 'auto' for <out>/last.pt if it exists; "
                                    "continues at the batch after it. Changing --lr, --epochs, ... is said in the "
                                    "log; a flag that shapes the weights otherwise (--crop-size, --seed, ...) is "
                                    "refused")
    return p


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


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
    cfg = resolve_config(args, args.pop("config"))
    dist_info = init_distributed(cfg.device)
    try:
        return train(cfg, dist_info)
    finally:
        cleanup_distributed()


def train(cfg: TrainConfig, dist_info: DistInfo) -> RunResult:
    """The recipe: data -> model -> optimiser -> resume -> for each epoch: train, evaluate, save."""
    device, is_main, world, rank = dist_info.device, dist_info.is_main, dist_info.world_size, dist_info.rank
    cfg = resolve_for_device(cfg, device)  # amp and memory format as run: what config.yaml and checkpoints keep
    amp_dtype = AMP_DTYPES[cfg.amp]
    memory_format = MEMORY_FORMAT_OF[cfg.memory_format]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: the fastest algorithms are found once
    out = Path(cfg.out)
    removed: list[str] = []
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        removed = _remove_stale_temp_files(out)
    if dist_info.distributed:
        torch.distributed.barrier()
    resume = _resume_path(cfg.resume, out)
    if resume is None and cfg.pretrained is None and cfg.data_format.pretrained_source:
        raise missing_pretrained(cfg.data_format, cfg.backbone, f" (--resume auto found no {out / 'last.pt'})")
    ckpt = read_checkpoint(resume) if resume else None
    if not same_on_every_rank(int(ckpt["step"]) if ckpt else -1):
        found = f"{resume} at step {ckpt['step']}" if ckpt else f"no {out / 'last.pt'}"
        raise ConfigError(f"the processes do not resume from the same checkpoint: rank {rank} found {found}. --out "
                          "must be a folder every node shares (or hold the same last.pt on every node)")
    logger = RunLogger(out, is_main=is_main, log_every=cfg.log_every, resume_step=ckpt and int(ckpt["step"]))
    if removed:
        logger.info(f"removed {len(removed)} temporary file(s) of an interrupted write: {', '.join(removed)}")
    if cfg.resume == "auto" and resume is None:
        logger.info(f"--resume auto: no {out / 'last.pt'} yet, starting from scratch")

    logger.info(f"precision {cfg.amp} ({PRECISION_TEXT[cfg.amp]}), memory format {cfg.memory_format}"
                + (", cudnn.benchmark on" if device.type == "cuda" else "") + "; the loss runs in fp32")

    # --- data
    workers = (default_workers(dist_info.local_world_size) if cfg.workers is None
               else _workers_within_cores(cfg.workers, logger))
    derived = (f", from {usable_cores()} core(s) for {dist_info.local_world_size} process(es) on this node"
               if cfg.workers is None else "")
    kept = " (persistent" + (", pinned memory)" if device.type == "cuda" else ")") if workers else ""
    logger.info(f"{workers} data loader worker(s) per process{kept}{derived}")
    cfg = dataclasses.replace(cfg, workers=workers)  # what ran, in config.yaml and the checkpoints
    data = cfg.data_format
    classes, palette = data.classes_and_palette(cfg.data_root)
    num_classes = len(classes)
    meta = ModelMeta.for_dataset(cfg.dataset, (cfg.crop_size, cfg.crop_size), classes, palette)
    train_samples = data.train_samples(Path(cfg.data_root), cfg.options)
    val_samples = data.val_samples(Path(cfg.data_root), cfg.options)
    val_samples = val_samples[:cfg.max_val_images] if val_samples else None
    labelled = check_labels(train_samples, num_classes, f"training labels under {cfg.data_root}", workers)
    if val_samples:
        check_labels(val_samples, num_classes, f"validation labels under {cfg.data_root}", workers)
    logger.info(f"checked {len(train_samples) + len(val_samples or [])} label files: {labelled} labelled "
                "training pixels")
    if not val_samples:
        logger.info(f"{cfg.data_root} has no validation split: no mIoU is measured and no best.pt is written; "
                    f"{out / 'last.pt'} is the checkpoint to evaluate and export")
    train_set = SegmentationDataset(train_samples, num_classes, train=True, crop_size=cfg.crop_size,
                                    colour_aug=cfg.colour_aug, seed=cfg.seed)
    if cfg.batch_size * world > len(train_set):
        fits = len(train_set) // world
        lower = f"lower --batch-size to {fits} or less, or add images" if fits >= 2 else \
            "add images (a batch needs at least 2 per process)"
        raise ConfigError(f"{len(train_set)} training images cannot fill one batch of {cfg.batch_size} x {world} "
                          f"process(es); {lower}")
    if cfg.batch_size < 2 and not (device.type == "cuda" and world > 1):
        raise ConfigError("--batch-size 1 cannot train BatchNorm (the ASPP image-pool branch sees one value per "
                          "channel); use --batch-size 2 or more, or several GPUs (SyncBatchNorm)")
    # One sampler for one process or several (a disjoint shard each): it can start an epoch mid-way (resume).
    sampler = EpochSampler(len(train_set), world, rank, seed=cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                              pin_memory=device.type == "cuda", drop_last=True, generator=generator,
                              persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals)
    val_loader = None
    if val_samples:
        val_set = SegmentationDataset(val_samples, num_classes, train=False)
        shard = list(range(len(val_set)))[rank::world]  # no padding duplicates
        val_loader = DataLoader(Subset(val_set, shard), batch_size=1, num_workers=min(2, workers),
                                pin_memory=device.type == "cuda", persistent_workers=min(2, workers) > 0)

    # --- model, loss, optimiser, schedule
    torch.manual_seed(cfg.seed)
    model_config = ModelConfig.for_dataset(cfg.dataset, backbone=cfg.backbone, stem=cfg.stem,
                                           output_stride=cfg.output_stride, multi_grid=cfg.multi_grid,
                                           aspp_rates=cfg.aspp_rates, num_classes=num_classes)
    net = build_model(model_config, pretrained=None if random_weights(cfg.pretrained) else cfg.pretrained)
    net = sync_batchnorm(net, device, world).to(device, memory_format=memory_format)
    if world > 1:
        synced = any(isinstance(m, nn.SyncBatchNorm) for m in net.modules())
        logger.info(f"BatchNorm statistics over the total batch of {world} processes (SyncBatchNorm)" if synced else
                    f"BatchNorm statistics per process ({device.type} has no SyncBatchNorm; gloo runs are for checks)")
    model = TrainForward(net)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    loss_fn = AGMMLoss(num_classes) if cfg.loss == "agmm" else PartialCELoss(num_classes)
    head = [p for name, p in net.named_parameters() if not name.startswith("backbone.")]
    optimizer = torch.optim.SGD([{"params": net.backbone.parameters(), "lr": cfg.lr},
                                 {"params": head, "lr": cfg.lr * cfg.head_lr_mult}],
                                lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_loader)
    total_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or steps_per_epoch * cfg.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: poly_factor(s, total_steps, cfg.poly_power))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    # --- resume
    start_epoch, start_image, step, best_miou = 0, 0, 0, float("-inf")
    if ckpt is not None:
        if ckpt.get("model_config") != model_config.to_dict():
            raise ConfigError(f"--resume {resume} was trained with model {ckpt.get('model_config')}, but this run "
                              f"builds {model_config.to_dict()}; use the same --backbone/--stem/--dataset")
        changes = resume_changes(ckpt.get("args", {}), cfg, str(resume))
        point, mapping = resume_point(ckpt, str(resume), world, cfg.batch_size)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_image, step = point.epoch, point.start_image, point.step
        # The schedule from this run's settings at the checkpoint's step: the same as saved unless --lr, --epochs,
        # --max-steps, --poly-power, ... changed (each said below).
        scheduler.base_lrs = [cfg.lr, cfg.lr * cfg.head_lr_mult]
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group.update(initial_lr=base, lr=base * poly_factor(step, total_steps, cfg.poly_power),
                         momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        best_miou = float(ckpt.get("best_miou", float("-inf")))
        where = f"image {start_image} of epoch {start_epoch}" if start_image else f"epoch {start_epoch}"
        logger.info(f"resumed from {resume}: step {step}, {where}, best mIoU {best_miou:.2f}")
        for line in changes + ([mapping] if mapping else []):
            logger.info(line)

    if is_main:
        resolved = {**cfg.to_dict(), "num_classes": num_classes, "world_size": world,
                    "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                    "model_config": model_config.to_dict()}
        _write(out / "config.yaml", lambda path: path.write_text(yaml.safe_dump(resolved, sort_keys=True)))
        weights = (f"weights of {resume}" if ckpt is not None else "random weights" if random_weights(cfg.pretrained)
                   else f"backbone weights {cfg.pretrained}")
        logger.info(f"DeepLabV3+ {model_config.backbone} ({model_config.stem} stem), {weights}, "
                    f"{count_parameters(net) / 1e6:.1f} M parameters, {cfg.loss} loss, on {device} x {world}")
        logger.info(f"{len(train_set)} training images ({steps_per_epoch} steps/epoch), "
                    f"{len(val_samples or [])} validation images; {total_steps} steps in all")

    def save(paths: list[Path], **state) -> None:
        """Writes the checkpoint on rank 0 (all ranks call it and agree on the outcome, so none waits alone):
        refused if the weights are non-finite or absurd (NonFiniteError), a WriteError if the disk refuses."""
        problem = unsound_weights(net, step) if is_main else None
        failure = None
        if is_main and problem is None:
            try:
                for path in paths:
                    save_checkpoint(path, net, meta, args=cfg.to_dict(), world_size=world, **state)
            except (OSError, RuntimeError) as err:  # torch.save on a full disk raises RuntimeError
                failure = write_failed(path, err)
        refused, failed = any_rank(problem is not None, failure is not None)
        if problem or refused:
            raise NonFiniteError(problem or "rank 0 refused to write non-finite weights (its log says why)")
        if failure or failed:
            raise failure or WriteError("rank 0 could not write the checkpoint (its log says why)")

    def state(epoch: int, **extra) -> dict:
        return dict(epoch=epoch, step=step, best_miou=best_miou, optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                    total_steps=total_steps, **extra)

    # --- epochs
    best_path = out / "best.pt" if (out / "best.pt").is_file() else None
    epoch = start_epoch - 1
    evaluations = 0  # in this process: the per-class table comes with every table_every-th
    saves = SaveSchedule(cfg.save_every, SAVE_EVERY_SECONDS, is_main=is_main)
    logger.info(f"checkpoint {out / 'last.pt'} at every epoch end"
                + ("" if cfg.save_every == 0 else f" and every {cfg.save_every} steps" if cfg.save_every else
                   f" and every {SAVE_EVERY_SECONDS // 60} minutes of training (--save-every N: every N steps)")
                + f"; SIGTERM/SIGINT: a checkpoint after the current step, exit code {EXIT_PREEMPTED}")
    with StopSignals() as stop, logger:
        for epoch in range(start_epoch, cfg.epochs):
            if step >= total_steps:
                break
            first_image = start_image if epoch == start_epoch else 0
            set_epoch(epoch, cfg.seed, rank, train_set, sampler, generator, first_image)

            def save_mid_epoch(batches: int, epoch: int = epoch, first_image: int = first_image) -> None:
                nonlocal step
                step = scheduler.last_epoch
                images = first_image + batches * cfg.batch_size * world  # of the epoch's order, all ranks
                save([out / "last.pt"], **state(epoch, mid_epoch=True, epoch_images=images, miou=None))

            result = train_one_epoch(model, loss_fn, optimizer, train_loader, scheduler, device, epoch, logger,
                                     total_steps=total_steps, amp_dtype=amp_dtype, scaler=scaler,
                                     memory_format=memory_format, seed=cfg.seed, rank=rank, stop=stop, saves=saves,
                                     save=save_mid_epoch)
            step = result.step
            if result.stopped:
                logger.info(str(Preempted(step, stop.received or "on another rank")))
                raise Preempted(step, stop.received or "on another rank")
            terms = " ".join(f"{k}={v:.4f}" for k, v in result.losses.items())
            logger.info(f"epoch {epoch} done in {result.seconds:.1f}s ({result.steps_run} steps): {terms}")

            miou = None
            last_epoch = epoch == cfg.epochs - 1 or step >= total_steps
            if val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or last_epoch):
                mode = _val_mode(cfg, epoch)
                matrix = evaluate(net, val_loader, device=device, num_classes=num_classes, mode=mode,
                                  crop_size=cfg.crop_size, amp_dtype=amp_dtype, is_main=is_main)
                miou = matrix.miou()
                evaluations += 1
                table = f"\n{matrix.table(classes)}" if last_epoch or evaluations % cfg.table_every == 0 else ""
                logger.info(f"epoch {epoch} validation, mode {mode} ({EVAL_MODE_TEXT[mode]}; "
                            f"{int(matrix.mat.sum())} labelled pixels): "
                            f"mIoU {miou:.2f}, pixel accuracy {matrix.pixel_accuracy():.2f}{table}")
                per_class = {f"val_iou/{name}": v * 100 for name, v in zip(classes, matrix.iou().tolist()) if v == v}
                logger.scalars({"val/mIoU": miou, **per_class}, step)
                best_miou = max(best_miou, miou)
            best = miou is not None and miou == best_miou
            # An epoch cut short by --max-steps is saved as mid-epoch: a resume with more steps finishes it.
            images = first_image + result.steps_run * cfg.batch_size * world
            cut = images < steps_per_epoch * cfg.batch_size * world
            save([out / "last.pt"] + ([out / "best.pt"] if best else []),
                 **state(epoch, mid_epoch=cut, epoch_images=images, miou=miou))
            saves.saved()
            if best:
                best_path = out / "best.pt"
                logger.info(f"new best mIoU {best_miou:.2f}: wrote {best_path}")
            logger.flush()
            if any_rank(stop.requested)[0]:  # a signal during the evaluation or the save: this is its checkpoint
                logger.info(str(Preempted(step, stop.received or "on another rank")))
                raise Preempted(step, stop.received or "on another rank")
    if world > 1:
        same = parameters_match_across_ranks(net.to(device))
        logger.info(f"parameters identical on all {world} ranks: {same}")
        if not same:
            raise RuntimeError("DDP replicas diverged: the ranks hold different parameters after training")
    if val_loader is None:
        logger.info(f"finished at step {step}: last checkpoint {out / 'last.pt'} (no validation split, so no mIoU "
                    "and no best.pt)")
    else:
        logger.info(f"finished at step {step}: last checkpoint {out / 'last.pt'}, best mIoU {best_miou:.2f} "
                    f"({best_path})")
    return RunResult(out=out, step=step, epoch=epoch, best_miou=best_miou, last_checkpoint=out / "last.pt",
                     best_checkpoint=best_path)


def sync_batchnorm(net: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """``net`` with SyncBatchNorm when several CUDA processes train it: BatchNorm statistics over the total batch,
    as the official multi-GPU runs. Unchanged in one process and on the CPU, where gloo has no SyncBatchNorm
    (each rank then normalises over its own batch)."""
    if device.type == "cuda" and world_size > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net


def _workers_within_cores(workers: int, logger: RunLogger) -> int:
    """``workers``, or the CPU cores this process may use when it asks for more (one log line says so).

    More loader processes than cores only contend for them, and PyTorch warns about it on every loader start.
    """
    cores = usable_cores()
    if workers <= cores:
        return workers
    logger.info(f"--workers {workers} is more than the {cores} CPU core(s) this process may use: running {cores} "
                "data loader workers")
    return cores


def set_epoch(epoch: int, seed: int, rank: int, train_set: SegmentationDataset, sampler: EpochSampler,
              generator: torch.Generator, first_image: int = 0) -> None:
    """Everything random in ``epoch`` from (seed, epoch, rank) alone, so a run resumed there draws the same:
    the augmentations (also in persistent workers), the shard and order of the images (each rank a disjoint shard,
    reshuffled every epoch, from ``first_image`` of the order on), the loader's worker seeds. Dropout is seeded
    per step (training.engine.step_seed)."""
    torch.manual_seed(_epoch_seed(seed, epoch, rank))
    train_set.set_epoch(epoch)
    sampler.set_epoch(epoch, first_image)
    generator.manual_seed(seed * 1_000_003 + epoch)  # the loader draws its workers' base seed from it


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seeds torch's RNG (dropout) per epoch and rank, so a run resumed at an epoch boundary draws the same."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _val_mode(cfg: TrainConfig, epoch: int) -> str:
    """--eval-mode, or for auto the data format's schedule (e.g. Cityscapes: sliding window in the last epochs)."""
    if cfg.eval_mode != "auto":
        return cfg.eval_mode
    data = cfg.data_format
    late = data.final_val_mode is not None and epoch >= cfg.epochs - data.final_val_epochs
    return data.final_val_mode if late else data.val_mode


def _resume_path(resume: str | None, out: Path) -> Path | None:
    if resume == "auto":
        return out / "last.pt" if (out / "last.pt").is_file() else None
    return Path(resume) if resume else None


def _remove_stale_temp_files(out: Path) -> list[str]:
    """Deletes what an interrupted atomic write of ours left (``.last.pt.<random>.tmp``); returns their names.

    Only one run writes to a folder at a time, so a temporary file found at start-up belongs to a dead process.
    """
    stale = [p for name in ATOMIC_OUTPUTS for p in out.glob(f".{name}.*.tmp")]
    for path in stale:
        path.unlink(missing_ok=True)
    return [p.name for p in stale]


def unsound_weights(net: nn.Module, step: int) -> str | None:
    """Why the weights after ``step`` must not be written (non-finite, or beyond WEIGHT_LIMIT), or None."""
    bad = first_nonfinite(net.state_dict())
    if bad is None:
        largest = max(((name, float(p.detach().abs().max())) for name, p in net.named_parameters()),
                      key=lambda item: item[1])
        if largest[1] <= WEIGHT_LIMIT:
            return None
        what = f"{largest[0]} reaches {largest[1]:.3g}, beyond {WEIGHT_LIMIT:.0e} (no trained network holds such"
        what += " weights)"
    else:
        what = f"{bad} holds NaN or Inf"
    return (f"the weights after step {step} diverged: {what}; they were not written, the last checkpoint is kept. "
            "Lower --lr")


def _write(path: Path, write) -> Path:
    """Calls ``write(path)``; an I/O failure (torch.save on a full disk raises RuntimeError) becomes a WriteError."""
    try:
        write(path)
    except (OSError, RuntimeError) as err:
        raise write_failed(path, err) from err
    return path


def cli(argv: list[str] | None = None) -> int:
    """``main`` for the command line: exit code 0; 2 with one sentence for an error the user can fix;
    EXIT_PREEMPTED (75) after a stop on SIGTERM/SIGINT with its checkpoint written (its log line said so)."""
    try:
        return run_cli(main, argv, USER_ERRORS, user_message)
    except Preempted:
        return EXIT_PREEMPTED


def user_message(err: BaseException) -> str:
    """The error's sentence; for one re-raised by a DataLoader worker, the original message at its end."""
    text = str(err).strip()
    if "Original Traceback" in text:  # torch's ExceptionWrapper: "Caught X in DataLoader worker ... X: message"
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


if __name__ == "__main__":
    sys.exit(cli())
