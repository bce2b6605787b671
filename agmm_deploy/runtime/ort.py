"""ONNX Runtime on an .onnx file: the CPU execution provider, or CUDA with inputs and outputs bound to torch's
device memory (no host copies); ``backend`` says which provider the session really got."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agmm_deploy.contract import read_onnx_metadata
from agmm_deploy.runtime.base import DEFAULT_MAX_BATCH, Runner, resolve_device

# ONNX tensor element types of the model outputs, as torch and numpy dtypes.
ELEMENT_TYPES = {"tensor(float)": (torch.float32, np.float32), "tensor(float16)": (torch.float16, np.float16)}


def missing(device: str) -> str | None:
    """None when ONNX Runtime can run here on ``device``, else one clause naming what is missing."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "ONNX Runtime is not installed (pip install onnxruntime-gpu)"
    return None


def cpu_session_options(threads: int | None = None,
                        mem_pattern: bool = True) -> "onnxruntime.SessionOptions":  # noqa: F821
    """ONNX Runtime CPU settings that make it faster than PyTorch eager on this model.

    Measured on DeepLabV3+ R50 at 512x1024, batch 1, 2 shared cores (median of 3, noisy): these options 1.50 s;
    ORT defaults 2.21 s; ORT_ENABLE_BASIC instead of ALL 3.20 s; arena + memory pattern off 1.58 s; spinning on
    1.52 s. So:
    - ORT_ENABLE_ALL is what matters: conv + BN + ReLU fusion and the NCHWc blocked layout transform.
    - intra-op threads = PyTorch's thread count (physical cores), one inter-op thread, sequential execution: the
      graph is a chain, so parallel branches only add contention.
    - Memory arena and memory-pattern planning on: repeated calls at one shape reuse the same buffers.
    - No spin-waiting: no gain measured, and spinning threads steal cycles from other work on shared cores.
    - ``mem_pattern=False`` for serving, where the batch size changes from call to call: a pattern is planned per
      input shape, and each new mix of shapes grows the arena (R18 512x512, 30 calls at random batch 1..8 after
      warm-up: RSS 1313 -> 1733 MiB with it, flat at 1276 MiB without).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = mem_pattern
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # warnings about unused initialisers etc. are noise here
    return options


class OnnxRunner(Runner):
    """ONNX Runtime; ``backend`` is onnxruntime-cuda or onnxruntime-cpu, after what the session really got."""

    def __init__(self, path: str | Path, device: str = "auto", *, threads: int | None = None,
                 mem_pattern: bool = True) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.meta, self.fields = read_onnx_metadata(self.path)
        if device == "auto":
            # CUDA when both torch and this ONNX Runtime build have it; and the device the artifact was made
            # for where there is a choice (agmm_deploy.export.precision: int8 for the CPU's VNNI kernels, fp16
            # for CUDA). An explicit device is always honoured.
            has_cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
            target = self.fields.get("device", "any")
            device = "cpu" if target == "cpu" or not has_cuda else "cuda"
        device = resolve_device(device)
        self.precision = self.fields.get("precision", "fp32")
        if self.precision == "tf32" and device != "cuda":
            raise ValueError(f"{self.path.name} is a tf32 model (TF32 tensor-core matmuls and convolutions on a "
                             f"CUDA GPU); got device={device!r}, where it would run as plain fp32. Run model.onnx "
                             "for fp32 on the CPU")
        providers: list[Any] = ["CPUExecutionProvider"]
        self.tf32 = False
        if device == "cuda":
            # onnxruntime-gpu finds the CUDA/cuDNN libraries shipped with torch's wheels once they are loaded.
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()
            # use_tf32=0: an fp32 model runs in fp32 (TF32 tensor cores keep a 10-bit mantissa); a tf32 model
            # is the same fp32 graph exported to run with them on.
            self.tf32 = self.precision == "tf32"
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": torch.cuda.current_device(),
                                                            "use_tf32": str(int(self.tf32))}))
        self.session = ort.InferenceSession(str(self.path), sess_options=cpu_session_options(threads, mem_pattern),
                                            providers=providers)
        got = self.session.get_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in got:
            raise RuntimeError(f"ONNX Runtime could not use CUDA for {self.path.name} (session providers: {got}); "
                               "check that onnxruntime-gpu matches the installed CUDA/cuDNN, or use device='cpu'")
        on_gpu = "CUDAExecutionProvider" in got
        self.backend = "onnxruntime-cuda" if on_gpu else "onnxruntime-cpu"
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self.input_size = tuple(self.meta.input_size)
        self.dynamic_hw = bool(self.fields.get("dynamic_hw", False))
        dynamic_batch = self.fields.get("dynamic_batch", True)
        self.max_batch = int(self.fields.get("max_batch") or DEFAULT_MAX_BATCH) if dynamic_batch else 1
        inputs = self.session.get_inputs()
        self.input_name = inputs[0].name
        self.input_types = ELEMENT_TYPES.get(inputs[0].type, ELEMENT_TYPES["tensor(float)"])
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.output_types = ELEMENT_TYPES.get(outputs["logits"].type, ELEMENT_TYPES["tensor(float)"])

    def precision_used(self) -> str:
        if self.device.type == "cuda":
            return f"{self.precision},tf32={'on' if self.tf32 else 'off'}"
        return self.precision

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            x = images.to("cpu", self.input_types[0]).contiguous().numpy()
            return torch.from_numpy(self.session.run(["logits"], {self.input_name: x})[0]).float()
        return self._run_bound(images)

    def _run_bound(self, images: torch.Tensor) -> torch.Tensor:
        """CUDA: input and output live in torch tensors on the GPU, bound by pointer (ONNX Runtime IOBinding)."""
        x = images.to(self.device, self.input_types[0]).contiguous()
        n, _, h, w = x.shape
        # The model upsamples its logits to the input size: (N, K, H, W).
        out = torch.empty((n, self.meta.num_classes, h, w), dtype=self.output_types[0], device=self.device)
        binding = self.session.io_binding()
        binding.bind_input(name=self.input_name, device_type="cuda", device_id=self.device.index,
                           element_type=self.input_types[1], shape=tuple(x.shape), buffer_ptr=x.data_ptr())
        binding.bind_output(name="logits", device_type="cuda", device_id=self.device.index,
                            element_type=self.output_types[1], shape=tuple(out.shape), buffer_ptr=out.data_ptr())
        # ONNX Runtime computes on its own stream: the input must be complete before it starts; run_with_iobinding
        # synchronises its stream before returning, so ``out`` is ready for torch afterwards.
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return out.float()


load = OnnxRunner
read_metadata = read_onnx_metadata
