"""The AGMM loss (Wu et al., CVPR 2023) and the partial cross-entropy baseline.

``agmm_losses`` computes exactly the terms of the official ``train_city.py`` / ``train_voc.py`` step
(docs/algorithm.md, "Training loss per step"), vectorised: no Python loops over images, classes or class pairs.
Two things keep it fast and small where the official code is slow and large:

* Prototypes. The official code upsamples ``feat`` (B, 256, H/4, W/4) to the crop (2.1 GB at Cityscapes
  scale) and averages it over each class's labelled pixels. Bilinear upsampling is linear, so the same sum
  is ``feat`` weighted by the *adjoint* of the upsampling applied to the class masks (one small
  ``upsample_bilinear2d_backward`` call), and nothing of crop size with 256 channels is ever built.
* GMM response. ``mean_c |f - P_bk|`` for every pixel, image and class is a (B, K, C, h, w) tensor
  (2.5 GB at Cityscapes scale) in the official code, in the forward and again in the backward. Here it is
  ``torch.cdist(p=1)`` (a fused kernel) run over bounded tiles of the pixel axis.
  The pixel-level terms (seg, cls, GMM BCE) are one more custom function that saves nothing of crop size
  and recomputes what it needs in backward, in place.

Masks: ``sparse_mask`` holds a class id 0..K-1 at labelled pixels, K at unlabelled pixels of the image
and 255 (IGNORE_INDEX) at crop padding. Unlabelled pixels get the cls and GMM terms; padding gets none.

Where the official code divides by an empty set (a batch with no labelled pixel) it returns NaN; here such
a mean is 0, so one unlucky crop cannot poison a run. Everything else matches to float64 round-off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agmm_deploy.constants import IGNORE_INDEX

# The official code's constant inside every log and every denominator of a mean.
EPS = 1e-6
# Elements of the largest temporary (B, K, C, chunk) of the distance function: 2^24 floats = 64 MB in fp32.
DISTANCE_CHUNK_ELEMENTS = 1 << 24


def _upsample_adjoint(grid: torch.Tensor, small_size: tuple[int, int]) -> torch.Tensor:
    """Transpose of ``F.interpolate(x, grid.shape[-2:], mode="bilinear", align_corners=False)``.

    Shape: grid (B, K, H, W) -> (B, K, h, w) with (h, w) = small_size. For any x of that small size,
    ``(interpolate(x) * grid).sum() == (x * _upsample_adjoint(grid)).sum()``.
    """
    b, k, big_h, big_w = grid.shape
    return torch.ops.aten.upsample_bilinear2d_backward(
        grid.contiguous(), [big_h, big_w], [b, k, small_size[0], small_size[1]], False)


def _mean_abs_distance(feat: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """d[b, k, y, x] = mean_c |feat[b, c, y, x] - protos[b, k, c]|, never building (B, K, C, h, w).

    ``torch.cdist(p=1)`` is a fused kernel, but its CUDA backward allocates a (B, K, N, C) buffer; running it
    over tiles of the pixel axis bounds that buffer to DISTANCE_CHUNK_ELEMENTS (each tile covers all images
    and classes, so this is not a per-image or per-class loop).
    Shape: feat (B, C, h, w), protos (B, K, C) -> (B, K, h, w).
    """
    b, c, h, w = feat.shape
    k = protos.shape[1]
    chunk = max(1, DISTANCE_CHUNK_ELEMENTS // (b * k * c))
    # split() views of (B, C, N): autograd saves no copy, and their gradients are joined in one concatenation
    tiles = [torch.cdist(tile.transpose(1, 2), protos, p=1) for tile in feat.flatten(2).split(chunk, dim=2)]
    distance = torch.cat(tiles, dim=1) if len(tiles) > 1 else tiles[0]  # (B, N, K): sums over C
    return distance.transpose(1, 2).reshape(b, k, h, w) / c


class _PixelTerms(torch.autograd.Function):
    """seg, cls, GMM loss1 and loss2: every term that lives on crop-size (B, K, H, W) tensors.

    Forward keeps at most two crop-size tensors alive and saves none; backward recomputes softmax and the
    upsampled response and forms both gradients in place (four crop-size tensors at the peak).

    Inputs: logits (B, K, H, W), res (B, K, h, w) the GMM response on the feature grid, mask (B, H, W),
    present (B, K) classes labelled in the crop, absent (B, K) = 1 - cls_label.
    Returns: (4,) tensor [seg, cls, loss1, loss2].
    """

    @staticmethod
    def forward(ctx, logits, res, mask, present, absent):
        k = logits.shape[1]
        valid = mask != IGNORE_INDEX  # (B, H, W): pixels of the image, not crop padding
        labelled = mask < k
        n_valid = valid.sum().clamp(min=1)
        n_labelled = labelled.sum().clamp(min=1)
        # 1 / (number of classes present in the crop + eps), per image: the official per-pixel class average.
        class_weight = present / (present.sum(1, keepdim=True) + EPS)  # (B, K)

        b_l, y_l, x_l = labelled.nonzero(as_tuple=True)  # the N labelled pixels
        logits_l = logits[b_l, :, y_l, x_l]  # (N, K)
        target_l = mask[b_l, y_l, x_l]
        seg = F.cross_entropy(logits_l, target_l, reduction="sum") / n_labelled

        p = torch.softmax(logits, dim=1)  # (B, K, H, W)
        log_1mp = torch.rsub(p, 1.0).add_(EPS).log_()  # log(1 - p + eps)
        cls = -(torch.einsum("bkhw,bk->bhw", log_1mp, absent) * valid).sum() / n_valid

        # -BCE(p, r) = log(1-p+eps) + r (log(p+eps) - log(1-p+eps)), summed over classes in two parts so that
        # at most two crop-size buffers are alive at a time.
        neg_bce = torch.einsum("bkhw,bk->bhw", log_1mp, class_weight)  # (B, H, W)
        log_ratio = p.add_(EPS).log_().sub_(log_1mp)  # in p's buffer
        del p, log_1mp
        r = F.interpolate(res, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        r.mul_(present[:, :, None, None])
        r_l = r[b_l, :, y_l, x_l]  # (N, K)
        neg_bce += torch.einsum("bkhw,bk->bhw", log_ratio.mul_(r), class_weight)
        loss1 = -0.5 * (neg_bce * valid).sum() / n_valid
        del log_ratio, r

        onehot_l = F.one_hot(target_l, k).to(r_l.dtype)
        bce2 = -(onehot_l * torch.log(r_l + EPS) + (1 - onehot_l) * torch.log(1 - r_l + EPS))
        weight_l = class_weight[b_l]  # (N, K): the class weights of each pixel's image
        loss2 = 0.5 * (bce2 * weight_l).sum() / n_labelled

        ctx.save_for_backward(logits, res, mask, present, absent)
        return torch.stack([seg, cls, loss1, loss2])

    @staticmethod
    def backward(ctx, grad_out):
        logits, res, mask, present, absent = ctx.saved_tensors
        g_seg, g_cls, g_l1, g_l2 = grad_out.unbind()
        k = logits.shape[1]
        valid = mask != IGNORE_INDEX
        labelled = mask < k
        n_valid = valid.sum().clamp(min=1)
        n_labelled = labelled.sum().clamp(min=1)
        class_weight = present / (present.sum(1, keepdim=True) + EPS)
        pixel_weight = (valid.to(logits.dtype) / n_valid).unsqueeze(1)  # (B, 1, H, W)
        coef_cls = (g_cls * absent)[:, :, None, None]  # (B, K, 1, 1)
        coef_l1 = (0.5 * g_l1 * class_weight)[:, :, None, None]

        # Four crop-size buffers at most: a, b, r, grad_p; then softmax is recomputed once more.
        p = torch.softmax(logits, dim=1)
        b_l, y_l, x_l = labelled.nonzero(as_tuple=True)
        p_l = p[b_l, :, y_l, x_l]
        a = torch.rsub(p, 1.0).add_(EPS)  # 1 - p + eps
        b = p.add_(EPS)  # p + eps, in p's buffer
        del p
        r = F.interpolate(res, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        r.mul_(present[:, :, None, None])
        r_l = r[b_l, :, y_l, x_l]

        # d/dp of cls + loss1:  coef_cls / a + coef_l1 * ((1 - r) / a - r / b)
        grad_p = torch.rsub(r, 1.0).mul_(coef_l1).add_(coef_cls).div_(a)
        grad_p.sub_(r.mul_(coef_l1).div_(b))
        del r
        grad_p.mul_(pixel_weight)
        # d/dr of loss1: coef_l1 * (log(1 - p + eps) - log(p + eps)), in a's buffer
        grad_r = a.div_(b).log_().mul_(coef_l1).mul_(pixel_weight)
        del a, b
        # softmax Jacobian: dL/dz = p * (dL/dp - sum_k p dL/dp), in place in grad_p
        p = torch.softmax(logits, dim=1)
        grad_z = grad_p.mul_(p)
        grad_z.addcmul_(p, grad_z.sum(1, keepdim=True), value=-1.0)
        del p

        target_l = mask[b_l, y_l, x_l]
        onehot_l = F.one_hot(target_l, k).to(p_l.dtype)
        seg_grad = (p_l - onehot_l) * (g_seg / n_labelled)  # cross-entropy on labelled pixels
        grad_z[b_l, :, y_l, x_l] += seg_grad
        weight_l = class_weight[b_l]
        dbce2 = -onehot_l / (r_l + EPS) + (1 - onehot_l) / (1 - r_l + EPS)
        grad_r[b_l, :, y_l, x_l] += (0.5 * g_l2 / n_labelled) * weight_l * dbce2
        grad_res = _upsample_adjoint(grad_r.mul_(present[:, :, None, None]), res.shape[-2:])
        return grad_z, grad_res, None, None, None


def agmm_losses(feat: torch.Tensor, logits: torch.Tensor, sparse_mask: torch.Tensor, cls_label: torch.Tensor,
                num_classes: int) -> dict[str, torch.Tensor]:
    """The AGMM loss terms of one training step.

    Args:
        feat: decoder feature (B, C, h, w), from ``model.forward_train``.
        logits: (B, K, H, W) at crop size.
        sparse_mask: (B, H, W) integer; 0..K-1 labelled, K unlabelled, 255 crop padding.
        cls_label: (B, K) in {0, 1}: classes present in the sparse label of the whole image (before crop).
        num_classes: K.
    Returns:
        0-dim tensors ``seg`` (partial CE), ``cls``, ``proto``, ``gmm`` (loss1 + loss2) and
        ``total = seg + cls + proto + gmm``, in float32 (or float64 for float64 inputs).
    """
    k = num_classes
    if logits.shape[1] != k or cls_label.shape != (logits.shape[0], k):
        raise ValueError(f"logits {tuple(logits.shape)} and cls_label {tuple(cls_label.shape)} do not match "
                         f"num_classes={k}; expected (B, {k}, H, W) and (B, {k})")
    if sparse_mask.shape != (logits.shape[0], *logits.shape[-2:]):
        raise ValueError(f"sparse_mask {tuple(sparse_mask.shape)} does not match logits {tuple(logits.shape)}; "
                         "expected (B, H, W)")
    # The loss runs in fp32 even under autocast: logs of 1e-6 and exp(-d^2) underflow in fp16/bf16.
    with torch.autocast(device_type=logits.device.type, enabled=False):
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        feat = feat.to(dtype)
        # contiguous: a channels_last network's logits are (B, H, W, K) in memory, and every pass here (softmax over
        # K, the per-class reductions) runs over K-planes; the bf16 -> fp32 conversion makes the copy anyway.
        logits = logits.to(dtype, memory_format=torch.contiguous_format)
        mask = sparse_mask.long()
        present, protos = _prototypes(feat, mask, k)
        proto = _prototype_separation(protos, present)
        res = _gmm_response(feat, protos, mask, present)
        absent = 1.0 - cls_label.to(dtype)
        seg, cls, loss1, loss2 = _PixelTerms.apply(logits, res, mask, present, absent).unbind()
        gmm = loss1 + loss2
        return {"seg": seg, "cls": cls, "proto": proto, "gmm": gmm, "total": seg + cls + proto + gmm}


def _prototypes(feat: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and class, the mean upsampled feature over the class's labelled pixels of the crop.

    Returns: present (B, K) as feat's dtype (1 where class k is labelled in image b's crop),
        prototypes (B, K, C) (0 for absent classes). Not detached: gradients reach feat, as officially.
    """
    b, c, h, w = feat.shape
    labelled = mask < k
    onehot = torch.zeros((b, k, *mask.shape[-2:]), dtype=feat.dtype, device=feat.device)  # (B, K, H, W)
    onehot.scatter_(1, mask.clamp(max=k - 1).unsqueeze(1), labelled.unsqueeze(1).to(feat.dtype))
    counts = onehot.sum((2, 3))  # (B, K)
    # sum over class-k pixels of upsample(feat) == sum over the grid of feat * upsample^T(onehot_k)
    weights = _upsample_adjoint(onehot, (h, w)).flatten(2)  # (B, K, h*w)
    del onehot
    sums = torch.bmm(weights, feat.flatten(2).transpose(1, 2))  # (B, K, C)
    protos = sums / (counts + EPS).unsqueeze(-1)
    return (counts > 0).to(feat.dtype), protos


