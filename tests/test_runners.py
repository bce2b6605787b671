import numpy as np
import pytest
import torch

from agmm_deploy.checkpoint import save_checkpoint
from agmm_deploy.export.onnx import export_onnx
from agmm_deploy.contract import ModelMeta
from agmm_deploy.model import DeepLabV3Plus, ModelConfig
from agmm_deploy.inference import batch_image_scores, image_scores, segment_image, segment_images
from agmm_deploy.runtime import load_runner
from agmm_deploy.runtime.ort import OnnxRunner
from agmm_deploy.runtime.pytorch import TorchRunner
from agmm_deploy.transforms import SLIDING_OVERLAP, normalize


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("runners")
    model = DeepLabV3Plus(ModelConfig(backbone="resnet18", num_classes=5)).eval()
    meta = ModelMeta.for_dataset("folder", (48, 64), classes=tuple("abcde"))
    ckpt = save_checkpoint(folder / "tiny.pt", model, meta)
    # A fixed batch of 1: the runner must split larger batches itself.
    onnx_path = export_onnx(model, meta, folder / "model.onnx", height=48, width=64, dynamic_batch=False).path
    return ckpt, onnx_path


def test_load_runner_picks_the_backend_and_attributes_agree(artifacts):
    ckpt, onnx_path = artifacts
    torch_runner, onnx_runner = load_runner(ckpt, device="cpu"), load_runner(onnx_path, device="cpu")
    assert isinstance(torch_runner, TorchRunner) and isinstance(onnx_runner, OnnxRunner)
    assert (torch_runner.backend, onnx_runner.backend) == ("pytorch", "onnxruntime-cpu")
    assert onnx_runner.session.get_providers() == ["CPUExecutionProvider"]
    assert torch_runner.meta == onnx_runner.meta
    assert torch_runner.input_size == onnx_runner.input_size == (48, 64)
    assert onnx_runner.precision == "fp32" and onnx_runner.max_batch == 1 and not onnx_runner.dynamic_hw


def test_same_call_same_logits_with_batch_splitting(artifacts):
    ckpt, onnx_path = artifacts
    x = np.random.default_rng(0).standard_normal((3, 3, 48, 64)).astype(np.float32)
    # The CPU: the fp32 tolerance below is not met by TF32 convolutions, which PyTorch allows by default on GPUs.
    a, b = load_runner(ckpt, device="cpu")(x), load_runner(onnx_path, device="cpu")(x)
    assert a.shape == b.shape == (3, 5, 48, 64) and b.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)


def test_wrong_input_shapes_are_refused_with_the_fix(artifacts):
    _, onnx_path = artifacts
    runner = load_runner(onnx_path)
    with pytest.raises(ValueError, match=r"exported for 48x64 inputs; got 64x64. Letterbox or tile"):
        runner(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match=r"expects normalised float32 images shaped \(N, 3, H, W\); got \(48, 64, 3\)"):
        runner(np.zeros((48, 64, 3), np.float32))


def _count_calls(runner):
    """Records the batch size of every chunk the runner really runs (the real _run still does the work)."""
    sizes = []
    run = runner._run

    def counting(images):
        sizes.append(len(images))
        return run(images)

    runner._run = counting
    return sizes


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_segment_image_letterboxes_small_images(artifacts):
    _, onnx_path = artifacts
    runner = load_runner(onnx_path)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)
    labels = segment_image(runner, small)
    assert labels.shape == (30, 20) and labels.dtype == np.uint8 and labels.max() < 5
    # A tile-sized image is one call: letterboxing changes nothing and the direct call agrees.
    exact = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    direct = runner(normalize(exact, runner.meta.mean, runner.meta.std))[0].argmax(0)
    np.testing.assert_array_equal(segment_image(runner, exact), direct)


