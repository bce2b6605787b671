import json

import numpy as np
import pytest
from PIL import Image

from agmm_deploy.export.parity import (DEFAULT_GATES, Gates, check_parity, gates_for, generated_images,
                                       load_parity_images)
from agmm_deploy.contract import ModelMeta

META = ModelMeta.for_dataset("folder", (8, 8), classes=("a", "b", "c"))


class ArrayRunner:
    """A stand-in backend: fixed logits per image index, shifted by ``noise``; exercises check_parity only."""

    def __init__(self, logits, backend="pytorch", precision="fp32", noise=0.0, seed=0):
        self.logits, self.backend, self.precision, self.meta = logits, backend, precision, META
        self.noise, self.rng, self.calls = noise, np.random.default_rng(seed), []

    def __call__(self, images):
        idx = images[:, 0, 0, 0].astype(int)  # each image carries its index in pixel (0, 0)
        self.calls.append(len(images))
        out = self.logits[idx]
        return out + self.noise * self.rng.standard_normal(out.shape).astype(np.float32)


def _data(n=4):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((n, 3, 8, 8)).astype(np.float32) * 4
    images = np.zeros((n, 3, 8, 8), np.float32)
    images[:, 0, 0, 0] = np.arange(n)
    return images, logits


def test_identical_backend_passes_fp32_gates_and_batches():
    images, logits = _data()
    onnx = ArrayRunner(logits, "onnxruntime-cpu")
    result = check_parity(ArrayRunner(logits), [onnx], images, batch_size=3)
    assert onnx.calls == [3, 1]
    (b,) = result.backends
    assert result.passed and b.passed and b.allclose and b.max_abs_diff == 0 and b.argmax_agreement == 1
    assert b.unchecked == ["mIoU delta <= 0.1 needs labelled --parity-images"]
    assert "PASS" in result.table() and "parity PASSED" in result.table()


def test_noisy_backend_fails_fp32_but_passes_int8():
    images, logits = _data()
    noisy32 = ArrayRunner(logits, "onnxruntime-cpu", noise=0.5)
    noisy8 = ArrayRunner(logits, "tensorrt", precision="int8", noise=0.5)
    result = check_parity(ArrayRunner(logits), [noisy32, noisy8], images)
    fp32, int8 = result.backends
    assert not result.passed and not fp32.passed and int8.passed
    assert fp32.allclose is False and any("not allclose" in f for f in fp32.failures)
    assert any("argmax agreement" in f for f in fp32.failures) and 0 < fp32.argmax_agreement < 0.999
    table = result.table()
    assert "FAIL onnxruntime-cpu fp32: logits not allclose" in table and "parity FAILED" in table


def test_miou_per_backend_and_delta_with_labels(tmp_path):
    images, logits = _data()
    labels = logits.argmax(1).astype(np.uint8)
    labels[:, :2] = 255  # ignored rows
    flipped = logits.copy()
    flipped[0] = -flipped[0]  # one image predicted differently
    result = check_parity(ArrayRunner(logits), [ArrayRunner(flipped, "tensorrt", precision="int8")], images, labels)
    (b,) = result.backends
    assert result.reference_miou == pytest.approx(100.0)
    assert b.miou < 100 and b.miou_delta == pytest.approx(b.miou - 100.0)
    assert not b.passed and "|mIoU delta|" in b.failures[0]  # int8 allows 1.0 point
    data = json.loads(result.write_json(tmp_path / "parity.json").read_text())
    assert data["passed"] is False and data["labelled"] is True
    assert data["backends"][0]["miou_delta"] == pytest.approx(b.miou_delta)
    assert data["backends"][0]["gates"]["max_miou_delta"] == 1.0


