"""AOTInductor packages (.pt2): export, metadata, runner, parity through agmm-export, predict/bench/serve.

Compiling a package takes about a minute on 2 CPU cores, so the module compiles one, through agmm-export, and
every CPU test reads it; the forced parity failure and the server are the slow ones. fp16/bf16 packages are
CUDA only (gpu tests).
"""

from __future__ import annotations

import copy
import importlib.metadata
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from agmm_deploy.checkpoint import save_checkpoint, sha256_file
from agmm_deploy.cli.export import main as export_main
from agmm_deploy.contract import AOTI_METADATA_KEY, ModelMeta, read_aoti_metadata
from agmm_deploy.export.aoti import CastModel, export_aoti
from agmm_deploy.export.parity import generated_images
from agmm_deploy.export.precision import convert_precision, get_precision
from agmm_deploy.model import DeepLabV3Plus, ModelConfig
from agmm_deploy.runtime import load_runner
from agmm_deploy.runtime.aoti import AOTIRunner
from agmm_deploy.transforms import normalize

TINY = ModelConfig(backbone="resnet18", num_classes=19)
META = ModelMeta.for_dataset("cityscapes", (64, 64))
MAX_BATCH = 4


def _model() -> DeepLabV3Plus:
    torch.manual_seed(0)
    model = DeepLabV3Plus(TINY)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))  # non-trivial BN statistics
    return model.eval()


def _images(n: int) -> torch.Tensor:
    return torch.from_numpy(normalize(generated_images(META, n, (64, 64)), META.mean, META.std))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """agmm-export --precision fp32 --runtime aoti --device cpu of a tiny checkpoint: (folder, exit code, model)."""
    folder = tmp_path_factory.mktemp("aoti")
    model = _model()
    save_checkpoint(folder / "tiny.pt", model, META)
    images = folder / "images"
    images.mkdir()
    for i, image in enumerate(generated_images(META, 2, (64, 64))):
        Image.fromarray(image).save(images / f"{i}.png")
    code = export_main([str(folder / "tiny.pt"), "--precision", "fp32", "--runtime", "aoti", "--device", "cpu",
                        "--max-batch", str(MAX_BATCH), "--out", str(folder / "out")])
    return folder, code, model


@pytest.fixture(scope="module")
def package(exported):
    folder, code, _ = exported
    assert code == 0
    return folder / "out" / "model.fp32.pt2"


def test_agmm_export_writes_a_cpu_package_that_passes_parity(exported, package):
    folder, code, _ = exported
    assert code == 0 and package.is_file() and (folder / "out" / "model.onnx").is_file()
    parity = json.loads((folder / "out" / "parity.json").read_text())
    rows = {Path(b["artifact"]).name: b for b in parity["backends"]}
    assert parity["passed"] and rows["model.fp32.pt2"]["backend"] == "aoti-cpu"
    assert rows["model.fp32.pt2"]["argmax_agreement"] >= 0.999 and rows["model.fp32.pt2"]["max_abs_diff"] < 1e-4


def test_metadata_is_read_back_without_loading_and_matches_the_library(exported, package):
    folder, _, _ = exported
    meta, fields = read_aoti_metadata(package)
    assert meta.classes == META.classes and meta.input_size == (64, 64) and meta.mean == META.mean
    assert (fields["precision"], fields["device"], fields["runtime"]) == ("fp32", "cpu", "aoti")
    assert fields["checkpoint_sha256"] == sha256_file(folder / "tiny.pt")
    assert (fields["dynamic_batch"], fields["max_batch"], fields["keep_fp32"]) == (True, MAX_BATCH, [])
    assert fields["versions"]["torch"] == importlib.metadata.version("torch")
    runner = load_runner(package)
    assert isinstance(runner, AOTIRunner) and runner.backend == "aoti-cpu" and runner.precision_used() == "fp32"
    # The copy compiled into the shared library is the same JSON.
    assert json.loads(runner.model.get_metadata()[AOTI_METADATA_KEY])["checkpoint_sha256"] == \
        fields["checkpoint_sha256"]


