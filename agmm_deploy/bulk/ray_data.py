"""The Ray engine: the bulk stages as a Ray Data pipeline, on a cluster or a one-machine cluster.

    from_items(paths) -> map_batches(decode, CPU tasks) -> map_batches(Segmenter, an actor pool: the runner
    loaded once per actor, num_gpus=1 each where there are GPUs) -> map_batches(write, CPU tasks) -> the driver
    (manifest rows)

Blocks hold numpy only: decoded images and label maps are (variable-shaped) uint8 tensors, paths and sentences
strings; no PIL or Python objects, which Ray's memory accounting cannot size. Images and outputs are read and
written by path, so on a cluster of several machines INPUT, OUT and the model are on a file system every node
mounts, and agmm-deploy is installed on every node.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from agmm_deploy.bulk import BulkError, Job, default_batch_size
from agmm_deploy.bulk.inputs import Input
from agmm_deploy.bulk.stages import FAILED, OK, ModelInfo, decode_input, segment_each, write_outputs

if TYPE_CHECKING:  # the decode and write workers import this module, and start faster without torch
    from agmm_deploy.runtime import Runner

# The CPU each decode/write task asks Ray for: half a core, so that tasks still run beside CPU actors that hold
# a core each on a small machine (the actors' own threads do the heavy work).
CPU_STAGE_CPUS = 0.5
# Images per decode/write task batch.
CPU_STAGE_BATCH = 8
# Model actors per node on CPUs, at most: each holds a copy of the model and its activations.
CPU_ACTORS_PER_NODE = 8
_PASSED = ("index", "path", "key", "status", "error", "height", "width")
_EMPTY_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)  # the image column of an input that failed to decode
# Ray Data's usage collection starts a thread in the driver that polls Prometheus every 10 s until the process
# exits, whenever the driver joins an existing cluster (ray.init on a new one turns usage stats off itself).
# Without a Prometheus it logs a traceback each poll, and on Python 3.11 formatting a traceback parses source
# with ast, which races with any other ast.parse in the process (CPython gh-106905): a later ONNX export in the
# same process (a notebook, a test session) fails with "SystemError: AST constructor recursion depth mismatch".
# Off unless the user sets it; RAY_DATA_USAGE_DISABLED=0 turns it back on.
USAGE_SWITCH = "RAY_DATA_USAGE_DISABLED"


def _tensors(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array of ndarrays: Ray stores it as one (variable-shaped) tensor column."""
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column


def decode_batch(batch: dict[str, np.ndarray], max_pixels: int) -> dict[str, np.ndarray]:
    """Ray task: paths -> uint8 RGB images, or the status and sentence of those that failed."""
    images, status, error, sizes = [], [], [], []
    for path, key in zip(batch["path"], batch["key"]):
        image, failure = decode_input(Input(str(path), str(key)), max_pixels)
        images.append(_EMPTY_IMAGE if image is None else image)
        status.append(OK if failure is None else failure["status"])
        error.append("" if failure is None else failure["error"])
        sizes.append((0, 0) if image is None else image.shape[:2])
    sizes = np.array(sizes, dtype=np.int32).reshape(-1, 2)
    return dict(index=batch["index"], path=batch["path"], key=batch["key"], status=np.array(status),
                error=np.array(error), height=sizes[:, 0], width=sizes[:, 1], image=_tensors(images))


