"""A serialized TensorRT engine (TensorRT >= 10 API), executed with torch CUDA tensors as its I/O buffers.

TensorRT is an optional extra (``pip install 'agmm-deploy[trt]'``) and needs a CUDA GPU; it is imported only
inside these functions. ``tensorrt_missing()`` says in one sentence what is missing on a machine without them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from agmm_deploy.contract import read_engine_sidecar
from agmm_deploy.runtime.base import Runner


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message is one sentence saying which."""


def tensorrt_missing(what: str = "--trt") -> str | None:
    """None when engines can be built and run here, else one clause naming what is missing (no final period)."""
    has_trt = importlib.util.find_spec("tensorrt") is not None
    has_cuda = torch.cuda.is_available()
    if has_trt and has_cuda:
        return None
    if not has_trt and not has_cuda:
        return (f"{what} needs TensorRT and a CUDA GPU, and this machine has neither (the tensorrt package is not "
                "installed and torch.cuda.is_available() is False)")
    if not has_trt:
        return f"{what} needs the tensorrt package, which is not installed (pip install 'agmm-deploy[trt]')"
    return f"{what} needs a CUDA GPU, and torch.cuda.is_available() is False on this machine"


def missing(device: str) -> str | None:
    """None when an engine can run here on ``device``, else one clause naming what is missing."""
    if device == "cpu":
        return "a TensorRT engine cannot run on device='cpu'"
    return tensorrt_missing("running a TensorRT engine")


def import_tensorrt() -> Any:
    """``import tensorrt`` with a one-sentence error when it is not installed."""
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTUnavailable("TensorRT is not installed; pip install 'agmm-deploy[trt]' on a machine with an "
                                  "NVIDIA GPU.") from err
    return tensorrt


class TensorRTRunner(Runner):
    """A serialized TensorRT engine with its ``<engine>.json`` sidecar; logits stay on the GPU."""

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        name = Path(path).name
        reason = (f"{name} is a TensorRT engine, which cannot run on device='cpu'" if device == "cpu"
                  else tensorrt_missing(f"running the TensorRT engine {name}"))
        if reason:
            raise TensorRTUnavailable(reason + ".")
        trt = import_tensorrt()
        self.path = Path(path)
        self.meta, self.fields = read_engine_sidecar(self.path)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {self.path}; engines only run with the TensorRT "
                               "version and GPU model that built them. Rebuild it with agmm-export --trt.")
        self.context = self.engine.create_execution_context()
        self.backend = "tensorrt"
        self.precision = self.fields.get("precision", "fp32")
        self.input_size = tuple(self.meta.input_size)
        self.dynamic_hw = bool(self.fields.get("dynamic_hw", False))
        self.max_batch = int(self.fields.get("max_batch") or 1)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = [n for n in names if n != self.input_name]
        pairs = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64,
                 "UINT8": torch.uint8, "INT8": torch.int8, "BOOL": torch.bool}
        self._torch_dtype = {getattr(trt.DataType, name): dtype for name, dtype in pairs.items()
                             if hasattr(trt.DataType, name)}

    def check_input(self, images: torch.Tensor) -> torch.Tensor:
        images = super().check_input(images)
        profile = self.fields.get("profile")
        if profile and self.dynamic_hw:
            (_, _, min_h, min_w), (_, _, max_h, max_w) = profile["min"], profile["max"]
            h, w = images.shape[2:]
            if not (min_h <= h <= max_h and min_w <= w <= max_w):
                raise ValueError(f"{self.path.name} was built for {min_h}..{max_h} x {min_w}..{max_w} inputs; got "
                                 f"{h}x{w}. Tile or resize the image, or rebuild with other --dynamic-hw bounds.")
        return images

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        # The engine runs on its own stream, after what the current stream has queued (the input's copy).
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            x = images.to(self.device, non_blocking=True).contiguous()
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = self._torch_dtype[self.engine.get_tensor_dtype(name)]
                outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to execute {self.path.name} on input {tuple(x.shape)}")
            logits = outputs["logits"].float()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return logits


load = TensorRTRunner
read_metadata = read_engine_sidecar
