"""The vectorised AGMM loss against the official loop formulation (training/reference_losses.py), in float64."""

import pytest
import torch

from training import losses
from training.losses import AGMMLoss, agmm_losses, partial_ce_losses
from training.reference_losses import official_loop_losses


def make_case(seed, b=2, k=5, c=8, h=5, w=6, big=(19, 23), label_fraction=0.12, pad=True, no_labels=False):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    logits = 2 * torch.randn(b, k, *big, generator=g, dtype=torch.float64)
    classes = torch.randint(0, k, (b, *big), generator=g)
    clicked = torch.rand(b, *big, generator=g) < label_fraction
    mask = torch.where(clicked, classes, torch.full_like(classes, k))
    if no_labels:
        mask.fill_(k)
    if pad:  # crop padding on the bottom rows of image 0 and the right columns of image 1
        mask[0, -4:] = 255
        mask[-1, :, -5:] = 255
    # cls_label: classes in the crop plus, at random, classes clicked only outside the crop
    cls_label = torch.zeros(b, k, dtype=torch.float64)
    for i in range(b):
        for cl in mask[i].unique().tolist():
            if cl < k:
                cls_label[i, cl] = 1
    cls_label = torch.maximum(cls_label, (torch.rand(b, k, generator=g) < 0.3).to(torch.float64))
    return feat, logits, mask, cls_label


CASES = [
    dict(seed=0),
    dict(seed=1, b=3, k=7, c=16, h=7, w=9, big=(28, 36)),  # integer scale factor 4, as the model
    dict(seed=2, label_fraction=0.02),  # few clicks: some classes present in one image only
    dict(seed=3, pad=False, label_fraction=0.5),
    dict(seed=4, b=1, k=3, label_fraction=0.01),  # possibly a single class: no prototype pairs
    dict(seed=5, no_labels=True),  # no labelled pixel in the batch
]