def test_gate_overrides():
    assert gates_for("fp32") == DEFAULT_GATES["fp32"] and DEFAULT_GATES["fp32"].atol_rel == 1e-5
    tight = gates_for("fp16", atol=0.0)
    assert tight.atol == 0.0 and tight.rtol == 0.0 and tight.min_agreement == 0.99 and not tight.atol_rel
    # --atol / --rtol ask for numpy's allclose: the scale term drops out unless it is given as well
    assert gates_for("fp32", atol=1e-3) == Gates(rtol=1e-3, atol=1e-3, atol_rel=0.0, min_agreement=0.999,
                                                 max_miou_delta=0.1)
    assert gates_for("fp32", rtol=1e-2).atol_rel == 0.0 and gates_for("fp32", rtol=0, atol_rel=2e-5).atol_rel == 2e-5
    assert gates_for("fp32", min_agreement=1.0).min_agreement == 1.0
    assert Gates().override(max_miou_delta=None) == Gates()
    with pytest.raises(ValueError, match="precision='fp8' has no parity gates"):
        gates_for("fp8")


def test_fp32_tolerance_scales_with_each_images_largest_logit(tmp_path):
    """A 3e-3 error at a logit near 0 is fp32 rounding in a map whose logits reach ~1000, but not in one whose
    logits reach ~10: the scale term is per image, and --atol alone brings back plain allclose."""
    images, logits = _data(2)
    logits[0] *= 100  # image 0: logits up to ~|1000|; image 1 stays at ~|10|
    small = np.unravel_index(np.abs(logits[0]).argmin(), logits[0].shape)
    shifted = logits.copy()
    shifted[0][small] += 3e-3  # under 1e-4 + 1e-5 * ~1000 (plus rtol * ~0)
    result = check_parity(ArrayRunner(logits), [ArrayRunner(shifted, "onnxruntime-cpu")], images)
    (b,) = result.backends
    assert b.passed and b.allclose and 0.1 < b.tolerance_used <= 1, result.table()
    assert "0.0001 + 1e-05 * max|ref| of the image + 0.001 * |ref|" in result.table()
    data = json.loads(result.write_json(tmp_path / "parity.json").read_text())
    assert data["backends"][0]["gates"]["atol_rel"] == 1e-5 and data["reference_abs_max"] > 200
    assert data["backends"][0]["tolerance_used"] == pytest.approx(b.tolerance_used)

    plain = check_parity(ArrayRunner(logits), [ArrayRunner(shifted, "onnxruntime-cpu")], images,
                         gates={"fp32": gates_for("fp32", atol=1e-4)})
    assert not plain.passed and plain.backends[0].tolerance_used > 2
    assert "logits not allclose (rtol=0.001, atol=0.0001); max|diff| = 3.000e-03" in plain.backends[0].failures[0]

    shifted = logits.copy()
    small = np.unravel_index(np.abs(logits[1]).argmin(), logits[1].shape)
    shifted[1][small] += 3e-3  # the same error in the image whose logits reach only ~|10|
    result = check_parity(ArrayRunner(logits), [ArrayRunner(shifted, "onnxruntime-cpu")], images)
    (b,) = result.backends
    assert not b.passed and b.allclose is False and b.tolerance_used > 2
    assert "atol_rel=1e-05 of max|ref| per image" in b.failures[0] and "the tolerance at the worst logit" in \
        b.failures[0]


def test_zero_tolerance_means_equality_and_stays_strict_json(tmp_path):
    images, logits = _data(2)
    shifted = logits.copy()
    shifted[0, 0, 0, 0] += 1e-6
    result = check_parity(ArrayRunner(logits), [ArrayRunner(shifted, "onnxruntime-cpu"),
                                                ArrayRunner(logits, "onnxruntime-cpu")], images,
                          gates={"fp32": gates_for("fp32", atol=0, rtol=0)})
    differs, same = result.backends
    assert not differs.passed and differs.tolerance_used is None and "inf x the tolerance" in differs.failures[0]
    assert "logits not allclose (rtol=0, atol=0); " in differs.failures[0]
    assert same.passed and same.tolerance_used == 0
    assert "NO (inf)" in result.table()
    json.loads(result.write_json(tmp_path / "parity.json").read_text())


