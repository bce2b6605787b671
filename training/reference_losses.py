"""The AGMM loss terms in the official formulation (train_city.py / model/tools.py), for tests and benchmarks.

``training.losses.agmm_losses`` is the one the training uses. This module writes the same terms the way the
official code computes them, so that ``tests/test_losses.py`` can check values and gradients against it and
``benchmarks/loss_speed.py`` can time it and measure its memory:

* the feature map upsampled to the crop, (B, C, H, W), for the prototypes;
* Python loops over images and classes (prototypes) and over class pairs (proto term);
* the GMM distances through the (B, K, C, h, w) broadcast of features against prototypes.

One deliberate difference: where no pixel qualifies for a mean (no labelled pixel in the batch), a term is 0
instead of the official NaN, as in ``agmm_losses``, so the two can be compared on such batches too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6  # inside the logs and denominators, as the official code


def _masked_mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``where``; 0 (still in the graph) when ``where`` is empty."""
    return values[where].mean() if where.any() else values.sum() * 0.0


def official_loop_losses(feat: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, cls_label: torch.Tensor,
                         num_classes: int) -> dict[str, torch.Tensor]:
    """seg, cls, proto and gmm terms and their sum, computed as the official code does.

    Args:
        feat: decoder features (B, C, h, w), h = H/4.
        logits: (B, K, H, W).
        mask: cropped sparse label (B, H, W): class id, K (unlabelled) or 255 (crop padding).
        cls_label: (B, K), 1 for classes in the image's whole sparse label.
        num_classes: K.
    Returns:
        dict of scalar tensors: seg, cls, proto, gmm, total.
    """
    k = num_classes
    b, c, h, w = feat.shape
    big_h, big_w = mask.shape[-2:]
    dtype, device = feat.dtype, feat.device
    labelled = mask < k
    valid = mask != 255
    p = torch.softmax(logits, 1)

    # seg: cross-entropy over labelled pixels (K and 255 ignored)
    seg_pix = -torch.log_softmax(logits, 1).gather(1, mask.clamp(max=k - 1).unsqueeze(1))[:, 0]
    seg = _masked_mean(seg_pix, labelled)

    # cls: pixels must not be classes absent from the image's label
    cls = _masked_mean((-(1 - cls_label[:, :, None, None]) * torch.log(1 - p + EPS)).sum(1), valid)

    # prototypes on the upsampled features: per image, per class clicked in the crop
    feat_up = F.interpolate(feat, size=(big_h, big_w), mode="bilinear", align_corners=False)  # (B, C, H, W)
    protos = torch.zeros(b, k, c, dtype=dtype, device=device)
    present = torch.zeros(b, k, dtype=dtype, device=device)
    for i in range(b):
        for cl in mask[i].unique().tolist():
            if cl < k:
                m = mask[i] == cl
                protos[i, cl] = feat_up[i][:, m].sum(1) / (m.sum().to(dtype) + EPS)  # int + 1e-6 would be float32
                present[i, cl] = 1

    # proto: class vectors summed over images, exp(-d^2) averaged over pairs of classes in the batch
    n_images = present.sum(0)[:, None]  # (K, 1)
    vecs = protos.sum(0) * n_images / (n_images + EPS)
    proto, pairs = torch.zeros((), dtype=dtype, device=device), 0
    for i in range(k):
        for j in range(i + 1, k):
            if n_images[i] > 0 and n_images[j] > 0:
                d = (vecs[i] - vecs[j]).abs().mean()
                proto = proto + torch.exp(-d * d)
                pairs += 1
    proto = proto / (pairs + EPS)

    # GMM response on the feature grid through the (B, K, C, h, w) broadcast, crop padding masked out
    keep = F.interpolate(valid.to(dtype)[:, None], size=(h, w), mode="bilinear", align_corners=False)
    distance = (feat[:, None] - protos[:, :, :, None, None]).abs().mean(2)  # (B, K, h, w)
    distance = distance * present[:, :, None, None] * keep
    res = F.interpolate(torch.exp(-distance * distance), size=(big_h, big_w), mode="bilinear",
                        align_corners=False) * present[:, :, None, None]  # (B, K, H, W)

    # gmm: BCE(p, res) over valid pixels + BCE(res, onehot) over labelled pixels, averaged over present classes
    onehot = torch.zeros(b, k + 1, big_h, big_w, dtype=dtype, device=device)
    onehot.scatter_(1, mask.clamp(max=k).unsqueeze(1), 1.0)
    onehot = onehot[:, :k]
    weight = present[:, :, None, None]
    norm = present.sum(1)[:, None, None] + EPS
    loss1 = -res * torch.log(p + EPS) - (1 - res) * torch.log(1 - p + EPS)
    loss2 = -onehot * torch.log(res + EPS) - (1 - onehot) * torch.log(1 - res + EPS)
    loss1 = (loss1 / 2 * weight).sum(1) / norm
    loss2 = (loss2 / 2 * weight).sum(1) / norm
    gmm = _masked_mean(loss1, valid) + _masked_mean(loss2, labelled)
    return {"seg": seg, "cls": cls, "proto": proto, "gmm": gmm, "total": seg + cls + proto + gmm}
