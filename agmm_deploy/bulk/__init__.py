"""Bulk prediction: label maps for a tree of images (files, folders, manifests) with one of the engines below.

    ========  ===================================================================  =========================
    engine    how it runs                                                          install
    ========  ===================================================================  =========================
    local     one process: decoding and PNG encoding on a thread pool while the   included
              model runs batches of model inputs of many images
    ray       Ray Data on a cluster (or a one-machine cluster): CPU decode tasks   pip install
              -> an actor pool loading the runner once per actor -> CPU writers    'agmm-deploy[ray]'
    ========  ===================================================================  =========================

    result = predict_images("model.onnx", ["photos/"], "labels/", engine="local")
    print(result.summary())

Outputs mirror the inputs (``OUT/<relative path without suffix>.png``, see ``bulk.inputs``), every file is
written atomically, ``OUT/manifest.parquet`` has a row per input (see ``bulk.manifest``), and a rerun of the
same call skips the inputs already complete.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from agmm_deploy.atomic import sweep_temporaries
from agmm_deploy.bulk.inputs import Input, InputError, collect_inputs
from agmm_deploy.bulk.stages import FAILED, OK, SKIPPED, ModelInfo
from agmm_deploy.transforms import DEFAULT_MAX_PIXELS, SLIDING_OVERLAP


@dataclass(frozen=True)
class Engine:
    """One row of the engine table: a module defining ``run(job, runner, info, todo, progress)``, which yields
    (input, row fields) for every input of ``todo`` as it is written or fails."""

    name: str
    module: str
    requires: str | None  # the package it imports, None when always there
    install: str

    def missing(self) -> str | None:
        if self.requires is None or importlib.util.find_spec(self.requires) is not None:
            return None
        return f"the {self.name} engine needs {self.requires}: {self.install}"


ENGINES: tuple[Engine, ...] = (
    Engine(name="local", module="agmm_deploy.bulk.local", requires=None, install="included"),
    Engine(name="ray", module="agmm_deploy.bulk.ray_data", requires="ray", install="pip install 'agmm-deploy[ray]'"),
)


def get_engine(name: str) -> Engine:
    for engine in ENGINES:
        if engine.name == name:
            return engine
    raise ValueError(f"unknown engine {name!r}; expected one of {', '.join(e.name for e in ENGINES)}")


@dataclass(frozen=True)
class Job:
    """Everything a bulk run was asked for, resolved once; engines read it, never argv.

    Attributes:
        model: the artifact (any file the runtime table reads).
        out: the output folder.
        device: auto | cpu | cuda (the Ray engine: where each actor runs; auto = a GPU per actor where there are).
        batch_size: model inputs per model call; None: 16 on a GPU, 8 on a CPU, as the service derives it.
        overlap: sliding-window overlap for images larger than the model input.
        overlay: also write ``<key>_overlay.png``.
        alpha: opacity of the overlay's colours.
        max_pixels: larger images are failed rows (checked from the header, before decoding).
        workers: decode/encode threads of the local engine (None: the CPU count).
        ray_address: the Ray cluster (None: RAY_ADDRESS, else a new one-machine cluster).
        actors: model actors of the Ray engine (None: one per GPU, else ray_data.cpu_actor_plan's).
        load_kwargs: passed to load_runner (raw state dicts: backbone=, num_classes=, dataset=, classes=).
    """

    model: Path
    out: Path
    device: str = "auto"
    batch_size: int | None = None
    overlap: float = SLIDING_OVERLAP
    overlay: bool = False
    alpha: float = 0.5
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int | None = None
    ray_address: str | None = None
    actors: int | None = None
    load_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class BulkResult:
    """What a run did. ``failures`` are "path: sentence" for failed and skipped inputs (and the manifest, when it
    could not be written)."""

    total: int
    written: int
    resumed: int  # complete from an earlier run, not recomputed
    failed: int
    skipped: int
    wall_s: float
    manifest: Path
    failures: list[str]

    @property
    def images_per_s(self) -> float:
        return self.written / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.total} image(s): {self.written} written, {self.resumed} already complete (skipped), "
                f"{self.failed} failed, {self.skipped} unreadable; {self.images_per_s:.2f} images/s, "
                f"{self.wall_s:.1f} s wall; manifest {self.manifest}")


class BulkError(ValueError):
    """The model, the inputs or --out cannot make a run; raised before any image is read."""


def default_batch_size(device: str) -> int:
    """Model inputs per call when not given: 16 on a GPU (batching buys throughput there), 8 on a CPU."""
    return 16 if device == "cuda" else 8


def check_writable(out: Path) -> None:
    """Creates ``out`` and a file in it, or raises BulkError saying why not (read-only, no permission, a file)."""
    if out.exists() and not out.is_dir():
        raise BulkError(f"--out {out} is a file; expected a folder (it is created when missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".agmm-write-check.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise BulkError(f"--out {out} cannot be written ({err.strerror or err}); choose a folder you can write, "
                        "with room for a PNG per image") from None


# Held (flock) by the run writing to a folder: a second run on the same --out is refused rather than interleaved,
# and the first may sweep the temporary files a killed run left, none of them being a live writer's.
LOCK_NAME = ".agmm-bulk.lock"


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Holds ``OUT/.agmm-bulk.lock`` while the block runs, or raises BulkError naming the run that holds it.

    The file is removed when the block ends (a killed run leaves it, and the next run takes it over). A run
    that opened the file just before another removed it would lock a file no longer there, so the lock counts
    only once the path still leads to the file locked.
    """
    import fcntl

    path = out / LOCK_NAME
    while True:
        f = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that did not say which"
            f.close()
            raise BulkError(f"another run is writing to --out {out} ({holder}); wait for it to end, or give this "
                            "one another --out") from None
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # removed by the run that just ended: lock the new one
    with f:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield  # a killed process's lock goes with its files; the file stays for the next run
        finally:
            path.unlink(missing_ok=True)  # while still locked: no run can take the lock of a removed file


def _load_model(job: Job, engine: str) -> tuple[Any, ModelInfo, str]:
    """(runner or None, ModelInfo, a line describing it), or BulkError for a model that cannot be used.

    The driver loads the model too: a broken model is refused here, before any work, and its metadata names the
    manifest's columns. For the Ray engine, whose actors load their own, it loads on the CPU; an artifact that
    runs on CUDA only (a TensorRT engine) is read for its metadata, as the driver may have no GPU.
    """
    from agmm_deploy.checkpoint import CheckpointError
    from agmm_deploy.runtime import backend_for, load_runner

    try:
        if engine != "ray":
            runner = load_runner(job.model, job.device, **job.load_kwargs)
            return runner, ModelInfo.of(runner), repr(runner)
        backend = backend_for(job.model)
        if "cpu" in backend.devices:
            runner = load_runner(job.model, "cpu", **job.load_kwargs)
            info = ModelInfo.of(runner)
            del runner  # the actors hold the model; the driver only needed its metadata
        else:
            if not job.model.is_file():
                raise FileNotFoundError(f"model {job.model} does not exist")
            meta, fields = backend.read_metadata(job.model)
            info = ModelInfo(job.model.name, str(fields.get("precision", "fp32")), tuple(meta.classes),
                             tuple(tuple(c) for c in meta.palette))
        return None, info, f"{job.model.name} ({backend.name}, {info.precision}, {len(info.classes)} classes)"
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        raise BulkError(str(err)) from None


def predict_images(model: str | Path, inputs: list[str | Path], out: str | Path, *, engine: str = "local",
                   progress: bool = True, on_start: Callable[[str], None] | None = None, **settings: Any) -> BulkResult:
    """Label maps (and a manifest) for every image of ``inputs`` under ``out``, with the engine named.

    Args:
        model: any artifact the runtime table reads.
        inputs: image files, folders (recursive) and manifests (.txt, .csv or .parquet with a ``path`` column).
        out: the output folder.
        engine: a name of ``ENGINES``.
        progress: show progress bars.
        on_start: called with one line describing the run, once the model is loaded.
        settings: the fields of ``Job`` (device, batch_size, overlap, overlay, ...).
    Returns:
        BulkResult; failed and unreadable inputs are in it and in the manifest, never raised.
    Raises:
        BulkError: unusable model, inputs or output folder, before any image is read.
    """
    from agmm_deploy.bulk.manifest import completed_rows

    if "://" in str(out):
        raise BulkError(f"--out {out} is a URI; outputs go to a local folder or one every node mounts (inputs may "
                        "be URIs), then copy them up, e.g. `aws s3 sync OUT s3://...`")
    job = Job(model=Path(model), out=Path(out), **settings)
    chosen = get_engine(engine)
    if (why := chosen.missing()) is not None:
        raise BulkError(why)
    if not 0 <= job.overlap < 1:
        raise BulkError(f"overlap={job.overlap} is invalid; expected 0 <= overlap < 1 (the official value is 2/3)")
    try:
        entries = collect_inputs(list(inputs))
    except InputError as err:
        raise BulkError(str(err)) from None
    check_writable(job.out)
    with run_lock(job.out):
        swept = sweep_temporaries(job.out)
        runner, info, described = _load_model(job, engine)
        done = completed_rows(job.out, entries, info, job.overlay)
        todo = [entry for entry in entries if entry.path not in done]
        if on_start is not None:
            on_start(f"{described}; {len(entries)} image(s) -> {job.out} with the {engine} engine; "
                     f"{len(done)} already complete from an earlier run, skipped"
                     + (f"; {swept} temporary file(s) of a killed run removed" if swept else ""))
        return _run(job, chosen, runner, info, entries, done, todo, progress)


def _run(job: Job, chosen: Engine, runner: Any, info: ModelInfo, entries: list[Input], done: dict[str, dict],
         todo: list[Input], progress: bool) -> BulkResult:
    from agmm_deploy.bulk.manifest import ManifestWriter, manifest_row

    writer = ManifestWriter(job.out, info, kept=list(done.values()))
    counts = {OK: 0, FAILED: 0, SKIPPED: 0}
    failures: list[str] = []
    start = time.perf_counter()
    rows: Iterator[tuple[Input, dict]] = importlib.import_module(chosen.module).run(
        job, runner, info, todo, progress)
    try:
        for entry, fields in rows:
            row = manifest_row(entry, info, fields)
            writer.add(row)
            counts[row["status"]] += 1
            if row["status"] != OK:
                failures.append(f"{entry.path}: {row['error']}")
    finally:
        writer.flush()
    wall_s = time.perf_counter() - start
    try:
        manifest = writer.close(entries)
    except OSError as err:
        manifest = job.out / "manifest.parquet"
        failures.append(f"{manifest}: could not be written ({err.strerror or err}); free space and rerun the same "
                        "command, which finds the written images complete")
    return BulkResult(total=len(entries), written=counts[OK], resumed=len(done), failed=counts[FAILED],
                      skipped=counts[SKIPPED], wall_s=wall_s, manifest=manifest, failures=failures)


__all__ = ["BulkError", "BulkResult", "ENGINES", "Engine", "Job", "check_writable", "default_batch_size",
           "get_engine", "predict_images", "run_lock"]