class Segmenter:
    """Ray actor: loads the runner once, then label maps for batches of decoded images."""

    def __init__(self, model: str, device: str, load_kwargs: dict[str, Any], batch_size: int, overlap: float,
                 threads: int, keep_image: bool) -> None:
        import torch

        from agmm_deploy.runtime import load_runner

        torch.set_num_threads(threads)
        if Path(model).suffix.lower() == ".onnx":
            load_kwargs = {**load_kwargs, "threads": threads}
        # On a GPU actor Ray sets CUDA_VISIBLE_DEVICES to the GPU it was given: "cuda" is that one.
        self.runner = load_runner(model, device, **load_kwargs)
        self.batch_size, self.overlap, self.keep_image = batch_size, overlap, keep_image

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        status, error = batch["status"].copy(), batch["error"].astype(object)
        decoded = [i for i, s in enumerate(status) if s == OK]
        labels = [np.zeros((1, 1), dtype=np.uint8)] * len(status)
        inputs = np.zeros(len(status), dtype=np.int32)
        results = segment_each(self.runner, [batch["image"][i] for i in decoded], self.batch_size, self.overlap)
        for i, result in zip(decoded, results):
            if isinstance(result, str):
                status[i], error[i] = FAILED, result
            else:
                labels[i], inputs[i] = result
        out = {name: batch[name] for name in _PASSED}
        out.update(status=status, error=error.astype(str), labels=_tensors(labels), inputs=inputs)
        if self.keep_image:
            out["image"] = batch["image"]
        return out


def write_batch(batch: dict[str, np.ndarray], out: str, info: ModelInfo, overlay: bool,
                alpha: float) -> dict[str, np.ndarray]:
    """Ray task: writes the PNGs of a batch; returns its manifest fields (no arrays beyond the row values)."""
    fractions = np.zeros((len(batch["index"]), len(info.classes)), dtype=np.float32)
    status, error = batch["status"].astype(object), batch["error"].astype(object)
    for i, key in enumerate(batch["key"]):
        if status[i] != OK:
            continue
        fields = write_outputs(Path(out), str(key), batch["labels"][i], info,
                               image=batch["image"][i] if overlay else None, alpha=alpha)
        status[i], error[i] = fields.pop("status"), fields.pop("error")
        if status[i] == OK:
            fractions[i] = list(fields.values())
    rows = {name: batch[name] for name in ("index", "height", "width", "inputs")}
    rows.update(status=status.astype(str), error=error.astype(str))
    rows.update({name: fractions[:, k] for k, name in enumerate(info.fraction_columns())})
    return rows


