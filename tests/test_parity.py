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
    assert gates_for("fp32") == DEFAULT_GATES["fp32"]
    tight = gates_for("fp16", atol=0.0)
    assert tight.atol == 0.0 and tight.rtol == 0.0 and tight.min_agreement == 0.99
    assert gates_for("fp32", min_agreement=1.0).min_agreement == 1.0
    assert Gates().override(max_miou_delta=None) == Gates()
    with pytest.raises(ValueError, match="precision='fp8' has no parity gates"):
        gates_for("fp8")


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