def test_labels_without_class_pixels_leave_the_miou_unchecked(tmp_path):
    """All-255 labels score nothing: mIoU is undefined (not 0 for both sides, which would pass any gate)."""
    images, logits = _data()
    labels = np.full((4, 8, 8), 255, np.uint8)
    flipped = -logits
    result = check_parity(ArrayRunner(logits), [ArrayRunner(flipped, "tensorrt", precision="int8")], images, labels)
    (b,) = result.backends
    assert result.reference_miou is None and b.miou is None and b.miou_delta is None
    assert b.unchecked == ["mIoU delta <= 1 needs labels with class pixels (these hold only 255 / unlabelled "
                           "pixels)"]
    data = json.loads(result.write_json(tmp_path / "parity.json").read_text())  # strict JSON: no NaN
    assert data["reference_miou"] is None


def test_generated_images_are_seeded():
    a = generated_images(META, 2, (32, 48), seed=0)
    assert a.shape == (2, 32, 48, 3) and a.dtype == np.uint8 and a.std() > 20
    np.testing.assert_array_equal(a, generated_images(META, 2, (32, 48), seed=0))


def test_load_parity_images_layout(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((16, 32, 3), 200, np.uint8)).save(tmp_path / "images" / f"{name}.jpg")
        Image.fromarray(np.full((16, 32), 2, np.uint8)).save(tmp_path / "labels" / f"{name}.png")
    images, labels, paths = load_parity_images(tmp_path, META, (8, 8))
    assert images.shape == (2, 3, 8, 8) and images.dtype == np.float32
    assert [p.name for p in paths] == ["a.jpg", "b.jpg"]
    # 16x32 letterboxed into 8x8 -> 4x8 image on top, label padding is 255
    assert (labels[:, :4] == 2).all() and (labels[:, 4:] == 255).all()
    (tmp_path / "labels" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks labels for 1 image\(s\), e.g. \['b.png'\]"):
        load_parity_images(tmp_path, META, (8, 8))
    with pytest.raises(FileNotFoundError, match="holds no images"):
        load_parity_images(tmp_path / "labels" / "nowhere", META, (8, 8))


# ---------------------------------------------------------------- a real fp32 export at a large logit scale

@pytest.fixture(scope="module")
def large_logit_export(tmp_path_factory):
    """A ResNet-18 DeepLabV3+ whose classifier is scaled so its logits reach ~|400| (what a briefly trained R50
    reaches), exported to ONNX: (PyTorch reference runner, model.onnx, normalised images)."""
    import torch

    from agmm_deploy.export.onnx import export_onnx
    from agmm_deploy.model import DeepLabV3Plus, ModelConfig
    from agmm_deploy.runtime.pytorch import TorchRunner
    from agmm_deploy.transforms import normalize

    meta = ModelMeta.for_dataset("cityscapes", (64, 64))
    torch.manual_seed(0)
    model = DeepLabV3Plus(ModelConfig(backbone="resnet18", num_classes=19))
    images = normalize(generated_images(meta, 4, (64, 64)), meta.mean, meta.std)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))  # training-mode pass: non-trivial BN statistics
        model.eval()
        scale = 400 / model(torch.from_numpy(images)).abs().max()
        model.classifier.weight.mul_(scale)
        model.classifier.bias.mul_(scale)
    path = tmp_path_factory.mktemp("large") / "model.onnx"
    export_onnx(model, meta, path, height=64, width=64)
    return TorchRunner(path, "cpu", model=model, meta=meta), path, images


def test_a_real_fp32_export_passes_at_large_logits(large_logit_export, tmp_path):
    """ONNX Runtime sums fp32 convolutions in another order than PyTorch: its errors follow the logits' scale."""
    from agmm_deploy.export.parity import check_artifacts

    reference, path, images = large_logit_export
    result = check_artifacts(reference, [path], images, device="cpu", batch_size=2)
    (b,) = result.backends
    assert result.reference_abs_max == pytest.approx(400, rel=0.01)
    assert result.passed and b.allclose and b.argmax_agreement == 1, result.table()
    assert 0 < b.tolerance_used <= 1 and b.max_abs_diff > 0


