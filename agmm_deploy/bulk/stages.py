"""The three stages of a bulk run, shared by every engine so that all of them write the same bytes:

    decode_input(entry, max_pixels)                 -> uint8 RGB (H, W, 3), or the row of a failed/skipped input
    segment_group(runner, images, batch_size, ...)  -> (H, W) uint8 label maps; the inputs of all images batched
    write_outputs(out, key, labels, ...)            -> the manifest row; the PNGs written atomically

A label map is the indexed PNG ``agmm-predict`` has always written (pixel = class id, the model's palette).
Only the model stage imports torch: the Ray engine's decode and write workers start without it (seconds of CPU
per worker saved on a small machine).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agmm_deploy.atomic import atomic_write_bytes
from agmm_deploy.bulk.inputs import Input, InputSkipped, read_input
from agmm_deploy.transforms import SLIDING_OVERLAP, ImageDecodeError, encode_png, overlay, palette_png

if TYPE_CHECKING:
    from agmm_deploy.runtime import Runner

OK, FAILED, SKIPPED = "ok", "failed", "skipped"


@dataclass(frozen=True)
class ModelInfo:
    """What the write stage and the manifest need of the model (plain values: it travels to Ray workers)."""

    name: str
    precision: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, runner: Runner) -> "ModelInfo":
        return cls(runner.path.name, runner.precision_used(), tuple(runner.meta.classes),
                   tuple(tuple(c) for c in runner.meta.palette))

    def fraction_columns(self) -> list[str]:
        return [f"fraction_{name}" for name in self.classes]


def mask_path(out: Path, key: str) -> Path:
    return out / f"{key}.png"


def overlay_path(out: Path, key: str) -> Path:
    return out / f"{key}_overlay.png"


def decode_input(entry: Input, max_pixels: int) -> tuple[np.ndarray | None, dict | None]:
    """(image, None), or (None, the partial row of an input that failed or was skipped, with its sentence)."""
    try:
        return read_input(entry.path, max_pixels), None
    except InputSkipped as err:
        return None, dict(status=SKIPPED, error=str(err))
    except ImageDecodeError as err:
        return None, dict(status=FAILED, error=str(err))


def segment_group(runner: Runner, images: list[np.ndarray], batch_size: int,
                  overlap: float = SLIDING_OVERLAP) -> list[tuple[np.ndarray, int]]:
    """Label maps for images of any sizes, the model run on ``batch_size`` inputs of all of them at a time.

    Returns:
        (labels (H_i, W_i) uint8, model inputs the image used) per image.
    """
    import torch

    from agmm_deploy.inference import chunks, image_windows, run_slices

    with torch.no_grad():
        windows = [image_windows(runner, image, overlap=overlap, name=f"image {i}")
                   for i, image in enumerate(images)]
        for batch in chunks(windows, batch_size):
            run_slices(runner.run, batch)
        return [(w.labels().cpu().numpy(), w.count) for w in windows]


def segment_each(runner: Runner, images: list[np.ndarray], batch_size: int,
                 overlap: float = SLIDING_OVERLAP) -> list[tuple[np.ndarray, int] | str]:
    """segment_group's results; where the model raises on the group, image by image, a failure as its sentence."""
    if not images:
        return []
    try:
        return segment_group(runner, images, batch_size, overlap)
    except (RuntimeError, ValueError, MemoryError):
        results: list[tuple[np.ndarray, int] | str] = []
        for image in images:
            try:
                results += segment_group(runner, [image], batch_size, overlap)
            except (RuntimeError, ValueError, MemoryError) as err:
                h, w = image.shape[:2]
                results.append(f"the model failed on this {w}x{h} image ({type(err).__name__}: {err})")
        return results


def write_outputs(out: Path, key: str, labels: np.ndarray, info: ModelInfo, *, image: np.ndarray | None = None,
                  alpha: float = 0.5) -> dict:
    """Writes ``OUT/<key>.png`` (and ``<key>_overlay.png`` when ``image`` is given); returns the row's fields.

    Each file is written to a temporary name beside it and renamed: a full disk or a killed run leaves the
    previous file or none, never a truncated PNG.
    """
    try:
        atomic_write_bytes(mask_path(out, key), palette_png(labels, info.palette))
        if image is not None:
            atomic_write_bytes(overlay_path(out, key), encode_png(overlay(image, labels, info.palette, alpha=alpha)))
    except OSError as err:
        return dict(status=FAILED, error=f"could not write {mask_path(out, key)} ({err.strerror or err}); "
                    "free space or fix the permissions of --out, then rerun the same command")
    counts = np.bincount(labels.ravel(), minlength=len(info.classes))[:len(info.classes)]
    fractions = counts / max(1, labels.size)
    return dict(status=OK, error="", **dict(zip(info.fraction_columns(), fractions.tolist())))
