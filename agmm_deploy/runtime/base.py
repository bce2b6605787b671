"""What every runtime shares: the ``Runner`` interface, device resolution, input checks and batch splitting.

A runner holds one loaded artifact. ``run(x)`` takes normalised float32 images (N, 3, H, W) as a torch tensor
on any device and returns float32 logits (N, K, H, W) on ``runner.device``, so that pre- and post-processing can
stay on the device the model runs on; ``runner(images)`` is the same call for numpy arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from agmm_deploy.contract import ModelMeta

DEFAULT_MAX_BATCH = 8
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """auto | cpu | cuda -> cpu | cuda, refusing cuda on a machine without one."""
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not supported; expected {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but torch.cuda.is_available() is False on this machine; "
                           "use device='cpu' or 'auto'")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class Runner:
    """One loaded model artifact. Subclasses set the attributes in ``__init__`` and implement ``_run``.

    Attributes:
        path: the artifact file.
        meta: classes, palette, input size, mean/std (agmm_deploy.contract.ModelMeta).
        fields: the artifact's other metadata (opset, precision, versions, ...); empty for checkpoints.
        backend: what really runs it, e.g. ``pytorch``, ``pytorch-cuda``, ``onnxruntime-cpu``, ``tensorrt``.
        precision: fp32 | fp16 | bf16 | int8 ...
        device: where ``run`` returns its logits (and prefers its inputs).
        input_size: (H, W) the model was exported at.
        max_batch: largest batch one call to ``_run`` takes; ``run`` splits larger ones.
        dynamic_hw: whether inputs of other sizes than ``input_size`` are accepted.
    """

    path: Path
    meta: ModelMeta
    fields: dict[str, Any]
    backend: str
    precision: str = "fp32"
    device: torch.device = torch.device("cpu")
    input_size: tuple[int, int]
    max_batch: int = DEFAULT_MAX_BATCH
    dynamic_hw: bool = True

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    def precision_used(self) -> str:
        """What the runner really computes in, for tables: the artifact's precision unless a subclass knows more
        (TF32 on CUDA, what OpenVINO compiled the layers outside int8 at); one word for tables, e.g. fp32,tf32=on."""
        return self.precision

    def check_input(self, images: torch.Tensor) -> torch.Tensor:
        """The images as a float32 tensor (N, 3, H, W), or a ValueError saying what fits."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(getattr(images, "shape", ())) or type(images).__name__
            raise ValueError(f"{self.backend} runner expects normalised float32 images shaped (N, 3, H, W); got "
                             f"{shape}. Use agmm_deploy.transforms.normalize on uint8 RGB images.")
        if not self.dynamic_hw and tuple(images.shape[2:]) != tuple(self.input_size):
            h, w = self.input_size
            raise ValueError(f"{self.path.name} was exported for {h}x{w} inputs; got {images.shape[2]}x"
                             f"{images.shape[3]}. Letterbox or tile the image to {h}x{w}, or re-export with "
                             "--dynamic-hw.")
        return images.float()

    def run(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, K, H, W) float32 on ``self.device`` for normalised images (N, 3, H, W) on any device."""
        images = self.check_input(images)
        chunks = [self._run(images[i:i + self.max_batch]) for i in range(0, len(images), self.max_batch)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits (N, K, H, W) float32 for normalised images (N, 3, H, W) float32, as numpy arrays."""
        if not isinstance(images, np.ndarray):
            shape = getattr(images, "shape", type(images).__name__)
            raise ValueError(f"{self.backend} runner expects normalised float32 images shaped (N, 3, H, W) as a "
                             f"numpy array; got {shape}. Use run() for torch tensors.")
        tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        return self.run(tensor).cpu().numpy()

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        """One chunk of at most ``max_batch`` images (float32, checked) -> float32 logits on ``self.device``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        h, w = self.input_size
        return (f"{type(self).__name__}({self.path.name}, backend={self.backend}, precision={self.precision}, "
                f"input={h}x{w}{'+dynamic' if self.dynamic_hw else ''}, max_batch={self.max_batch})")
