"""Where a resumed run continues: which flags it may change, and its step and position in the epoch.

    the same command with --resume auto                -> the next batch after the checkpoint's step, same losses
    a flag of CHANGEABLE given anew (--lr 0.002)        -> used from the checkpoint's step on; one log line says so
    any other setting that shapes the weights           -> refused: drop the flag, or train anew in another --out
    another process count at the same global batch     -> the same step and the same place in the epoch's order
    another global batch (processes x --batch-size)    -> refused, naming the --batch-size that keeps it
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training.config import ConfigError, TrainConfig

# Settings a resumed run may change: they act from the checkpoint's step on (the poly schedule is recomputed from
# the new base rate and the new total of steps); each change is said in the log.
CHANGEABLE = ("lr", "head_lr_mult", "momentum", "weight_decay", "poly_power", "epochs", "max_steps", "amp",
              "memory_format")
# Settings that shape nothing of the weights (where things are, what is logged and evaluated, how fast), used as
# given; the weights come from the checkpoint, so --pretrained is not read.
INCIDENTAL = ("data_root", "out", "workers", "device", "eval_mode", "eval_every", "table_every", "max_val_images",
              "log_every", "save_every", "resume", "pretrained")
# The global batch is checked with the process count (resume_point): the per-process --batch-size may change.
GLOBAL_BATCH = ("batch_size",)


@dataclass(frozen=True)
class ResumePoint:
    """Where training continues: the epoch, the position in its order (images already trained on) and the step."""

    epoch: int
    start_image: int
    step: int


def resume_changes(saved: dict[str, Any], cfg: TrainConfig, source: str) -> list[str]:
    """The log lines for the CHANGEABLE settings that differ from the checkpoint's run; a ConfigError naming the
    others that differ.

    Args:
        saved: the checkpoint's ``args`` (TrainConfig.to_dict() of the run that wrote it).
        cfg: this run's resolved settings.
        source: the checkpoint, for the messages.
    """
    current = cfg.to_dict()
    differ = {k: (saved[k], v) for k, v in current.items() if k in saved and _plain(saved[k]) != _plain(v)}
    refused = {k: pair for k, pair in differ.items() if k not in CHANGEABLE + INCIDENTAL + GLOBAL_BATCH}
    if refused:
        listed = "; ".join(f"{_flag(k)} {new!r} (the checkpoint's run: {old!r})" for k, (old, new) in refused.items())
        raise ConfigError(f"--resume {source} continues a run whose settings shape its weights, but this command "
                          f"changes {listed}. Drop those flags to continue it, or train a new run in another --out")
    return [f"{_flag(k)} {new!r} differs from the checkpoint's {old!r}: using {new!r} from its step on"
            for k, (old, new) in differ.items() if k in CHANGEABLE]


def resume_point(ckpt: dict[str, Any], source: str, world_size: int, batch_size: int) -> tuple[ResumePoint, str | None]:
    """The ResumePoint of checkpoint ``ckpt`` for a run of ``world_size`` processes x ``batch_size``, and the log
    line saying how the schedule is mapped when the process count changed (else None).

    Step and poly schedule count optimiser steps of a global batch (processes x --batch-size); the epoch's position
    counts images of its order (training.data.EpochSampler). Both carry over when the global batch is the same;
    another global batch is refused with the --batch-size that keeps it.
    """
    step = int(ckpt["step"])
    saved_world = int(ckpt.get("world_size", world_size))  # checkpoints of before the field: this run's
    saved_batch = int(ckpt.get("args", {}).get("batch_size", batch_size))
    saved_global, new_global = saved_world * saved_batch, world_size * batch_size
    if saved_global != new_global:
        fits = (f"--batch-size {saved_global // world_size}" if saved_global % world_size == 0 else
                f"a process count that divides {saved_global}")
        raise ConfigError(f"--resume {source} was trained with {saved_world} process(es) x --batch-size "
                          f"{saved_batch} = {saved_global} images per step, this run has {world_size} x {batch_size} "
                          f"= {new_global}; its step {step} and LR schedule count steps of {saved_global} images. "
                          f"Use {fits} to continue it")
    if ckpt.get("mid_epoch"):
        point = ResumePoint(epoch=int(ckpt["epoch"]), start_image=int(ckpt["epoch_images"]), step=step)
    else:
        point = ResumePoint(epoch=int(ckpt["epoch"]) + 1, start_image=0, step=step)
    note = None
    if saved_world != world_size:
        note = (f"the checkpoint was written by {saved_world} process(es) x --batch-size {saved_batch}; these "
                f"{world_size} x {batch_size} train the same {new_global} images per step, so the LR schedule "
                f"continues at step {step} and epoch {point.epoch} at image {point.start_image} of its order, "
                "each rank taking a disjoint shard of the rest")
    return point, note


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
