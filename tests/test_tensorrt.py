"""TensorRT engines: built, run and checked for parity. Needs TensorRT and a CUDA GPU (skipped elsewhere)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from agmm_deploy.checkpoint import save_checkpoint
from agmm_deploy.contract import read_engine_sidecar
from agmm_deploy.export.onnx import export_onnx
from agmm_deploy.export.parity import check_parity, generated_images
from agmm_deploy.contract import ModelMeta
from agmm_deploy.model import DeepLabV3Plus, ModelConfig
from agmm_deploy.runtime import load_runner
from agmm_deploy.runtime.pytorch import TorchRunner
from agmm_deploy.runtime.trt import TensorRTRunner
from agmm_deploy.transforms import normalize

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("trt")
    model = DeepLabV3Plus(ModelConfig(backbone="resnet18", num_classes=19))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 128))
    model.eval()
    meta = ModelMeta.for_dataset("cityscapes", (64, 128))
    ckpt = save_checkpoint(folder / "tiny.pt", model, meta)
    onnx_path = export_onnx(model, meta, folder / "model.onnx", height=64, width=128, max_batch=4).path
    images = normalize(generated_images(meta, 4, (64, 128)), meta.mean, meta.std)
    return folder, ckpt, onnx_path, images


@pytest.fixture
def strict_fp32():
    """The reference in strict fp32, as agmm-export makes it: PyTorch allows TF32 convolutions on GPUs by default."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("precision, min_agreement", [("fp32", 0.999), ("fp16", 0.99)])
def test_engine_builds_runs_and_meets_the_gates(setup, strict_fp32, precision, min_agreement):
    from agmm_deploy.export.tensorrt import build_engine

    folder, ckpt, onnx_path, images = setup
    built = build_engine(onnx_path, folder / f"{precision}.engine", precision=precision, max_batch=4)
    assert built.max_shape == (4, 3, 64, 128) and built.path.stat().st_size > 0
    meta, fields = read_engine_sidecar(built.path)
    assert meta.input_size == (64, 128) and fields["precision"] == precision and "tensorrt" in fields["versions"]
    runner = load_runner(built.path)
    assert isinstance(runner, TensorRTRunner) and runner.backend == "tensorrt" and runner.max_batch == 4
    logits = runner(images[:3])
    assert logits.shape == (3, 19, 64, 128) and logits.dtype == np.float32
    result = check_parity(TorchRunner(ckpt, "cuda"), [runner], images, batch_size=2)
    assert result.passed, result.table()
    assert result.backends[0].argmax_agreement >= min_agreement


def test_int8_calibration_writes_and_reuses_the_cache(setup, tmp_path):
    from agmm_deploy.export.tensorrt import build_engine

    folder, _, onnx_path, images = setup
    cache = tmp_path / "calibration.cache"
    build_engine(onnx_path, tmp_path / "int8.engine", precision="int8", calib_images=images, calib_batch=2,
                 calib_cache=cache)
    assert cache.is_file() and cache.stat().st_size > 0
    built = build_engine(onnx_path, tmp_path / "int8b.engine", precision="int8", calib_cache=cache)
    assert built.precision == "int8" and load_runner(built.path)(images[:1]).shape == (1, 19, 64, 128)


def test_cli_trt_writes_engine_sidecar_and_parity_row(setup, tmp_path, capsys):
    from agmm_deploy.cli.export import main

    folder, ckpt, _, _ = setup
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, image in enumerate(generated_images(ModelMeta.for_dataset("cityscapes", (64, 128)), 4, (64, 128))):
        Image.fromarray(image).save(calib / f"{i}.png")
    assert main([str(ckpt), "--trt", "--precision", "fp16", "--out", str(tmp_path / "out"), "--max-batch", "4"]) == 0
    out = tmp_path / "out"
    assert (out / "model.engine").is_file() and (out / "model.engine.json").is_file()
    backends = [b["backend"] for b in json.loads((out / "parity.json").read_text())["backends"]]
    assert backends[-1] == "tensorrt" and "tensorrt" in capsys.readouterr().out
    assert main([str(ckpt), "--trt", "--precision", "int8", "--calib-images", str(calib), "--out", str(tmp_path / "q"),
                 "--parity-images", str(calib)]) == 0  # unlabelled: the int8 mIoU gate is "not checked"
    assert (tmp_path / "q" / "calibration.cache").is_file()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_each_tensorrt_row_of_the_precision_table_writes_its_engine(setup, tmp_path, precision):
    """One test per row: convert_precision(runtime="tensorrt") builds model.engine + sidecar at the row's
    precision, as `agmm-export --runtime tensorrt --precision P` (and its short form --trt) does."""
    from agmm_deploy.export.precision import convert_precision, get_precision

    _, _, onnx_path, images = setup
    row = get_precision(precision, "tensorrt", "cuda")
    written = convert_precision(onnx_path, tmp_path / row.file_name, precision, images if row.calibrated else None,
                                runtime="tensorrt", device="cuda")
    assert (written.path.name, written.precision, written.runtime, written.device) == (
        "model.engine", precision, "tensorrt", "cuda")
    _, fields = read_engine_sidecar(written.path)
    assert fields["precision"] == precision
    assert load_runner(written.path)(images[:1]).shape == (1, 19, 64, 128)
    if row.calibrated:
        assert (tmp_path / "calibration.cache").is_file()


def test_cli_runtime_tensorrt_is_what_trt_is_short_for(setup, tmp_path):
    from agmm_deploy.cli.export import main

    _, ckpt, _, _ = setup
    assert main([str(ckpt), "--runtime", "tensorrt", "--precision", "fp16", "--out", str(tmp_path / "a")]) == 0
    assert main([str(ckpt), "--trt", "--precision", "fp16", "--out", str(tmp_path / "b")]) == 0
    for out in ("a", "b"):
        assert read_engine_sidecar(tmp_path / out / "model.engine")[1]["precision"] == "fp16"