def cpu_actor_plan(node_cpus: list[int]) -> tuple[int, int]:
    """(actors, threads each) for the model on nodes with these CPU counts and no GPU.

    One single-threaded actor per core, up to CPU_ACTORS_PER_NODE a node (then each takes more threads). Actors
    that do not share threads do not wait for each other: a model on two threads stalls at every parallel
    region's barrier whenever another process preempts one of them, which the decode and write tasks, the
    driver and Ray's daemons do all the time on a small node (measured: docs/benchmarks.md, "Bulk prediction").
    """
    per_node = [(cpus, min(cpus, CPU_ACTORS_PER_NODE)) for cpus in node_cpus if cpus >= 1]
    if not per_node:
        return 1, 1
    return sum(actors for _, actors in per_node), min(cpus // actors for cpus, actors in per_node)


def new_cluster_settings() -> dict[str, Any]:
    """ray.init's arguments for the one-machine cluster the engine starts itself.

    Ray runs its workers at niceness 15 so that its own daemons stay responsive. On a machine the run has to
    itself that costs the model dearly: any nice-0 process (the driver, raylet, a shell) preempts one of the
    actor's threads, and the others wait for it at each parallel region's barrier (docs/benchmarks.md, "Bulk
    prediction"). Workers here run at 0 unless RAY_worker_niceness says otherwise. The dashboard is left out (a
    second of start and a process beside the model); for it, start a cluster with `ray start --head` and pass
    --ray-address.
    """
    settings: dict[str, Any] = dict(include_dashboard=False)
    if "RAY_worker_niceness" not in os.environ:
        settings["_system_config"] = dict(worker_niceness=0)
    return settings


def run(job: Job, runner: Runner | None, info: ModelInfo, todo: list[Input],
        progress: bool = True) -> Iterator[tuple[Input, dict]]:
    """(input, row fields) for every input of ``todo``, as Ray hands the written batches back."""
    import ray

    if not todo:
        return
    os.environ.setdefault(USAGE_SWITCH, "1")
    started = not ray.is_initialized()
    if started:
        # address None: RAY_ADDRESS when set, else a new cluster on this machine that ends with this process
        # ("local": not one a `ray start` left running here, which ray.init would otherwise join).
        new_cluster = job.ray_address is None and not os.environ.get("RAY_ADDRESS")
        try:
            if new_cluster:
                ray.init(address="local", logging_level="WARNING", log_to_driver=False, **new_cluster_settings())
            else:
                ray.init(address=job.ray_address, logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise BulkError(f"cannot join the Ray cluster at {job.ray_address} ({err}); start one there with "
                            "`ray start --head`, or leave --ray-address and RAY_ADDRESS unset for a cluster on "
                            "this machine") from None
    try:
        yield from _run(job, info, todo, progress)
    finally:
        if started:
            ray.shutdown()


def _run(job: Job, info: ModelInfo, todo: list[Input], progress: bool) -> Iterator[tuple[Input, dict]]:
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = progress
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    on_gpu = job.device == "cuda" or (job.device == "auto" and gpus > 0)
    if on_gpu and gpus == 0:
        raise BulkError("--device cuda was asked for, but the Ray cluster has no GPUs "
                        f"(ray.cluster_resources(): {dict(resources)}); use --device cpu or auto")
    if on_gpu:
        actors, threads_per_actor = job.actors or gpus, 1
    elif job.actors:
        actors, threads_per_actor = job.actors, max(1, cpus // job.actors)
    else:
        actors, threads_per_actor = cpu_actor_plan([int(node["Resources"].get("CPU", 0))
                                                    for node in ray.nodes() if node["Alive"]])
    batch_size = job.batch_size or default_batch_size("cuda" if on_gpu else "cpu")
    items = [dict(index=i, path=entry.path, key=entry.key) for i, entry in enumerate(todo)]
    blocks = min(len(items), max(4 * cpus, len(items) // 64))
    # A CPU actor runs its model on threads_per_actor cores and reserves one fewer, so that the decode and write
    # tasks of a node always find a core beside the actors (else they would wait for ever on a small node).
    resource_args = dict(num_gpus=1) if on_gpu else dict(num_cpus=max(CPU_STAGE_CPUS, threads_per_actor - 1))
    dataset = (
        ray.data.from_items(items, override_num_blocks=blocks)
        .map_batches(decode_batch, fn_kwargs=dict(max_pixels=job.max_pixels), batch_size=CPU_STAGE_BATCH,
                     batch_format="numpy", num_cpus=CPU_STAGE_CPUS)
        .map_batches(Segmenter, fn_constructor_kwargs=dict(
                         model=str(Path(job.model).absolute()), device="cuda" if on_gpu else "cpu",
                         load_kwargs=job.load_kwargs, batch_size=batch_size, overlap=job.overlap,
                         threads=threads_per_actor, keep_image=job.overlay),
                     batch_size=batch_size, batch_format="numpy",
                     # A fixed pool. Ray Data restarts an actor that dies (max_restarts=-1 by default for
                     # actor pools) and runs the batches it held again (max_task_retries=-1).
                     compute=ray.data.ActorPoolStrategy(size=actors), **resource_args)
        .map_batches(write_batch, fn_kwargs=dict(out=str(Path(job.out).absolute()), info=info,
                                                 overlay=job.overlay, alpha=job.alpha),
                     batch_size=CPU_STAGE_BATCH, batch_format="numpy", num_cpus=CPU_STAGE_CPUS)
    )
    fraction_columns = info.fraction_columns()
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for i, index in enumerate(batch["index"]):
            fields = dict(status=str(batch["status"][i]), error=str(batch["error"][i]),
                          height=int(batch["height"][i]), width=int(batch["width"][i]),
                          inputs=int(batch["inputs"][i]))
            if fields["status"] == OK:
                fields.update({name: float(batch[name][i]) for name in fraction_columns})
            yield todo[int(index)], fields
