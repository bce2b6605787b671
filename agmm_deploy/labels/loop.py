"""One round of the labelling loop: a Label Studio project's annotations -> fine-tuned, exported, checked model.

    result = train_from_label_studio("http://127.0.0.1:8080", api_key, project=7, out=Path("runs/ls/round1"),
                                     start=Path("runs/mine/last.pt"))

=============  ===================================================================================
out/export.json   the project's JSON export (Label Studio's export API), annotated tasks only
out/images/       each annotated task's image, read as the ML backend reads them (label_studio_api)
out/data/         the folder data set (agmm-labels import: clicks, scribbles, brush masks, polygons)
out/start.pt      with ``start``: its weights and optimiser, the schedule reset, to fine-tune from
out/run/          ``python -m training.run --dataset folder`` (AGMM loss), last.pt
out/model/        ``agmm-export`` of last.pt with parity on the imported images: model.onnx, parity.json
out/ready.json    written last, only when parity passed: {"model", "model_version", "checkpoint"}
=============  ===================================================================================

Training and export run as subprocesses (this package imports neither training/ nor serving/), their log lines
(step, epoch, loss) passed through. The ML backend hands ``ready.json``'s model to the service.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from agmm_deploy.atomic import atomic_write_bytes
from agmm_deploy.labels import label_studio
from agmm_deploy.labels.annotations import LabelsError
from agmm_deploy.labels.dataset import import_labels
from agmm_deploy.labels.label_studio_api import ImageSources, export_tasks, image_source, read_source

READY_FILE = "ready.json"
MAX_IMAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class LoopResult:
    """What a round wrote: the new model (an agmm-export folder's model.onnx), its version, and its sources."""

    out: Path
    model: Path
    model_version: str
    checkpoint: Path
    data_root: Path
    images: int


def _task_url(task: dict) -> str:
    data = task.get("data", {}) if isinstance(task, dict) else {}
    return data.get("image") or next((v for v in data.values() if isinstance(v, str)), "")


def fetch_task_images(tasks: list[dict], url: str, api_key: str | None, folder: Path,
                      timeout_s: float = 60.0) -> list[Path]:
    """Reads the image of every task with an annotation into ``folder`` under the name the importer looks for."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task in tasks:
        if not any(not a.get("was_cancelled") for a in task.get("annotations", [])):
            continue
        task_url = _task_url(task)
        try:
            data = read_source(image_source(task_url, ImageSources(url)), api_key, MAX_IMAGE_BYTES, timeout_s)
        except LabelsError as err:
            raise LabelsError(f"task {task.get('id')}: {err}") from None
        path = folder / Path(label_studio.image_name(task_url)).name
        atomic_write_bytes(path, data)
        written.append(path)
    return written


def fine_tune_start(checkpoint: Path, out: Path) -> tuple[Path, list[str], tuple[str, ...]]:
    """A checkpoint with ``checkpoint``'s weights and optimiser but epoch, step and schedule at zero, so that
    ``training.run --resume`` fine-tunes from it; the flags that rebuild its model; its class names."""
    from agmm_deploy.checkpoint import CheckpointError, atomic_torch_save, read_checkpoint

    try:
        state = read_checkpoint(checkpoint)
    except CheckpointError as err:
        raise LabelsError(f"--from: {err}") from None
    if "model_config" not in state or "optimizer" not in state:
        raise LabelsError(f"--from {checkpoint} is not a checkpoint written by training.run (it lacks the model "
                          "config or the optimiser); pass the last.pt of a run")
    for group in state["optimizer"]["param_groups"]:
        group["lr"] = group.get("initial_lr", group["lr"])
    scheduler = state.get("scheduler") or {}
    scheduler.update(last_epoch=0, _step_count=1)
    if "base_lrs" in scheduler:
        scheduler["_last_lr"] = list(scheduler["base_lrs"])
    state.update(epoch=-1, step=0, best_miou=float("-inf"), scheduler=scheduler, scaler=None)
    path = atomic_torch_save(state, out / "start.pt")
    config = state["model_config"]
    flags = ["--backbone", config["backbone"], "--stem", config["stem"], "--output-stride",
             str(config["output_stride"]), "--crop-size", str(max(state["meta"]["input_size"]))]
    return path, flags, tuple(state["meta"]["classes"])


def _run(argv: list[str], what: str, log: Callable[[str], None]) -> int:
    """Runs a step as a subprocess, passing its lines through ``log``; its exit code."""
    log(f"agmm-labels train: {what}: {' '.join(argv)}")
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        for line in process.stdout:
            log(line.rstrip("\n"))
    return process.returncode


def train_from_label_studio(url: str, api_key: str | None, project: int, out: Path, start: Path | None = None,
                            classes: tuple[str, ...] | None = None, train_args: Sequence[str] = (),
                            export_args: Sequence[str] = (),
                            log: Callable[[str], None] = print) -> LoopResult:
    """Pulls a project's annotations, imports them, fine-tunes with the AGMM loss, exports with parity.

    Args:
        url, api_key: the Label Studio server and its API token (LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY).
        project: the project id.
        out: the round's folder (created; must not hold an earlier round's export.json).
        start: a training.run checkpoint to fine-tune from (the served model's); None trains a new model.
        classes: the class names fixing the ids (the served model's); default: start's, else the labels in
            order of first use.
        train_args, export_args: more flags for ``training.run`` / ``agmm-export`` (e.g. --max-steps 200).
        log: receives every progress line.
    Returns:
        LoopResult; ``out/ready.json`` is written last, only when parity passed.
    Raises:
        LabelsError: one sentence: nothing annotated, an image outside the server, training or parity failed.
    """
    out = Path(out)
    if (out / "export.json").exists():
        raise LabelsError(f"--out {out} already holds a round (export.json); choose a new folder for this one")
    out.mkdir(parents=True, exist_ok=True)
    tasks = export_tasks(url, api_key, project)
    annotated = [t for t in tasks if any(not a.get("was_cancelled") for a in t.get("annotations", []))]
    if not annotated:
        raise LabelsError(f"project {project} on {url} has {len(tasks)} task(s) and none annotated; click or paint "
                          "some labels in Label Studio first")
    atomic_write_bytes(out / "export.json", json.dumps(annotated).encode("utf-8"))
    log(f"agmm-labels train: project {project}: {len(annotated)} annotated task(s) of {len(tasks)} exported")
    fetch_task_images(annotated, url, api_key, out / "images")

    flags = []
    if start is not None:
        resume, flags, trained = fine_tune_start(Path(start), out)
        if classes is not None and tuple(classes) != trained:
            raise LabelsError(f"--from {start} was trained on classes {list(trained)}, not {list(classes)}; "
                              "fine-tuning keeps a model's classes")
        classes = trained
        flags += ["--resume", str(resume)]
    summary = import_labels(label_studio.read(out / "export.json"), out / "images", out / "data", classes)
    log(f"agmm-labels train: imported {len(summary.images)} image(s), classes {', '.join(summary.classes)}")

    python = sys.executable
    run = out / "run"
    code = _run([python, "-m", "training.run", "--dataset", "folder", "--data-root", str(out / "data"),
                 "--out", str(run), *flags, *train_args], "training", log)
    checkpoint = run / "last.pt"
    if code != 0 or not checkpoint.is_file():
        raise LabelsError(f"training exited with code {code} (log above, and {run}); the served model is unchanged")
    model_dir = out / "model"
    code = _run([python, "-m", "agmm_deploy.cli.export", str(checkpoint), "--out", str(model_dir),
                 "--parity-images", str(out / "data" / "train" / "images"), *export_args], "export with parity", log)
    model = model_dir / "model.onnx"
    if code != 0 or not model.is_file():
        raise LabelsError(f"agmm-export exited with code {code} ({'parity failed' if code == 1 else 'see above'}); "
                          "the new model is not handed to the service, which keeps serving the old one")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()[:8]
    version = f"project{project}-{time.strftime('%Y%m%d-%H%M%S')}-{digest}"
    result = LoopResult(out, model, version, checkpoint, out / "data", len(summary.images))
    ready = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
    atomic_write_bytes(out / READY_FILE, json.dumps(ready, indent=1).encode("utf-8"))
    log(f"agmm-labels train: new model {model} ({version}); parity passed")
    return result
