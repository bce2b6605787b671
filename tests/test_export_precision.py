"""Reduced-precision ONNX models without TensorRT: fp16 for onnxruntime-cuda, int8 (static, QDQ) for the CPU."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import requests
import torch
from PIL import Image

from agmm_deploy.checkpoint import save_checkpoint
from agmm_deploy.contract import ModelMeta, read_onnx_metadata
from agmm_deploy.export.onnx import export_onnx
from agmm_deploy.export.parity import generated_images
from agmm_deploy.export.precision import FP16_KEEP_FP32_OPS, convert_precision, cpu_has_vnni, get_precision
from agmm_deploy.model import DeepLabV3Plus, ModelConfig
from agmm_deploy.runtime import load_runner
from agmm_deploy.transforms import normalize

TINY = ModelConfig(backbone="resnet18", num_classes=19)
META = ModelMeta.for_dataset("cityscapes", (64, 64))
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def _has_ort_cuda() -> bool:
    import onnxruntime

    return torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = DeepLabV3Plus(TINY)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))  # non-trivial BN statistics
    model.eval()
    folder = tmp_path_factory.mktemp("precision")
    save_checkpoint(folder / "tiny.pt", model, META)
    export_onnx(model, META, folder / "model.onnx", height=64, width=64)
    images = folder / "images"
    images.mkdir()
    for i, image in enumerate(generated_images(META, 4, (64, 64))):
        Image.fromarray(image).save(images / f"{i}.png")
    return folder


def _images(n: int = 4) -> np.ndarray:
    return normalize(generated_images(META, n, (64, 64)), META.mean, META.std)


def test_fp16_keeps_io_and_sensitive_ops_in_fp32(model_dir, tmp_path):
    result = convert_precision(model_dir / "model.onnx", tmp_path / "model.fp16.onnx", "fp16")
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    graph = onnx.shape_inference.infer_shapes(model).graph
    assert [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)] == [FLOAT, FLOAT]
    weights = Counter(t.data_type for t in graph.initializer if len(t.dims) == 4)  # conv kernels
    assert set(weights) == {FLOAT16}
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    kept = [n for n in graph.node if n.op_type in FP16_KEEP_FP32_OPS]
    assert kept and all(types.get(n.input[0]) == FLOAT and types.get(n.output[0]) == FLOAT for n in kept)
    _, fields = read_onnx_metadata(result.path)
    assert (fields["precision"], fields["device"], fields["source_onnx"]) == ("fp16", "cuda", "model.onnx")


def test_int8_is_qdq_with_per_channel_weights_and_runs_on_the_cpu(model_dir, tmp_path):
    result = convert_precision(model_dir / "model.onnx", tmp_path / "model.int8.onnx", "int8", _images(),
                               runtime="onnxruntime")
    graph = onnx.load(str(result.path)).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    int8_kernels = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    scales = {t.name: len(t.float_data) or t.dims[0] if t.dims else 1 for t in graph.initializer}
    dequantize = {n.input[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    assert int8_kernels and all(scales[dequantize[t.name].input[1]] == t.dims[0] for t in int8_kernels)
    runner = load_runner(result.path)  # auto: the device it was made for
    assert (runner.backend, runner.precision, runner.device.type) == ("onnxruntime-cpu", "int8", "cpu")
    fp32 = load_runner(model_dir / "model.onnx", device="cpu")
    x = _images(2)
    assert (runner(x).argmax(1) == fp32(x).argmax(1)).mean() > 0.9
    _, fields = read_onnx_metadata(result.path)
    assert fields["calibration_images"] == 4 and fields["device"] == "cpu"
    # 7-bit weights on a CPU without VNNI (no int16 saturation in ONNX Runtime's AVX2 kernels), 8-bit with it.
    bits = 8 if cpu_has_vnni() else 7
    assert fields["int8_weight_bits"] == bits
    weights = np.concatenate([onnx.numpy_helper.to_array(t).ravel() for t in int8_kernels]).astype(int)
    assert 2 ** (bits - 2) < np.abs(weights).max() <= 2 ** (bits - 1)  # 7 bits: -64..64


def test_unknown_precisions_and_missing_calibration_are_refused(model_dir, tmp_path):
    with pytest.raises(ValueError, match="precision 'bf16' has no onnxruntime artifact; it has aoti, openvino"):
        get_precision("bf16", "onnxruntime")
    with pytest.raises(ValueError, match="int8 needs calibration images"):
        convert_precision(model_dir / "model.onnx", tmp_path / "m.onnx", "int8", runtime="onnxruntime")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_int8_export_passes_its_gate_and_a_forced_failure_sets_both_aside(model_dir, tmp_path, capsys):
    from agmm_deploy.cli.export import main

    argv = [str(model_dir / "tiny.pt"), "--precision", "int8", "--runtime", "onnxruntime", "--calib-images",
            str(model_dir / "images"), "--device", "cpu"]
    assert main(argv + ["--out", str(tmp_path / "ok")]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "converting to int8 for onnxruntime on cpu (4 calibration images)" in out
    assert "onnxruntime-cpu    int8" in out and "parity PASSED" in out
    parity = json.loads((tmp_path / "ok" / "parity.json").read_text())
    assert [(b["precision"], b["passed"]) for b in parity["backends"]] == [("fp32", True), ("int8", True)]
    assert main(argv + ["--out", str(tmp_path / "bad"), "--min-agreement", "1.01"]) == 1
    assert "renamed to model.onnx.failed, model.int8.onnx.failed" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == ["model.int8.onnx.failed", "model.onnx.failed",
                                                                    "parity.json"]


def test_cli_fp16_export_checks_its_graph_where_onnxruntime_runs_it(model_dir, tmp_path, capsys):
    """On this machine ONNX Runtime's CPU kernels run the fp16 graph: its argmax gate is checked here; the
    speed that fp16 is for needs onnxruntime-cuda (test_fp16_on_onnxruntime_cuda)."""
    from agmm_deploy.cli.export import main

    assert main([str(model_dir / "tiny.pt"), "--precision", "fp16", "--out", str(tmp_path), "--device", "cpu"]) == 0
    parity = json.loads((tmp_path / "parity.json").read_text())
    fp16 = parity["backends"][1]
    assert fp16["precision"] == "fp16" and fp16["passed"] and fp16["argmax_agreement"] >= 0.99


@pytest.mark.gpu
def test_fp16_on_onnxruntime_cuda(model_dir, tmp_path):
    if not _has_ort_cuda():
        pytest.skip("needs onnxruntime-gpu with the CUDA execution provider")
    from agmm_deploy.export.parity import check_artifacts
    from agmm_deploy.runtime.pytorch import TorchRunner

    result = convert_precision(model_dir / "model.onnx", tmp_path / "model.fp16.onnx", "fp16")
    runner = load_runner(result.path)
    assert (runner.backend, runner.precision) == ("onnxruntime-cuda", "fp16")
    torch.backends.cudnn.allow_tf32 = False
    reference = TorchRunner(model_dir / "tiny.pt", "cuda")
    parity = check_artifacts(reference, [result.path], _images(), batch_size=2)
    assert parity.passed, parity.table()


def test_the_service_serves_an_int8_model(model_dir, tmp_path):
    from serving.launch import serving

    path = convert_precision(model_dir / "model.onnx", tmp_path / "model.int8.onnx", "int8", _images(),
                               runtime="onnxruntime").path
    with serving(path, tmp_path, timeout_s=120) as url:
        info = requests.post(f"{url}/info", timeout=30).json()
        assert (info["backend"], info["precision"]) == ("onnxruntime-cpu", "int8")
        image = (model_dir / "images" / "0.png").read_bytes()
        response = requests.post(f"{url}/segment", files={"image": ("0.png", image)}, timeout=60)
        assert response.status_code == 200, response.text


def test_tensorrt_engines_are_rows_of_the_precision_table_never_a_default():
    """--runtime tensorrt (short: --trt) picks the engine row of each precision TensorRT builds; no precision's
    default is an engine, and a precision without an engine row is refused with the runtimes it has."""
    from agmm_deploy.export.precision import PRECISIONS
    from agmm_deploy.export.tensorrt import PRECISIONS as ENGINE_PRECISIONS

    rows = [row for row in PRECISIONS if row.runtime == "tensorrt"]
    assert [row.name for row in rows] == list(ENGINE_PRECISIONS) == ["fp32", "fp16", "int8"]
    for row in rows:
        assert get_precision(row.name, "tensorrt", "cuda") is row and get_precision(row.name, "tensorrt") is row
        assert (row.file_name, row.device, row.calibrated) == ("model.engine", "cuda", row.name == "int8")
        assert row.skip_when_missing and row.missing is not None
        for device in (None, "cpu", "cuda"):
            assert get_precision(row.name, device=device).runtime != "tensorrt"
    with pytest.raises(ValueError, match=r"precision 'bf16' has no tensorrt artifact; it has aoti, openvino"):
        get_precision("bf16", "tensorrt")


def test_trt_and_runtime_tensorrt_resolve_the_same_row(tmp_path):
    """Checked before any work: --trt with another --runtime is refused; --trt means --runtime tensorrt."""
    from agmm_deploy.cli.export import UsageError, get_args_parser, prepare

    parser = get_args_parser()
    with pytest.raises(UsageError, match="--trt is short for --runtime tensorrt; got --runtime openvino as well"):
        prepare(parser.parse_args(["x.pt", "--trt", "--runtime", "openvino"]))
    with pytest.raises(UsageError, match="precision 'bf16' has no tensorrt artifact"):
        prepare(parser.parse_args(["x.pt", "--trt", "--precision", "bf16"]))
