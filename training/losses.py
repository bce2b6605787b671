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

import functools
import os

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


def _pixel_sum(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum over pixels of x * weight, per image and class. Shape: x (B, K, H, W), weight (B, H, W) -> (B, K).

    Eager: one batched matrix-vector product, no temporary. Compiled: a reduction inductor fuses into the kernel
    that produces ``x`` (a matmul would make it write ``x`` out first).
    """
    if torch.compiler.is_compiling():
        return (x * weight.unsqueeze(1)).sum((2, 3))
    return torch.einsum("bkhw,bhw->bk", x, weight)


def _dense_terms(logits: torch.Tensor, res: torch.Tensor, pixel_weight: torch.Tensor, absent: torch.Tensor,
                 class_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cls and GMM loss1, the two terms summed over every valid pixel and class.

    Shape: logits (B, K, H, W); res (B, K, h, w) the GMM response on the feature grid; pixel_weight (B, H, W)
    = valid / n_valid; absent, class_weight (B, K). Returns two 0-dim tensors.
    ``res`` is not multiplied by ``present`` as in the official formula: class_weight is 0 for every absent class
    (an exact 0 product), so the product changes nothing and would cost a crop-size pass.
    """
    p = torch.softmax(logits, dim=1)  # (B, K, H, W)
    log_1mp = torch.rsub(p, 1.0).add_(EPS).log_()  # log(1 - p + eps)
    log_1mp_sums = _pixel_sum(log_1mp, pixel_weight)  # (B, K): one pass serves cls and loss1
    # -BCE(p, r) = log(1-p+eps) + r (log(p+eps) - log(1-p+eps)): the second part in p's buffer, so that at
    # most two crop-size buffers are alive at a time.
    log_ratio = p.add_(EPS).log_().sub_(log_1mp)
    del p, log_1mp
    r = F.interpolate(res, size=logits.shape[-2:], mode="bilinear", align_corners=False)
    ratio_sums = _pixel_sum(log_ratio.mul_(r), pixel_weight)
    cls = -(log_1mp_sums * absent).sum()
    loss1 = -0.5 * ((log_1mp_sums + ratio_sums) * class_weight).sum()
    return cls, loss1


def _dense_grads(logits: torch.Tensor, res: torch.Tensor, pixel_weight: torch.Tensor, coef_cls: torch.Tensor,
                 coef_l1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of g_cls * cls + g_l1 * loss1 (``_dense_terms``) w.r.t. the logits and the upsampled response.

    Shape: logits (B, K, H, W), res (B, K, h, w), pixel_weight (B, H, W), coef_cls = g_cls * absent and
    coef_l1 = 0.5 * g_l1 * class_weight (B, K) -> (grad_z, grad_r), both (B, K, H, W).
    Eager: four crop-size buffers at the peak (a, b, r, grad_p), softmax recomputed once more at the end.
    """
    pixel_weight = pixel_weight.unsqueeze(1)  # (B, 1, H, W)
    coef_cls, coef_l1 = coef_cls[:, :, None, None], coef_l1[:, :, None, None]
    p = torch.softmax(logits, dim=1)
    a = torch.rsub(p, 1.0).add_(EPS)  # 1 - p + eps
    b = p.add_(EPS)  # p + eps, in p's buffer
    del p
    r = F.interpolate(res, size=logits.shape[-2:], mode="bilinear", align_corners=False)
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
    return grad_z, grad_r


# Set to 0 to run the pixel terms eagerly on CUDA too (e.g. where Triton cannot compile).
COMPILE_ENV = "AGMM_COMPILE_LOSS"


@functools.cache
def _compiled_dense() -> tuple:
    # Compiled on the first CUDA step, not at import. Inductor fuses each function into a few kernels that
    # read the logits two or three times and never write softmax, r or the log terms out.
    return torch.compile(_dense_terms), torch.compile(_dense_grads)


def _dense_functions(device: torch.device) -> tuple:
    """(_dense_terms, _dense_grads) for ``device``: compiled on CUDA unless AGMM_COMPILE_LOSS=0, eager elsewhere
    (on the CPU the eager in-place version is as fast, and compiling needs a C++ toolchain and a minute)."""
    if device.type == "cuda" and os.environ.get(COMPILE_ENV, "1") != "0":
        return _compiled_dense()
    return _dense_terms, _dense_grads


def _call_dense(fn, *args):
    try:
        return fn(*args)
    except Exception as err:  # torch._dynamo / inductor errors: the one fix a user has is the switch
        if not type(err).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise
        raise RuntimeError(f"torch.compile of the AGMM loss's pixel terms failed ({type(err).__name__}: "
                           f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); set "
                           f"{COMPILE_ENV}=0 to run them eagerly (same values, slower on the GPU)") from err


def _upsampled_at(res: torch.Tensor, b_l: torch.Tensor, y_l: torch.Tensor, x_l: torch.Tensor,
                  size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(res, size, mode="bilinear", align_corners=False)[b_l, :, y_l, x_l]`` at N pixels only.

    Shape: res (B, K, h, w), b_l/y_l/x_l (N,) -> (N, K). The same source coordinates and weights as PyTorch's
    kernel (half-pixel centres, clamped at 0, the last row/column repeated), so the two agree to round-off.
    """
    def axis(dst: torch.Tensor, n_in: int, n_out: int):
        src = ((dst.to(torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
        low = src.floor().long().clamp(max=n_in - 1)
        high = (low + 1).clamp(max=n_in - 1)
        frac = (src - low).clamp(0.0, 1.0).to(res.dtype)[:, None]  # (N, 1)
        return low, high, frac

    h, w = res.shape[-2:]
    y0, y1, fy = axis(y_l, h, size[0])
    x0, x1, fx = axis(x_l, w, size[1])
    grid = res.permute(0, 2, 3, 1)  # (B, h, w, K): each gather below is (N, K)
    top = (1 - fx) * grid[b_l, y0, x0] + fx * grid[b_l, y0, x1]
    bottom = (1 - fx) * grid[b_l, y1, x0] + fx * grid[b_l, y1, x1]
    return (1 - fy) * top + fy * bottom


class _PixelTerms(torch.autograd.Function):
    """seg, cls, GMM loss1 and loss2: every term that lives on crop-size (B, K, H, W) tensors.

    The dense part (cls, loss1: every valid pixel and class) is ``_dense_terms`` / ``_dense_grads``, compiled on
    CUDA; the sparse part (seg, loss2: the N labelled pixels) works on (N, K) gathers. Nothing of crop size is
    saved for backward, which recomputes what it needs.

    Crop-size passes (eager), against the version before: forward 11 instead of 13 (no r * present, one
    pixel reduction of log(1-p+eps) instead of two), backward 22 instead of 24 (no r * present, no
    grad_r * present), and no crop-size r in the forward's sparse part.

    Inputs: logits (B, K, H, W), res (B, K, h, w) the GMM response on the feature grid, mask (B, H, W),
    present (B, K) classes labelled in the crop, absent (B, K) = 1 - cls_label.
    Returns: (4,) tensor [seg, cls, loss1, loss2].
    """

    @staticmethod
    def forward(ctx, logits, res, mask, present, absent):
        k = logits.shape[1]
        valid = mask != IGNORE_INDEX  # (B, H, W): pixels of the image, not crop padding
        labelled = mask < k
        n_labelled = labelled.sum().clamp(min=1)
        pixel_weight = valid.to(logits.dtype) / valid.sum().clamp(min=1)  # (B, H, W)
        # 1 / (number of classes present in the crop + eps), per image: the official per-pixel class average.
        class_weight = present / (present.sum(1, keepdim=True) + EPS)  # (B, K)
        dense_terms, _ = _dense_functions(logits.device)
        cls, loss1 = _call_dense(dense_terms, logits, res, pixel_weight, absent, class_weight)

        b_l, y_l, x_l = labelled.nonzero(as_tuple=True)  # the N labelled pixels
        target_l = mask[b_l, y_l, x_l]
        seg = F.cross_entropy(logits[b_l, :, y_l, x_l], target_l, reduction="sum") / n_labelled
        r_l = _upsampled_at(res, b_l, y_l, x_l, logits.shape[-2:])  # (N, K)
        onehot_l = F.one_hot(target_l, k).to(r_l.dtype)
        bce2 = -(onehot_l * torch.log(r_l + EPS) + (1 - onehot_l) * torch.log(1 - r_l + EPS))
        weight_l = class_weight[b_l]  # (N, K): the class weights of each pixel's image (0 where absent)
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
        n_labelled = labelled.sum().clamp(min=1)
        pixel_weight = valid.to(logits.dtype) / valid.sum().clamp(min=1)
        class_weight = present / (present.sum(1, keepdim=True) + EPS)
        _, dense_grads = _dense_functions(logits.device)
        grad_z, grad_r = _call_dense(dense_grads, logits, res, pixel_weight, g_cls * absent,
                                     0.5 * g_l1 * class_weight)

        b_l, y_l, x_l = labelled.nonzero(as_tuple=True)
        target_l = mask[b_l, y_l, x_l]
        p_l = torch.softmax(logits[b_l, :, y_l, x_l], dim=1)  # (N, K)
        onehot_l = F.one_hot(target_l, k).to(p_l.dtype)
        grad_z[b_l, :, y_l, x_l] += (p_l - onehot_l) * (g_seg / n_labelled)  # cross-entropy on labelled pixels
        r_l = _upsampled_at(res, b_l, y_l, x_l, logits.shape[-2:])
        dbce2 = -onehot_l / (r_l + EPS) + (1 - onehot_l) / (1 - r_l + EPS)
        grad_r[b_l, :, y_l, x_l] += (0.5 * g_l2 / n_labelled) * class_weight[b_l] * dbce2
        # grad_r is 0 for absent classes already (coef_l1 and class_weight[b_l] are), as with r * present
        return grad_z, _upsample_adjoint(grad_r, res.shape[-2:]), None, None, None


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
