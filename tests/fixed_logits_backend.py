"""A test-only runtime: proof that adding a backend is one file plus one table row.

The artifact is a ``.fixedlogits`` JSON file holding model metadata (ModelMeta.to_dict()). Its "model" needs no
weights: the logit of class k at a pixel is minus the distance of the pixel's mean normalised value from the
k-th of K evenly spaced levels, so brighter regions get higher class ids. The row is added to the runtime table
with ``AGMM_EXTRA_BACKENDS=fixed_logits_backend:ROW`` (tests/ on the Python path).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from agmm_deploy.contract import ModelMeta
from agmm_deploy.runtime import Backend
from agmm_deploy.runtime.base import Runner, resolve_device

ROW = Backend("fixed-logits", "fixed-logits model", (".fixedlogits",), ("cpu",), ("fp32",),
              "fixed_logits_backend", "tests/ on the Python path")


def missing(device: str) -> str | None:
    return None


def write(path: str | Path, meta: ModelMeta) -> Path:
    """Writes a .fixedlogits artifact for ``meta``."""
    path = Path(path)
    path.write_text(json.dumps(meta.to_dict()))
    return path


class FixedLogitsRunner(Runner):
    def __init__(self, path: str | Path, device: str = "auto") -> None:
        self.path = Path(path)
        self.meta = ModelMeta.from_dict(json.loads(self.path.read_text()))
        self.fields = {"precision": "fp32"}
        self.backend = "fixed-logits"
        self.device = torch.device(resolve_device(device))
        self.input_size = tuple(self.meta.input_size)

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        levels = torch.linspace(-2, 2, self.meta.num_classes, device=self.device)  # (K,)
        brightness = images.to(self.device).mean(dim=1, keepdim=True)  # (N, 1, H, W)
        return -(brightness - levels[None, :, None, None]).abs()  # (N, K, H, W)


load = FixedLogitsRunner
