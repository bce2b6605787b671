"""Where a training run reports: one object for the log (stdout + train.log), TensorBoard, metrics.jsonl and the
progress bar. Only the main process writes files; the others log warnings to stdout.

A resumed run starts its records after the checkpoint's step: metrics.jsonl is cut back to the steps up to it
and TensorBoard purges the later events, so that the steps the run repeats appear once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from agmm_deploy.atomic import atomic_write_bytes


class WriteError(OSError):
    """A file of the run could not be written (full disk, permissions): the sentence says which and what to do."""


def write_failed(path: Path, err: BaseException) -> WriteError:
    """The WriteError for ``err`` (an OSError, or torch.save's RuntimeError on a full disk) writing ``path``."""
    text = str(err).strip()
    reason = getattr(err, "strerror", None) or (text.splitlines()[0] if text else type(err).__name__)
    try:
        stat = os.statvfs(path.parent)
        free = f"; {stat.f_bavail * stat.f_frsize / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    return WriteError(f"could not write {path} ({reason}{free}). Free space or fix permissions in {path.parent} "
                      "(or choose another --out), then run the same command with --resume auto: the last complete "
                      "checkpoint is kept")


class RunLogger:
    """The run's log, TensorBoard writer, metrics.jsonl and progress bars, behind one object.

    Args:
        out: the run folder (train.log, metrics.jsonl, tensorboard/ go there on the main process).
        is_main: whether this process writes files and shows progress bars.
        log_every: a log line every N steps; the training loop also copies losses to the host only then.
        resume_step: the checkpoint's step when resuming: later records of an earlier attempt are dropped.
    """

    def __init__(self, out: Path, *, is_main: bool, log_every: int = 10, resume_step: int | None = None) -> None:
        self.out, self.is_main, self.log_every = Path(out), is_main, log_every
        self.metrics_path = self.out / "metrics.jsonl"
        self.log = logging.getLogger("training")
        self.log.handlers.clear()
        self.log.propagate = False
        self.log.setLevel(logging.INFO if is_main else logging.WARNING)
        formatter = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
        if is_main:
            handlers.append(logging.FileHandler(self.out / "train.log"))
        for handler in handlers:
            handler.setFormatter(formatter)
            self.log.addHandler(handler)
        self.writer = None
        self._stack = ExitStack()
        if is_main:
            self._cut_metrics(resume_step)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=resume_step)

    def __enter__(self) -> "RunLogger":
        self._stack.enter_context(logging_redirect_tqdm(loggers=[self.log]))  # log lines above the bar
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        if self.writer is not None:
            self.writer.close()

    def info(self, message: str) -> None:
        self.log.info(message)

    def progress(self, iterable: Iterable, desc: str) -> tqdm:
        return tqdm(iterable, desc=desc, disable=not self.is_main, dynamic_ncols=True, leave=False)

    def steps(self, epoch: int, total_steps: int, records: list[dict[str, Any]]) -> None:
        """Writes the records of consecutive steps (each: step, lr, lr_head, loss terms) and one log line for the last.

        Called every ``log_every`` steps with the steps since the last call (the values are host floats by then).
        """
        if not (self.is_main and records):
            return
        lines = []
        for record in records:
            step, lr, lr_head = record["step"], record["lr"], record.get("lr_head")
            terms = {k: v for k, v in record.items() if k not in ("step", "lr", "lr_head")}
            for key, value in terms.items():
                self.writer.add_scalar(f"loss/{key}", value, step)
            self.writer.add_scalar("lr/backbone", lr, step)
            if lr_head is not None:
                self.writer.add_scalar("lr/head", lr_head, step)
            lines.append(json.dumps({"step": step, "epoch": epoch, "lr": lr, **terms}) + "\n")
        try:
            with open(self.metrics_path, "a") as f:
                f.writelines(lines)
        except OSError as err:
            raise write_failed(self.metrics_path, err) from err
        last = records[-1]
        terms = " ".join(f"{k}={v:.4f}" for k, v in last.items() if k not in ("step", "lr", "lr_head"))
        self.info(f"epoch {epoch} step {last['step']}/{total_steps} lr {last['lr']:.3e} {terms}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def _cut_metrics(self, resume_step: int | None) -> None:
        """Keeps the records of steps <= resume_step (all of them when the run does not resume)."""
        if resume_step is None or not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= resume_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
                continue
        if len(kept) != len(lines):
            try:
                atomic_write_bytes(self.metrics_path, "".join(kept).encode())
            except OSError as err:
                raise write_failed(self.metrics_path, err) from err
            self.info(f"resuming at step {resume_step}: dropped {len(lines) - len(kept)} later record(s) of the "
                      f"interrupted run from {self.metrics_path}")
