"""A tiny model and a small image tree for the bulk tests (tests/ on the Python path, as pytest puts it)."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from agmm_deploy.checkpoint import save_checkpoint
from agmm_deploy.contract import ModelMeta
from agmm_deploy.model import DeepLabV3Plus, ModelConfig

# (relative path, (height, width)): letterboxed (fits 64x64, incl. exactly 64x64), tiled (larger along an axis),
# and the same stems in different folders.
TREE = [
    ("a/x.png", (40, 50)),
    ("a/y.jpg", (64, 64)),
    ("a/wide.png", (30, 200)),
    ("b/c/x.png", (90, 130)),
    ("b/c/y.png", (48, 20)),
    ("b/x.jpg", (70, 60)),
]


def tiny_model(folder: Path) -> Path:
    """A resnet18 DeepLabV3+ checkpoint for 64x64 inputs, 21 VOC classes."""
    torch.manual_seed(0)
    model = DeepLabV3Plus(ModelConfig(backbone="resnet18", num_classes=21)).eval()
    return save_checkpoint(folder / "voc.pt", model, ModelMeta.for_dataset("pascal", (64, 64)))


def image_tree(root: Path, tree=TREE, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, (h, w) in tree:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        # Smooth images (a gradient plus noise): random noise alone would make every class a near tie.
        base = np.linspace(0, 255, h * w * 3).reshape(h, w, 3)
        Image.fromarray(np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)).save(path)
    return root


def pngs(out: Path) -> dict[str, bytes]:
    """The visible PNGs under ``out`` by relative path (temporary dot files left out)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))
            if not any(part.startswith(".") for part in p.relative_to(out).parts)}
