"""OpenVINO on an IR (.xml + .bin) written by agmm-export: the CPU plugin, at the inference precision the export
recorded (bf16, or f32 for what an int8 model leaves unquantised); ``inference_precision`` says what the
compiled model really reports.

OpenVINO is an optional extra (``pip install 'agmm-deploy[openvino]'``), imported only here.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import torch

from agmm_deploy.contract import read_openvino_metadata
from agmm_deploy.runtime.base import DEFAULT_MAX_BATCH, Runner, resolve_device

INSTALL = "pip install 'agmm-deploy[openvino]'"


def missing(device: str) -> str | None:
    """None when OpenVINO can run here on ``device``, else one clause naming what is missing."""
    if device == "cuda":
        return "OpenVINO artifacts run on the CPU only"
    if importlib.util.find_spec("openvino") is None:
        return f"OpenVINO is not installed ({INSTALL})"
    return None


def cpu_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin says this CPU computes natively, e.g. ('FP32', 'INT8', 'BF16', ...)."""
    import openvino as ov

    return tuple(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def bf16_missing() -> str | None:
    """None when this CPU runs bf16 natively (AVX-512 BF16 or AMX), else one clause saying it does not.

    Without native support OpenVINO quietly compiles a bf16 hint as f32: we refuse instead of running fp32
    under a bf16 label.
    """
    reason = missing("cpu")
    if reason:
        return reason
    capabilities = cpu_capabilities()
    if "BF16" in capabilities:
        return None
    return (f"this CPU has no native bf16 (OpenVINO reports OPTIMIZATION_CAPABILITIES {list(capabilities)}, "
            f"torch reports {torch.backends.cpu.get_cpu_capability()}); bf16 needs AVX-512 BF16 or AMX. Use "
            "--precision int8 (or fp32) on this machine")


class OpenVINORunner(Runner):
    """An OpenVINO IR on the CPU plugin; ``inference_precision`` is what the compiled model reports."""

    def __init__(self, path: str | Path, device: str = "auto", *, threads: int | None = None) -> None:
        if resolve_device("cpu" if device == "auto" else device) != "cpu":
            raise ValueError(f"{Path(path).name} is an OpenVINO model, which runs on the CPU only; got "
                             f"device={device!r}")
        reason = missing("cpu")
        if reason:
            raise RuntimeError(f"cannot run {Path(path).name}: {reason}.")
        import openvino as ov

        self.path = Path(path)
        self.meta, self.fields = read_openvino_metadata(self.path)
        self.precision = self.fields.get("precision", "fp32")
        # f32 | bf16: what the layers that are not int8 compute in (recorded by the export).
        wanted = self.fields.get("inference_precision", "f32")
        if wanted == "bf16" and (reason := bf16_missing()):
            raise RuntimeError(f"{self.path.name} is a bf16 model, but {reason}.")
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": wanted, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
        self.compiled = core.compile_model(core.read_model(self.path), "CPU", config)
        self.inference_precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if self.inference_precision != wanted:
            raise RuntimeError(f"OpenVINO compiled {self.path.name} at {self.inference_precision}, not the "
                               f"{wanted} it was exported for; refusing to run it at another precision")
        # An infer request holds its own buffers and is not thread-safe: one, behind a lock.
        self.request = self.compiled.create_infer_request()
        self.logits_port = self.compiled.output("logits")
        self.lock = threading.Lock()
        self.backend = "openvino-cpu"
        self.device = torch.device("cpu")
        self.input_size = tuple(self.meta.input_size)
        self.dynamic_hw = bool(self.fields.get("dynamic_hw", False))
        dynamic_batch = self.fields.get("dynamic_batch", True)
        self.max_batch = int(self.fields.get("max_batch") or DEFAULT_MAX_BATCH) if dynamic_batch else 1

    def precision_used(self) -> str:
        return (self.precision if self.precision == self.inference_precision.replace("f32", "fp32")
                else f"{self.precision},rest={self.inference_precision}")

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to("cpu", torch.float32).contiguous().numpy()
        with self.lock:
            self.request.infer({0: x})
            # The output tensor is the request's own buffer, overwritten by the next call: copy it out.
            logits = np.array(self.request.get_tensor(self.logits_port).data, dtype=np.float32, copy=True)
        return torch.from_numpy(logits)


load = OpenVINORunner
read_metadata = read_openvino_metadata
