"""The runtimes that run an artifact, in one table: ask it, never keep a suffix list elsewhere.

Each row names a backend, the file suffixes it reads, the devices and precisions it runs, the module that
loads it and the extra that installs it. The module (one file per backend, imported only when used) defines
``load(path, device, **kwargs) -> Runner`` and ``missing(device) -> str | None`` (why it cannot run here, or
None), and, where its artifacts carry metadata, ``read_metadata(path) -> (ModelMeta, fields)`` (read without
loading the model). Adding a runtime is one new file plus one row.

A runtime that lives outside this package (a plug-in, a test double) adds its row without editing this file:
``AGMM_EXTRA_BACKENDS="my_package.my_runtime:ROW"`` (comma-separated ``module[:attribute]`` entries, the
attribute ``ROW`` by default, each a ``Backend``) is read by ``backends()`` at call time, so the CLIs and a `bentoml serve` started with that
variable in its environment all see the row.

    runner = load_runner("model.onnx")          # the row whose suffixes match, on CUDA when available
    logits = runner.run(images)                 # torch (N, 3, H, W) in, (N, K, H, W) out on runner.device
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from agmm_deploy.runtime.base import DEFAULT_MAX_BATCH, DEVICES, Runner, resolve_device


@dataclass(frozen=True)
class Backend:
    """One row of the runtime table.

    Attributes:
        name: what users type and tables print (the runner's ``backend`` adds the device, e.g. onnxruntime-cpu).
        artifact: what the file is, for messages.
        suffixes: file suffixes it reads, lower case with the dot.
        devices: where it can run (cpu, cuda).
        precisions: the precisions its artifacts may carry.
        module: the module defining ``load`` and ``missing``.
        install: how to get it, for messages.
        load_options: the keyword options its ``load`` takes besides path and device (callers pass only these).
        torch_threads: whether the model runs on torch's intra-op thread pool (PyTorch eager, AOTInductor), so
            that a caller must leave torch's threads to it; the others run on their runtime's own pool.
    """

    name: str
    artifact: str
    suffixes: tuple[str, ...]
    devices: tuple[str, ...]
    precisions: tuple[str, ...]
    module: str
    install: str
    load_options: tuple[str, ...] = ()
    torch_threads: bool = False

    def loader(self) -> ModuleType:
        return importlib.import_module(self.module)

    def missing(self, device: str = "auto") -> str | None:
        """None when this backend can run on ``device`` here, else one clause saying what is missing."""
        if device != "auto" and device not in self.devices:
            return f"{self.name} runs on {'/'.join(self.devices)}, not {device}"
        return self.loader().missing(device)

    def read_metadata(self, path: str | Path) -> tuple[Any, dict[str, Any]] | None:
        """The artifact's (ModelMeta, fields) without loading the model; None where the backend's module has no
        ``read_metadata`` (checkpoints, whose precision is fp32). Raises what the reader raises (OSError,
        ValueError) for a foreign or broken file."""
        reader = getattr(self.loader(), "read_metadata", None)
        return reader(path) if reader is not None else None


BACKENDS: tuple[Backend, ...] = (
    Backend("pytorch", "checkpoint", (".pt", ".pth", ".ckpt"), ("cpu", "cuda"), ("fp32",),
            "agmm_deploy.runtime.pytorch", "included",
            load_options=("backbone", "num_classes", "dataset", "classes", "max_batch"), torch_threads=True),
    Backend("onnxruntime", "ONNX model", (".onnx",), ("cpu", "cuda"), ("fp32", "tf32", "fp16", "int8"),
            "agmm_deploy.runtime.ort", "pip install onnxruntime-gpu (included)",
            load_options=("threads", "mem_pattern")),
    Backend("tensorrt", "TensorRT engine", (".engine", ".plan", ".trt"), ("cuda",), ("fp32", "fp16", "int8"),
            "agmm_deploy.runtime.trt", "pip install 'agmm-deploy[trt]' on a machine with an NVIDIA GPU"),
    Backend("openvino", "OpenVINO IR", (".xml",), ("cpu",), ("fp32", "bf16", "int8"),
            "agmm_deploy.runtime.openvino", "pip install 'agmm-deploy[openvino]'", load_options=("threads",)),
    Backend("aoti", "AOTInductor package", (".pt2",), ("cpu", "cuda"), ("fp32", "fp16", "bf16"),
            "agmm_deploy.runtime.aoti", "included (torch)", torch_threads=True),
)


EXTRA_BACKENDS_ENV = "AGMM_EXTRA_BACKENDS"


def backends() -> tuple[Backend, ...]:
    """The runtime table: BACKENDS plus the rows named by AGMM_EXTRA_BACKENDS (read at call time)."""
    return BACKENDS + extra_backends(os.environ.get(EXTRA_BACKENDS_ENV, ""))


@functools.lru_cache(maxsize=8)
def extra_backends(spec: str) -> tuple[Backend, ...]:
    """The rows named by ``spec``: comma-separated ``module[:attribute]`` entries (default ROW), each a Backend.

    A row whose name or suffix another row already has is refused: a suffix must name one runtime.
    """
    rows: list[Backend] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        module_name, _, attribute = entry.partition(":")
        try:
            row = getattr(importlib.import_module(module_name), attribute or "ROW")
        except (ImportError, AttributeError) as err:
            raise ValueError(f"{EXTRA_BACKENDS_ENV} entry {entry!r} cannot be loaded ({err}); expected "
                             "module:ATTRIBUTE naming a Backend row on the Python path") from None
        if not isinstance(row, Backend):
            raise ValueError(f"{EXTRA_BACKENDS_ENV} entry {entry!r} is a {type(row).__name__}; expected an "
                             "agmm_deploy.runtime.Backend")
        for other in BACKENDS + tuple(rows):
            shared = set(row.suffixes) & set(other.suffixes)
            if row.name == other.name or shared:
                clash = f"the name {row.name!r}" if row.name == other.name else f"suffix {sorted(shared)[0]}"
                raise ValueError(f"{EXTRA_BACKENDS_ENV} entry {entry!r} has {clash}, which backend "
                                 f"{other.name!r} already has; give it its own name and suffixes")
        rows.append(row)
    return tuple(rows)


def get_backend(name: str) -> Backend:
    """The row named ``name``; an unknown name is refused with the known ones listed."""
    for backend in backends():
        if backend.name == name:
            return backend
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(b.name for b in backends())}")


def model_suffixes() -> tuple[str, ...]:
    """Every file suffix some backend reads, in table order."""
    return tuple(s for backend in backends() for s in backend.suffixes)


def describe_suffixes() -> str:
    """e.g. 'a checkpoint (.pt/.pth/.ckpt), an ONNX model (.onnx) or a TensorRT engine (.engine/.plan/.trt)'."""
    parts = [f"a {b.artifact} ({'/'.join(b.suffixes)})" for b in backends()]
    return ", ".join(parts[:-1]) + f" or {parts[-1]}" if len(parts) > 1 else parts[0]


def backend_for(path: str | Path) -> Backend:
    """The row whose suffixes match the file; an unknown suffix is refused with the known ones listed."""
    suffix = Path(path).suffix.lower()
    for backend in backends():
        if suffix in backend.suffixes:
            return backend
    raise ValueError(f"cannot tell the format of {path} from its suffix {suffix!r}; expected "
                     f"{describe_suffixes()}")


def load_runner(path: str | Path, device: str = "auto", **kwargs: Any) -> Runner:
    """The runner for an artifact, chosen by its suffix from the runtime table.

    Args:
        device: auto (CUDA when available) | cpu | cuda.
        kwargs: passed to the backend's loader: for checkpoints backbone=, num_classes=, dataset=, classes= (raw
            official state dicts), max_batch=; for ONNX threads=, mem_pattern=.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model {path} does not exist{' (it is a folder)' if path.is_dir() else ''}; "
                                f"expected {describe_suffixes()}")
    backend = backend_for(path)
    if device == "auto" and "cuda" not in backend.devices:
        device = "cpu"  # auto means CUDA when available *and* the backend runs there
    elif device not in ("auto", *backend.devices):
        raise ValueError(f"{path.name} is a {backend.artifact}, which {backend.name} runs on "
                         f"{'/'.join(backend.devices)} only; got device={device!r}")
    return backend.loader().load(path, device, **kwargs)


__all__ = ["Backend", "BACKENDS", "DEFAULT_MAX_BATCH", "DEVICES", "EXTRA_BACKENDS_ENV", "Runner", "backend_for",
           "backends", "describe_suffixes", "extra_backends", "get_backend", "load_runner", "model_suffixes",
           "resolve_device"]