def test_an_export_with_its_classifier_rounded_to_fp16_fails_the_fp32_gate(large_logit_export, tmp_path):
    """A wrong export that argmax agreement alone may not see: allclose must."""
    import onnx
    from onnx import numpy_helper

    from agmm_deploy.export.parity import check_artifacts

    reference, path, images = large_logit_export
    model = onnx.load(str(path))
    (weight,) = [init for init in model.graph.initializer if init.name == "classifier.weight"]
    rounded = numpy_helper.to_array(weight).astype(np.float16).astype(np.float32)
    weight.CopyFrom(numpy_helper.from_array(rounded, weight.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    result = check_artifacts(reference, [tmp_path / "model.onnx"], images, device="cpu", batch_size=2)
    (b,) = result.backends
    assert not result.passed and b.allclose is False and b.tolerance_used > 2, result.table()
    assert b.failures[0].startswith("logits not allclose (rtol=0.001, atol=0.0001, atol_rel=1e-05 of max|ref| "
                                    "per image)")


@pytest.mark.parametrize("side", ["reference", "candidate"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_fail_whatever_the_tolerance(side, value, tmp_path):
    images, logits = _data()
    bad = logits.copy()
    bad[:, 0] = value  # a NaN classifier row: argmax is 0 everywhere, on both sides alike when both are NaN
    reference, candidate = (bad, logits) if side == "reference" else (logits, bad)
    result = check_parity(ArrayRunner(reference), [ArrayRunner(candidate, "onnxruntime-cpu")], images,
                          gates={"fp32": gates_for("fp32", atol=1e30, rtol=1e30, min_agreement=0.0)})
    b = result.backends[0]
    who = "the reference (pytorch)" if side == "reference" else "onnxruntime-cpu"
    assert not result.passed
    assert any(f.startswith(f"{who} logits hold 256 NaN/Inf value(s) of 768") for f in b.failures), b.failures
    assert np.isfinite(b.max_abs_diff) and np.isfinite(b.mean_abs_diff)
    json.loads(result.write_json(tmp_path / "parity.json").read_text())  # still strict JSON


def test_both_sides_nan_is_not_a_perfect_match():
    images, logits = _data()
    logits[:] = np.nan  # what an export of NaN weights gave: max|diff| 0, agreement 100 %, "PASSED"
    result = check_parity(ArrayRunner(logits), [ArrayRunner(logits, "onnxruntime-cpu")], images)
    assert not result.passed and "parity FAILED" in result.table()


def test_logits_beyond_the_sane_scale_fail_whatever_the_tolerance():
    images, logits = _data()
    huge = logits * 1e23  # weights scaled by 1e30 gave |logits| ~1e25 and passed at max|diff| 1.3e23
    noisy = huge * (1 + 1e-3)
    result = check_parity(ArrayRunner(huge), [ArrayRunner(noisy, "onnxruntime-cpu")], images)
    failures = result.backends[0].failures
    assert not result.passed
    assert any("logits reach |" in f and "beyond the sane scale 10000 (MAX_LOGIT)" in f for f in failures), failures


def test_a_label_png_claiming_a_huge_size_is_refused_from_its_header(tmp_path):
    import struct
    import zlib

    from agmm_deploy.transforms import ImageDecodeError

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    png = bytearray((tmp_path / "images" / "a.png").read_bytes())
    png[16:24] = struct.pack(">II", 30_000, 30_000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    (tmp_path / "labels" / "a.png").write_bytes(bytes(png))
    with pytest.raises(ImageDecodeError, match="a.png is 30000x30000 = 900000000 pixels, a decompression bomb"):
        load_parity_images(tmp_path, META, (8, 8))
