"""PyTorch eager on a checkpoint: ours, or a raw official state dict given its recipe."""

from __future__ import annotations

from pathlib import Path

import torch

from agmm_deploy.contract import ModelMeta
from agmm_deploy.runtime.base import DEFAULT_MAX_BATCH, Runner, resolve_device


def missing(device: str) -> str | None:
    """Nothing beyond torch itself is needed."""
    return None


class TorchRunner(Runner):
    """PyTorch eager on a checkpoint (ours, or a raw official state dict with backbone/num_classes/dataset)."""

    def __init__(self, path: str | Path, device: str = "auto", *, max_batch: int = DEFAULT_MAX_BATCH,
                 backbone: str | None = None, num_classes: int | None = None, dataset: str | None = None,
                 classes: tuple[str, ...] | None = None, model: torch.nn.Module | None = None,
                 meta: ModelMeta | None = None) -> None:
        from agmm_deploy.checkpoint import load_model

        self.path = Path(path)
        self.device = torch.device(resolve_device(device))
        if model is None:
            loaded = load_model(self.path, backbone=backbone, num_classes=num_classes, dataset=dataset,
                                classes=classes)
            model, meta = loaded.model, loaded.meta
        assert meta is not None, "a model passed in needs its meta"
        self.model = model.eval().to(self.device)
        self.meta = meta
        self.fields = {}
        self.backend = "pytorch" if self.device.type == "cpu" else "pytorch-cuda"
        self.input_size = tuple(meta.input_size)
        self.max_batch = max_batch

    def precision_used(self) -> str:
        if self.device.type == "cuda":
            # PyTorch's global switches decide at call time whether cuDNN convolutions use TF32 tensor cores.
            return f"{self.precision},tf32={'on' if torch.backends.cudnn.allow_tf32 else 'off'}"
        return self.precision

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(images.to(self.device)).float()


load = TorchRunner
