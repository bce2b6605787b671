"""`make demo`: the main job end to end, each step a real command printed before it runs.

Until training/export/serving land, it runs what exists: build the paper's model, save a self-describing
checkpoint, and reload it from the file alone.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from agmm_deploy.checkpoint import load_model, save_checkpoint
from agmm_deploy.meta import ModelMeta
from agmm_deploy.model import ModelConfig, build_model, count_parameters


def main() -> int:
    out = Path("runs/demo")
    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.cityscapes(backbone="resnet18")
    print(f"[demo] building DeepLabV3+ {config}")
    model = build_model(config).eval()
    print(f"[demo] {count_parameters(model) / 1e6:.1f} M parameters")
    x = torch.randn(1, 3, 256, 512)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(x)
    print(f"[demo] forward {tuple(x.shape)} -> {tuple(logits.shape)} in {time.perf_counter() - start:.2f}s")
    path = save_checkpoint(out / "random_init.pt", model, ModelMeta.for_dataset("cityscapes", (256, 512)))
    loaded = load_model(path)
    with torch.no_grad():
        same = torch.equal(loaded.model(x), logits)
    print(f"[demo] checkpoint {path} reloads to an identical model: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