def test_large_images_average_the_softmax_of_official_sliding_tiles(artifacts):
    _, onnx_path = artifacts
    runner = load_runner(onnx_path)  # max_batch 1: one tile per call
    sizes = _count_calls(runner)
    large = np.random.default_rng(1).integers(0, 255, (100, 150, 3), dtype=np.uint8)
    scores = image_scores(runner, large)
    # Default overlap 2/3: strides ceil(48/3) = 16 and ceil(64/3) = 22 -> 5 rows x 5 columns, each tile once.
    assert SLIDING_OVERLAP == pytest.approx(2 / 3)
    assert sizes == [1] * 25
    # Brute force: every tile through the model, softmax, summed and divided by the cover count.
    total, count = np.zeros((5, 100, 150)), np.zeros((100, 150))
    ys = [0, 16, 32, 48, 52]
    xs = [0, 22, 44, 66, 86]
    for y in ys:
        for x in xs:
            tile = large[y:y + 48, x:x + 64]
            total[:, y:y + 48, x:x + 64] += _softmax(runner(normalize(tile, runner.meta.mean, runner.meta.std))[0], 0)
            count[y:y + 48, x:x + 64] += 1
    assert scores.shape == (5, 100, 150) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, total / count, rtol=1e-5, atol=1e-6)
    # An image larger along one axis only: one row of tiles, padded at the bottom, cropped back.
    wide = large[:30]
    wide_scores = image_scores(runner, wide)
    assert wide_scores.shape == (5, 30, 150)
    np.testing.assert_allclose(wide_scores.sum(0), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match=r"overlap=1.0 is invalid; expected 0 <= overlap < 1"):
        image_scores(runner, large[:10, :10], overlap=1.0)


def test_batch_image_scores_runs_all_images_together_in_max_batch_chunks(artifacts):
    ckpt, _ = artifacts
    runner = load_runner(ckpt, max_batch=4)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((30, 20, 3), (100, 150, 3), (48, 64, 3))]
    alone = [image_scores(runner, image) for image in images]
    sizes = _count_calls(runner)
    together = batch_image_scores(runner, images)
    assert sizes == [4] * 6 + [3]  # 1 letterbox + 25 tiles + 1 letterbox = 27 inputs, 4 at a time
    for a, b in zip(alone, together):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"image 1 is \(4, 4\) uint8; expected a uint8 RGB array \(H, W, 3\)"):
        batch_image_scores(runner, [images[0], np.zeros((4, 4), np.uint8)])


def test_segment_images_is_the_argmax_of_the_scores(artifacts):
    _, onnx_path = artifacts
    runner = load_runner(onnx_path)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((30, 20, 3), (100, 150, 3))]
    labels = segment_images(runner, images)  # letterboxed (no softmax taken) and tiled
    for image, label, scores in zip(images, labels, batch_image_scores(runner, images)):
        assert label.shape == image.shape[:2] and label.dtype == np.uint8
        assert (label == scores.argmax(axis=0)).mean() > 0.999


def test_load_runner_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model .*missing.onnx does not exist"):
        load_runner(tmp_path / "missing.onnx")
    odd = tmp_path / "model.bin"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match="cannot tell the format of .*model.bin from its suffix '.bin'"):
        load_runner(odd)
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"x")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"running the TensorRT engine model.engine needs .*(TensorRT|GPU)"):
            load_runner(engine)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_asked_for_without_a_gpu(artifacts):
    with pytest.raises(RuntimeError, match="device='cuda' was asked for, but torch.cuda.is_available\\(\\) is False"):
        load_runner(artifacts[1], device="cuda")


def test_run_takes_and_returns_tensors_on_the_runner_device(artifacts):
    """run() is the tensor form of __call__: same logits, returned on runner.device (no host copy on a GPU).

    Whatever device this machine gives (auto): the assertions hold on the device load_runner reports."""
    ckpt, onnx_path = artifacts[0], artifacts[1]
    images = normalize(np.random.default_rng(3).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8),
                       (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for path in (ckpt, onnx_path):
        runner = load_runner(path)
        assert runner.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
        logits = runner.run(torch.from_numpy(images))
        assert isinstance(logits, torch.Tensor) and logits.device == runner.device
        assert logits.dtype == torch.float32 and tuple(logits.shape) == (2, 5, 48, 64)
        # Two calls on a GPU may pick different convolution algorithms: equal up to rounding.
        np.testing.assert_allclose(logits.cpu().numpy(), runner(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expects normalised float32 images shaped \(N, 3, H, W\)"):
        runner.run(torch.zeros(2, 48, 64, 3))
