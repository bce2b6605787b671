"""One epoch of training and one pass of evaluation; ``training.run`` strings them together."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from agmm_deploy.inference import Tiles, chunks, run_slices, sliding_window_scores
from agmm_deploy.metrics import ConfusionMatrix
from agmm_deploy.transforms import SLIDING_OVERLAP, palette_png, sliding_window_tiles
from training.distributed import all_reduce_mean, any_rank
from training.logger import RunLogger
from training.preemption import StopSignals

EVAL_MODES = ("served", "sliding", "multiscale", "whole", "center")
# What each mode's number measures, printed beside every mIoU so that two figures are never compared blindly.
EVAL_MODE_TEXT = {
    "served": "as agmm-predict and the service: letterboxed to the input size when the image fits it, else "
              "sliding window",
    "sliding": "sliding window of crop-size tiles, softmax averaged (the official Cityscapes protocol; what is "
               "served for images larger than the input)",
    "multiscale": "7 scales x flip, softmax averaged (the official VOC protocol; 14 passes, not what is served)",
    "whole": "the whole image in one pass at its own size (not what is served)",
    "center": "the central crop only (fast in-training check, not what is served)",
}
# Official multi-scale test (util/utils.py ms_test): 7 scales, each with a horizontal flip, softmax averaged.
MULTISCALE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


class TrainForward(nn.Module):
    """Routes DDP's forward to ``forward_train`` so that DDP's gradient hooks see the training outputs.

    Calling ``ddp.module.forward_train`` directly would skip DDP's forward and leave gradients unsynchronised.
    The attribute is named ``module`` so that ``agmm_deploy.checkpoint.unwrap`` reaches the network.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.forward_train(images)


def poly_factor(step: int, total_steps: int, power: float = 0.9) -> float:
    """The official poly schedule: lr(step) = base_lr * (1 - step / total)^power, 0 from the last step on."""
    return max(0.0, 1.0 - step / max(1, total_steps)) ** power


class NonFiniteError(FloatingPointError):
    """A loss or the weights became NaN/Inf (or absurdly large): the run stops without writing those weights."""


@dataclass
class SaveSchedule:
    """When mid-epoch checkpoints are due: every ``every_steps`` optimiser steps, or (None) every ``every_seconds``
    of training measured on rank 0 (the ranks agree on it after each step); 0 steps: at epoch ends only."""

    every_steps: int | None
    every_seconds: float
    is_main: bool = True
    last: float = field(default_factory=time.monotonic)

    def due(self, step: int) -> bool:
        if self.every_steps is not None:
            return self.every_steps > 0 and step % self.every_steps == 0
        return self.is_main and time.monotonic() - self.last >= self.every_seconds

    def saved(self) -> None:
        self.last = time.monotonic()


