"""mIoU from a confusion matrix: one definition for training evaluation, ``training.evaluate`` and parity checks.

In distributed runs the matrix is summed over all ranks before it is read; outside DDP that step does nothing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


class ConfusionMatrix:
    """Counts (label, prediction) pairs over pixels whose label is a class (label < K; 255 and K ignored).

    ``mat[i, j]`` = number of pixels of class i predicted as j. Call ``reduce_from_all_processes`` once
    after the last update in distributed runs: each rank only saw its shard of the validation set.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def update(self, target: torch.Tensor | np.ndarray, prediction: torch.Tensor | np.ndarray) -> None:
        """Adds one batch.

        Args:
            target: class ids, 255 (ignore) or K (unlabelled), any integer dtype.
            prediction: predicted class ids.
        Shape:
            target, prediction: the same shape, e.g. (B, H, W); torch tensors or numpy arrays.
        """
        target, prediction = torch.as_tensor(target), torch.as_tensor(prediction)
        if target.shape != prediction.shape:
            raise ValueError(f"target {tuple(target.shape)} and prediction {tuple(prediction.shape)} differ in shape")
        k = self.num_classes
        target = target.to(self.mat.device).flatten().long()
        prediction = prediction.to(self.mat.device).flatten().long()
        keep = (target >= 0) & (target < k)
        index = k * target[keep] + prediction[keep]
        self.mat += torch.bincount(index, minlength=k * k).reshape(k, k)

    def reduce_from_all_processes(self) -> None:
        """Sums the matrix over all ranks (in place); a no-op without an initialised process group of size > 1."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    @property
    def pixels(self) -> int:
        """Number of scored pixels (label a class) counted so far."""
        return int(self.mat.sum())

    def iou(self) -> torch.Tensor:
        """Per-class IoU in [0, 1], NaN for classes absent from both labels and predictions. Shape: (K,)."""
        mat = self.mat.double()
        intersection = mat.diag()
        union = mat.sum(0) + mat.sum(1) - intersection
        return torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, float("nan")))

    def miou(self) -> float:
        """Mean IoU in percent over classes with a defined IoU (NaN classes skipped, as nanmean).

        NaN when no pixel was scored (check ``pixels`` first where that can happen).
        """
        iou = self.iou()
        valid = ~torch.isnan(iou)
        return float(iou[valid].mean() * 100) if valid.any() else float("nan")

    def pixel_accuracy(self) -> float:
        """Percentage of scored pixels predicted as their label; NaN when no pixel was scored."""
        total = self.mat.sum()
        return float(self.mat.diag().sum().double() / total * 100) if total > 0 else float("nan")

    def table(self, class_names: tuple[str, ...]) -> str:
        """Per-class IoU and the mIoU as a Markdown table."""
        lines = ["| class | IoU (%) |", "|---|---:|"]
        for name, value in zip(class_names, self.iou().tolist()):
            lines.append(f"| {name} | {'n/a' if value != value else f'{value * 100:.2f}'} |")
        lines.append(f"| **mIoU** | **{self.miou():.2f}** |")
        return "\n".join(lines)