@pytest.mark.parametrize("case", CASES)
def test_matches_loop_reference_values_and_gradients(case):
    feat, logits, mask, cls_label = make_case(**case)
    k = logits.shape[1]
    feat_a, logits_a = feat.clone().requires_grad_(), logits.clone().requires_grad_()
    feat_b, logits_b = feat.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = agmm_losses(feat_a, logits_a, mask, cls_label, k)
    ref = official_loop_losses(feat_b, logits_b, mask, cls_label, k)
    for key in ("seg", "cls", "proto", "gmm", "total"):
        assert ours[key].shape == ()
        assert torch.isfinite(ours[key]), key
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-10, atol=1e-12, msg=f"term {key}")
    # gradients of a generic combination, so that every term's gradient is checked
    weights = {"seg": 0.7, "cls": 1.3, "proto": 2.1, "gmm": 0.9}
    sum(weights[key] * ours[key] for key in weights).backward()
    sum(weights[key] * ref[key] for key in weights).backward()
    torch.testing.assert_close(logits_a.grad, logits_b.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(feat_a.grad, feat_b.grad, rtol=1e-9, atol=1e-12)
    assert feat_a.grad.abs().sum() > 0 or case.get("no_labels")


def test_no_labelled_pixel_gives_finite_loss_and_zero_sparse_terms():
    feat, logits, mask, cls_label = make_case(seed=5, no_labels=True)
    feat.requires_grad_()
    logits.requires_grad_()
    out = agmm_losses(feat, logits, mask, cls_label, logits.shape[1])
    assert out["seg"].item() == 0.0 and out["proto"].item() == 0.0 and out["gmm"].item() == 0.0
    assert out["cls"].item() > 0  # unlabelled pixels still learn "not an absent class"
    out["total"].backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(feat.grad).all()


def test_distance_chunks_do_not_change_the_result(monkeypatch):
    feat, logits, mask, cls_label = make_case(seed=1, b=3, k=7, c=16, h=7, w=9, big=(28, 36))
    feat.requires_grad_()
    whole = agmm_losses(feat, logits, mask, cls_label, 7)
    (grad_whole,) = torch.autograd.grad(whole["total"], feat)
    monkeypatch.setattr(losses, "DISTANCE_CHUNK_ELEMENTS", 3 * 7 * 16 * 5)  # 5 pixels per tile: 13 tiles
    chunked = agmm_losses(feat, logits, mask, cls_label, 7)
    (grad_chunked,) = torch.autograd.grad(chunked["total"], feat)
    torch.testing.assert_close(chunked["total"], whole["total"], rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=1e-10, atol=1e-14)


def test_seg_term_equals_partial_ce_baseline_and_module_wraps_function():
    feat, logits, mask, cls_label = make_case(seed=0)
    ours = AGMMLoss(5)(feat, logits, mask, cls_label)
    ce = partial_ce_losses(logits, mask, 5)
    torch.testing.assert_close(ours["seg"], ce["seg"])
    torch.testing.assert_close(ce["total"], ce["seg"])
    empty = partial_ce_losses(logits, torch.full_like(mask, 5), 5)
    assert empty["seg"].item() == 0.0


def test_float32_and_autocast_inputs_follow_float64():
    feat, logits, mask, cls_label = make_case(seed=3, pad=False, label_fraction=0.5)
    exact = agmm_losses(feat, logits, mask, cls_label, 5)
    single = agmm_losses(feat.float(), logits.float(), mask, cls_label.float(), 5)
    assert single["total"].dtype == torch.float32
    torch.testing.assert_close(single["total"].double(), exact["total"], rtol=1e-5, atol=1e-6)
    half = agmm_losses(feat.bfloat16(), logits.bfloat16(), mask, cls_label, 5)
    assert half["total"].dtype == torch.float32  # computed in fp32 whatever the network's precision
    torch.testing.assert_close(half["total"].double(), exact["total"], rtol=0.05, atol=0.05)


def test_shape_errors_name_the_shapes():
    feat, logits, mask, cls_label = make_case(seed=0)
    with pytest.raises(ValueError, match="num_classes=6"):
        agmm_losses(feat, logits, mask, cls_label, 6)
    with pytest.raises(ValueError, match="sparse_mask"):
        agmm_losses(feat, logits, mask[:, :-1], cls_label, 5)


@pytest.mark.gpu
def test_cuda_matches_cpu_in_float64():
    feat, logits, mask, cls_label = make_case(seed=1, b=3, k=7, c=16, h=7, w=9, big=(28, 36))
    cpu = agmm_losses(feat, logits, mask, cls_label, 7)
    gpu = agmm_losses(feat.cuda(), logits.cuda(), mask.cuda(), cls_label.cuda(), 7)
    for key in cpu:
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_compiled_pixel_terms_match_loop_reference(monkeypatch):
    # What CUDA runs (torch.compile of _dense_terms / _dense_grads), compiled here for the CPU (about a minute).
    monkeypatch.setattr(losses, "_dense_functions", lambda device: losses._compiled_dense())
    feat, logits, mask, cls_label = make_case(seed=1, b=3, k=7, c=16, h=7, w=9, big=(28, 36))
    feat_a, logits_a = feat.clone().requires_grad_(), logits.clone().requires_grad_()
    feat_b, logits_b = feat.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = agmm_losses(feat_a, logits_a, mask, cls_label, 7)
    ref = official_loop_losses(feat_b, logits_b, mask, cls_label, 7)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-10, atol=1e-12, msg=f"term {key}")
    ours["total"].backward()
    ref["total"].backward()
    torch.testing.assert_close(logits_a.grad, logits_b.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(feat_a.grad, feat_b.grad, rtol=1e-9, atol=1e-12)


def test_sparse_upsampling_equals_interpolate_at_the_pixels():
    g = torch.Generator().manual_seed(0)
    for small, big in [((5, 6), (19, 23)), ((7, 9), (28, 36)), ((181, 181), (721, 721))]:
        res = torch.rand(2, 3, *small, generator=g, dtype=torch.float64)
        b_l = torch.randint(0, 2, (500,), generator=g)
        y_l, x_l = torch.randint(0, big[0], (500,), generator=g), torch.randint(0, big[1], (500,), generator=g)
        y_l[:2], x_l[:2] = torch.tensor([0, big[0] - 1]), torch.tensor([0, big[1] - 1])  # both clamped edges
        full = torch.nn.functional.interpolate(res, size=big, mode="bilinear", align_corners=False)
        torch.testing.assert_close(losses._upsampled_at(res, b_l, y_l, x_l, big), full[b_l, :, y_l, x_l],
                                   rtol=1e-12, atol=1e-14)