@dataclass
class EpochResult:
    step: int  # global step after the epoch
    losses: dict[str, float] = field(default_factory=dict)  # means over the epoch's steps (all ranks)
    steps_run: int = 0
    seconds: float = 0.0
    stopped: bool = False  # a stop signal was agreed: the checkpoint of ``step`` is written, the epoch is not done


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of torch's RNG (dropout) for one optimiser step on one rank: a run resumed at any step draws the
    same as an uninterrupted one, so no RNG state has to travel in the checkpoint."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def train_one_epoch(model: nn.Module, loss_fn: Callable[..., dict[str, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, loader: Iterable,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, epoch: int,
                    logger: RunLogger, *, total_steps: int, amp_dtype: torch.dtype | None = None,
                    scaler: torch.amp.GradScaler | None = None,
                    memory_format: torch.memory_format = torch.contiguous_format, seed: int = 0, rank: int = 0,
                    stop: StopSignals | None = None, saves: SaveSchedule | None = None,
                    save: Callable[[int], None] | None = None) -> EpochResult:
    """Runs the epoch's steps (stopping at ``total_steps``); the scheduler steps once per optimiser step.

    The global step is the scheduler's (``scheduler.last_epoch``), so a resumed run continues its count. Losses
    stay on the device and are copied to the host (averaged over ranks, checked for NaN/inf, logged) every
    ``logger.log_every`` steps, before that step's update, and at the end of the epoch. After each step the ranks
    agree (one small gloo all-reduce) whether a stop signal arrived on any of them or a checkpoint is due; then
    ``save(steps_run)`` runs on every rank (rank 0 writes), and on a stop the epoch returns with ``stopped``.

    Args:
        model: DDP(TrainForward(net)) or TrainForward(net): returns (feat, logits).
        loss_fn: (feat, logits, mask, cls_label) -> dict with ``total`` and the terms to log.
        loader: batches of (images (B, 3, S, S) float, masks (B, S, S) uint8, cls_label (B, K), index).
        memory_format: the layout of the images, the network's (torch.channels_last with a channels_last network).
        seed, rank: torch's RNG is seeded from (seed, step, rank) before every step (``step_seed``).
        stop, saves, save: the stop signals, the mid-epoch checkpoint schedule and the function writing one.
    Returns:
        EpochResult with the new global step and the epoch's mean loss terms.
    """
    model.train()
    step = scheduler.last_epoch
    sums: dict[str, float] = {}
    pending: list[tuple[int, list[float], torch.Tensor]] = []  # (step, lrs, stacked loss terms on the device)
    keys: list[str] = []
    steps_run = 0
    start = time.perf_counter()
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext())
    bar = logger.progress(loader, desc=f"epoch {epoch}")

    def report() -> None:
        """One device-to-host copy for the pending steps; raises on every rank together if a loss is not finite."""
        if not pending:
            return
        local = torch.stack([terms for _, _, terms in pending])  # (steps, terms)
        # Averaged over ranks before the check, so that a NaN on one rank makes every rank raise here: a rank
        # raising alone would leave the others waiting forever in DDP's gradient all-reduce.
        averaged = all_reduce_mean(local).tolist()
        records = []
        for (at, lrs, _), row, own in zip(pending, averaged, local.tolist()):
            record = dict(zip(keys, row))
            if not math.isfinite(record["total"]):
                raise NonFiniteError(f"non-finite loss at epoch {epoch}, step {at}: {dict(zip(keys, own))} on this "
                                     f"rank, {record} averaged over ranks; nothing after the last checkpoint was "
                                     "written. Lower --lr (or use --amp none/bf16 instead of fp16)")
            for key, value in record.items():
                sums[key] = sums.get(key, 0.0) + value
            records.append({"step": at + 1, "lr": lrs[0], **({"lr_head": lrs[-1]} if len(lrs) > 1 else {}), **record})
        pending.clear()
        logger.steps(epoch, total_steps, records)
        bar.set_postfix(loss=f"{records[-1]['total']:.3f}", lr=f"{records[-1]['lr']:.2e}")

    for images, masks, cls_label, _ in bar:
        if step >= total_steps:
            break
        torch.manual_seed(step_seed(seed, step, rank))
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(device, non_blocking=True).long()  # uint8 through the loader, int64 for the loss
        cls_label = cls_label.to(device, non_blocking=True)
        lrs = [group["lr"] for group in optimizer.param_groups]
        with autocast:
            feat, logits = model(images)
        losses = loss_fn(feat, logits, masks, cls_label)  # computed in fp32 whatever the autocast
        keys = list(losses)
        pending.append((step, lrs, torch.stack([losses[k].detach().float() for k in keys])))
        if steps_run == 0 or (step + 1) % logger.log_every == 0:
            report()  # before the update: a non-finite loss stops the run with the weights of the step before
        total = losses["total"]
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            optimizer.step()
        scheduler.step()
        step += 1
        steps_run += 1
        stopping, saving = any_rank(stop is not None and stop.requested, saves is not None and saves.due(step))
        # The epoch's end (or the run's) writes its own checkpoint right after: no mid-epoch one just before it.
        saving = saving and step < total_steps and steps_run != getattr(loader, "__len__", lambda: -1)()
        if (stopping or saving) and save is not None:
            report()  # the records up to this step are in metrics.jsonl before the checkpoint that covers them
            save(steps_run)
            if saves is not None:
                saves.saved()
        if stopping:
            bar.close()
            return EpochResult(step=step, losses={k: v / steps_run for k, v in sums.items()}, steps_run=steps_run,
                               seconds=time.perf_counter() - start, stopped=True)
    report()
    bar.close()
    means = {k: v / max(1, steps_run) for k, v in sums.items()}
    return EpochResult(step=step, losses=means, steps_run=steps_run, seconds=time.perf_counter() - start)