@pytest.mark.parametrize("batch", [1, 3, MAX_BATCH + 2])
def test_runner_matches_torch_at_every_batch(exported, package, batch):
    """1..max_batch is the symbolic batch; a larger one is split by Runner.run."""
    _, _, model = exported
    runner = load_runner(package, "cpu")
    images = _images(batch)
    logits = runner.run(images)
    with torch.no_grad():
        expected = model(images)
    assert logits.dtype == torch.float32 and logits.shape == (batch, META.num_classes, 64, 64)
    assert torch.allclose(logits, expected, rtol=1e-3, atol=1e-4), (logits - expected).abs().max()
    assert np.array_equal(runner(images.numpy()).argmax(1), expected.argmax(1).numpy())


def test_a_cpu_package_is_refused_on_cuda_and_at_another_size(package):
    with pytest.raises(ValueError, match="compiled for cpu, and a package runs only on the device it was"):
        AOTIRunner(package, "cuda")
    with pytest.raises(ValueError, match="was exported for 64x64 inputs; got 32x64"):
        load_runner(package, "cpu").run(torch.zeros(1, 3, 32, 64))


def test_empty_truncated_or_foreign_files_are_refused_with_a_sentence(package, tmp_path):
    empty = tmp_path / "empty.pt2"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(package.read_bytes()[: package.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt2"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("foreign/data.txt", "hello")
    for path in (empty, truncated):
        with pytest.raises(ValueError, match=rf"{path.name} \(\d+ bytes\) is not an AOTInductor package: not a "
                                             "readable zip archive"):
            load_runner(path)
    with pytest.raises(ValueError, match="is a zip archive but no AOTInductor package"):
        load_runner(foreign)


def test_rows_are_picked_by_the_device_the_export_targets(exported, tmp_path, capsys):
    assert get_precision("bf16", device="cpu").runtime == "openvino"
    assert get_precision("fp16", device="cpu").runtime == "onnxruntime"  # the aoti row needs CUDA
    assert get_precision("fp32", "aoti", "cpu").file_name == "model.fp32.pt2"
    if torch.cuda.is_available():
        assert (get_precision("bf16", device="cuda").file_name, get_precision("fp16", device="cuda").file_name) \
            == ("model.bf16.pt2", "model.fp16.pt2")
    folder, _, _ = exported
    code = export_main([str(folder / "tiny.pt"), "--precision", "bf16", "--runtime", "aoti", "--device", "cpu",
                        "--out", str(tmp_path / "out")])
    assert code == 2
    assert "a bf16 CPU package is not offered: OpenVINO has that row" in capsys.readouterr().err


def test_export_aoti_refuses_a_wrong_name_or_precision(exported, tmp_path):
    folder, _, model = exported
    with pytest.raises(ValueError, match="an AOTInductor package is a .pt2 file; got model.onnx"):
        export_aoti(model, META, tmp_path / "model.onnx", height=64, width=64)
    with pytest.raises(ValueError, match="precision='int8' is not supported by export_aoti"):
        export_aoti(model, META, tmp_path / "model.pt2", height=64, width=64, precision="int8")
    with pytest.raises(ValueError, match="is compiled from the torch model"):
        convert_precision(folder / "out" / "model.onnx", tmp_path / "model.fp32.pt2", "fp32", runtime="aoti",
                          device="cpu")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_wrapper_keeps_float32_io_and_argmax(precision):
    """The module an fp16/bf16 package compiles, run eagerly on the CPU: float32 in and out, the kept modules in
    float32, argmax close to fp32 (the 99 % gate is checked on CUDA packages below)."""
    model = _model()
    images = _images(2)
    wrapper = CastModel(model, {"bf16": torch.bfloat16, "fp16": torch.float16}[precision], channels_last=True)
    assert next(wrapper.net.backbone.parameters()).dtype != torch.float32
    assert next(wrapper.net.classifier.parameters()).dtype == torch.float32
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched
    with torch.no_grad():
        logits, expected = wrapper(images), model(images)
    assert logits.dtype == torch.float32 and logits.shape == expected.shape
    assert (logits.argmax(1) == expected.argmax(1)).float().mean() >= 0.95


def test_predict_and_bench_take_a_package(exported, package, tmp_path, capsys):
    from agmm_deploy.cli.bench import main as bench_main
    from agmm_deploy.cli.predict import main as predict_main

    folder, _, model = exported
    assert predict_main([str(package), str(folder / "images" / "0.png"), "--out", str(tmp_path / "pred"),
                         "--device", "cpu"]) == 0
    labels = np.asarray(Image.open(tmp_path / "pred" / "0.png"))
    image = torch.from_numpy(normalize(np.asarray(Image.open(folder / "images" / "0.png"))[None], META.mean,
                                       META.std))
    with torch.no_grad():
        assert (labels == model(image).argmax(1)[0].numpy()).mean() >= 0.999
    assert bench_main([str(folder / "out" / "model.onnx"), str(package), "--iters", "2", "--device", "cpu",
                       "--gemm-size", "64", "--max-seconds", "5"]) == 0
    assert "aoti-cpu" in capsys.readouterr().out


def test_a_served_folder_reads_a_package_precision_and_device(package):
    from serving.artifacts import choose_artifact, read_artifact

    artifact = read_artifact(package, device="cpu")
    assert (artifact.backend, artifact.precision, artifact.device, artifact.missing) == ("aoti", "fp32", "cpu", None)
    assert choose_artifact(package.parent, file_name=package.name, device="cpu").path == package


@pytest.mark.slow
def test_the_service_serves_a_package(exported, package, tmp_path):
    from serving.launch import serving

    folder, _, _ = exported
    with serving(package, tmp_path, timeout_s=180) as url:
        info = requests.post(f"{url}/info", timeout=30).json()
        assert (info["backend"], info["precision"]) == ("aoti-cpu", "fp32")
        image = (folder / "images" / "0.png").read_bytes()
        response = requests.post(f"{url}/segment", files={"image": ("0.png", image)}, timeout=60)
        assert response.status_code == 200, response.text
        assert np.asarray(Image.open(io.BytesIO(response.content))).shape == (64, 64)


@pytest.mark.slow
def test_a_parity_failure_exits_1_and_sets_the_package_aside(exported, tmp_path, capsys):
    """--atol 0 --rtol 0 asks for bit-identical logits, which compiled kernels (other summation orders) miss."""
    folder, _, _ = exported
    out = tmp_path / "out"
    code = export_main([str(folder / "tiny.pt"), "--precision", "fp32", "--runtime", "aoti", "--device", "cpu",
                        "--atol", "0", "--rtol", "0", "--out", str(out)])
    assert code == 1 and "parity FAILED" in capsys.readouterr().err
    assert (out / "model.fp32.pt2.failed").is_file() and not (out / "model.fp32.pt2").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_packages_agree_with_fp32(exported, tmp_path, precision):
    """fp16/bf16 CUDA packages: float32 logits on the GPU, argmax >= 99 % of the fp32 model's (the parity gate)."""
    folder, _, model = exported
    result = convert_precision(folder / "out" / "model.onnx", tmp_path / f"model.{precision}.pt2", precision,
                               model=model, device="cuda")
    assert (result.runtime, result.device) == ("aoti", "cuda")
    runner = load_runner(result.path)
    assert runner.device.type == "cuda" and runner.precision == precision
    assert read_aoti_metadata(result.path)[1]["channels_last"] is True
    images = _images(3)
    logits = runner.run(images)
    with torch.no_grad():
        expected = copy.deepcopy(model).cuda()(images.cuda())  # the module's CPU model stays on the CPU
    assert logits.dtype == torch.float32 and logits.device.type == "cuda"
    assert (logits.argmax(1) == expected.argmax(1)).float().mean() >= 0.99
    with pytest.raises(ValueError, match="compiled for cuda"):
        AOTIRunner(result.path, "cpu")


def test_a_package_for_a_wider_cpu_instruction_set_is_refused(package, tmp_path):
    """CPU kernels are compiled with -march=native; an AVX-512 package would crash on an AVX2 CPU."""
    from agmm_deploy.runtime.aoti import cpu_isa

    if cpu_isa() == "AVX512":
        pytest.skip("this CPU runs AVX-512 packages")
    wider = tmp_path / "avx512.pt2"
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(wider, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("wrapper_metadata.json"):
                data = json.dumps({**json.loads(data), "AOTI_CPU_ISA": "AVX512"}).encode()
            target.writestr(item, data)
    with pytest.raises(RuntimeError, match=f"avx512.pt2 was compiled for AVX512 CPUs, and this CPU has {cpu_isa()}"):
        load_runner(wider, "cpu")