def _prototype_separation(protos: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean over pairs i < j of classes present in the batch of exp(-(mean_c |V_i - V_j|)^2).

    V_k is the *sum* over images of the prototypes, times n_k / (n_k + eps) with n_k the number of images
    holding class k (the official ``mean_vecs``). 0 when fewer than two classes are present.
    """
    n_images = present.sum(0)  # (K,)
    vecs = protos.sum(0) * (n_images / (n_images + EPS)).unsqueeze(-1)  # (K, C)
    distance = (vecs[:, None, :] - vecs[None, :, :]).abs().mean(-1)  # (K, K)
    in_batch = n_images > 0
    pairs = torch.triu(in_batch[:, None] & in_batch[None, :], diagonal=1).to(protos.dtype)
    return (torch.exp(-distance * distance) * pairs).sum() / (pairs.sum() + EPS)


def _gmm_response(feat: torch.Tensor, protos: torch.Tensor, mask: torch.Tensor,
                  present: torch.Tensor) -> torch.Tensor:
    """r_bk = exp(-d_bk^2) on the feature grid, d_bk = mean_c |f - P_bk| * present_bk * keep.

    ``keep`` is the not-padding mask resized bilinearly to the feature grid (official ``preserve``).
    Shape: (B, K, h, w); upsampled and multiplied by ``present`` inside the pixel terms.
    """
    b, c, h, w = feat.shape
    keep = F.interpolate((mask < IGNORE_INDEX).to(feat.dtype).unsqueeze(1), size=(h, w), mode="bilinear",
                         align_corners=False)  # (B, 1, h, w)
    distance = _mean_abs_distance(feat, protos)  # (B, K, h, w)
    distance = distance * present[:, :, None, None] * keep
    return torch.exp(-distance * distance)


def partial_ce_losses(logits: torch.Tensor, sparse_mask: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """The baseline: cross-entropy on labelled pixels only (K and 255 ignored); 0 when none is labelled."""
    target = sparse_mask.long()
    target = torch.where(target < num_classes, target, torch.full_like(target, IGNORE_INDEX))
    n_labelled = (target != IGNORE_INDEX).sum().clamp(min=1)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        seg = F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, target,
                              ignore_index=IGNORE_INDEX, reduction="sum") / n_labelled
    return {"seg": seg, "total": seg}


class AGMMLoss(nn.Module):
    """``agmm_losses`` as a module: ``loss(feat, logits, sparse_mask, cls_label) -> dict``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, feat, logits, sparse_mask, cls_label) -> dict[str, torch.Tensor]:
        return agmm_losses(feat, logits, sparse_mask, cls_label, self.num_classes)


class PartialCELoss(nn.Module):
    """The partial cross-entropy baseline with AGMMLoss's call signature (feat and cls_label unused)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, feat, logits, sparse_mask, cls_label) -> dict[str, torch.Tensor]:
        return partial_ce_losses(logits, sparse_mask, self.num_classes)