def _forward_logits(net: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    if amp_dtype is None:
        return net(images).float()
    with torch.autocast(images.device.type, dtype=amp_dtype):
        return net(images).float()


def predict_sliding(net: nn.Module, image: torch.Tensor, num_classes: int, tile: int,
                    amp_dtype: torch.dtype | None = None, tiles_per_batch: int = 4) -> torch.Tensor:
    """Softmax averaged over overlapping tiles (tile = crop size, overlap 2/3). image (1, 3, H, W) -> (1, K, H, W).

    The sliding window of agmm-predict and the service (agmm_deploy.inference), so that the three agree.
    """
    return sliding_window_scores(lambda x: _forward_logits(net, x, amp_dtype), image, (tile, tile), num_classes,
                                 overlap=SLIDING_OVERLAP, tiles_per_batch=tiles_per_batch)


def predict_served(net: nn.Module, image: torch.Tensor, num_classes: int, input_size: int,
                   amp_dtype: torch.dtype | None = None, tiles_per_batch: int = 4) -> torch.Tensor:
    """What agmm-predict and the service compute (agmm_deploy.inference.Tiles): an image that fits the input is
    letterboxed (resized keeping its aspect, zero-padded after normalising, logits resized back), a larger one is
    tiled. image (1, 3, H, W) normalised -> probabilities (1, K, H, W).

    The service resizes the uint8 image before normalising on a CPU; here the normalised image is resized, so the
    two may differ by rounding at a few pixels, never by protocol.
    """
    tiles = Tiles(image[0], (input_size, input_size), num_classes, letterbox=True)
    for batch in chunks([tiles], tiles_per_batch):
        run_slices(lambda x: _forward_logits(net, x, amp_dtype), batch)
    return tiles.scores()[None]


@torch.no_grad()
def predict_multiscale(net: nn.Module, image: torch.Tensor, amp_dtype: torch.dtype | None = None,
                       scales: tuple[float, ...] = MULTISCALE_SCALES) -> torch.Tensor:
    """Softmax probabilities averaged over scales and horizontal flips, as the official ms_test does it.

    The official ms_test sums ``model(x)``, and the official network in eval mode returns ``out.softmax(1)``
    (model/semseg/deeplabv3plus.py), so what it averages is probabilities: each pass's softmax at the scaled
    size, resized back to the image (bilinear, align_corners=True), summed over the 2 x len(scales) passes.

    Shape: image (1, 3, H, W) normalised -> (1, K, H, W) probabilities (summing to 1 over K).
    """
    _, _, h, w = image.shape
    total = None
    for scale in scales:
        resized = F.interpolate(image, size=(int(h * scale), int(w * scale)), mode="bilinear", align_corners=True)
        both = torch.cat([resized, resized.flip(3)])
        probs = _forward_logits(net, both, amp_dtype).softmax(1)  # (2, K, h * scale, w * scale)
        probs = torch.cat([probs[:1], probs[1:].flip(3)])
        probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=True).sum(0, keepdim=True)
        total = probs if total is None else total + probs
    return total / (2 * len(scales))


def center_crop(image: torch.Tensor, label: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official in-training validation crop: the central size x size window (whole axis if smaller)."""
    h, w = image.shape[-2:]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return (image[..., top:top + size, left:left + size], label[..., top:top + size, left:left + size])


@torch.no_grad()
def evaluate(net: nn.Module, loader: Iterable, *, device: torch.device, num_classes: int, mode: str,
             crop_size: int, amp_dtype: torch.dtype | None = None, is_main: bool = True,
             save_dir: Path | None = None, palette: tuple[tuple[int, int, int], ...] | None = None,
             name_of: Callable[[int], str] | None = None,
             official_ids: tuple[int, ...] | None = None) -> ConfusionMatrix:
    """Predicts every image of ``loader`` (batch size 1) and returns the confusion matrix summed over ranks.

    Args:
        net: the plain network (not DDP); put in eval mode here.
        mode: one of EVAL_MODES (what each measures: EVAL_MODE_TEXT).
        save_dir, palette, name_of: when given, writes each prediction as an indexed PNG named name_of(index).
        official_ids: with save_dir, write each class as this id instead (a single-channel PNG, no palette): the
            files an official evaluation reads, e.g. Cityscapes labelIds.
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"evaluation mode {mode!r} is not supported; expected one of {EVAL_MODES}")
    net.eval()
    matrix = ConfusionMatrix(num_classes, device=device)
    for images, labels, indices in tqdm(loader, desc=f"eval ({mode})", disable=not is_main, dynamic_ncols=True,
                                        leave=False):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True).long()  # uint8 through the loader
        if mode == "center":
            images, labels = center_crop(images, labels, crop_size)
            scores = _forward_logits(net, images, amp_dtype)
        elif mode == "whole":
            scores = _forward_logits(net, images, amp_dtype)
        elif mode == "served":
            scores = torch.cat([predict_served(net, img[None], num_classes, crop_size, amp_dtype) for img in images])
        elif mode == "sliding":
            scores = torch.cat([predict_sliding(net, img[None], num_classes, crop_size, amp_dtype) for img in images])
        else:
            scores = torch.cat([predict_multiscale(net, img[None], amp_dtype) for img in images])
        prediction = scores.argmax(1)
        matrix.update(labels, prediction)
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            for pred, index in zip(prediction.cpu().numpy(), indices.tolist()):
                name = name_of(index) if name_of is not None else f"{index:06d}.png"
                if official_ids is None:
                    (save_dir / name).write_bytes(palette_png(pred, palette))
                else:
                    Image.fromarray(np.asarray(official_ids, np.uint8)[pred]).save(save_dir / name)
    matrix.reduce_from_all_processes()
    return matrix
