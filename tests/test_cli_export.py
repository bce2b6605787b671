import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from agmm_deploy.checkpoint import save_checkpoint
from agmm_deploy.cli.export import main
from agmm_deploy.contract import read_onnx_metadata
from agmm_deploy.contract import ModelMeta
from agmm_deploy.model import DeepLabV3Plus, ModelConfig

TINY = ModelConfig(backbone="resnet18", num_classes=19)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = DeepLabV3Plus(TINY)
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))  # training-mode pass: non-trivial BN statistics
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", model.eval(),
                           ModelMeta.for_dataset("cityscapes", (64, 64)))


def test_export_passes_parity_and_writes_artifacts(checkpoint, capsys):
    code = main([str(checkpoint), "--device", "cpu"])
    out = capsys.readouterr().out
    folder = checkpoint.parent / "best_export"  # default: next to the checkpoint
    assert code == 0, out
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "parity.json"]
    onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["passed"] and parity["backends"][0]["backend"] == "onnxruntime-cpu"
    assert parity["backends"][0]["argmax_agreement"] >= 0.999 and parity["num_images"] == 2
    assert "onnxruntime-cpu    fp32" in out and "parity PASSED" in out and "peak RSS" in out
    meta, fields = read_onnx_metadata(folder / "model.onnx")
    assert meta.input_size == (64, 64) and len(fields["checkpoint_sha256"]) == 64


def test_forced_parity_failure_exits_1_and_sets_the_model_aside(checkpoint, tmp_path, capsys):
    (tmp_path / "model.onnx").write_bytes(b"an earlier export")  # must not survive as if it were deployable
    code = main([str(checkpoint), "--out", str(tmp_path), "--atol", "0", "--rtol", "0", "--min-agreement", "1.01",
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAIL onnxruntime-cpu fp32: logits not allclose (rtol=0, atol=0)" in captured.out
    assert "argmax agreement" in captured.out and "parity FAILED" in captured.out
    assert "was renamed to model.onnx.failed where nothing deploys it" in captured.err
    assert json.loads((tmp_path / "parity.json").read_text())["passed"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx.failed", "parity.json"]
    onnx.checker.check_model(str(tmp_path / "model.onnx.failed"))  # kept for inspection


def test_raw_official_state_dict_exports(tmp_path, capsys):
    config = ModelConfig.pascal(backbone="resnet18")
    state = {f"module.{k}": v for k, v in DeepLabV3Plus(config).state_dict().items()}
    raw = tmp_path / "resnet18_voc.pth"
    torch.save(state, raw)
    # Labelled parity images in the documented layout: DIR/images/*.jpg + DIR/labels/<stem>.png
    rng = np.random.default_rng(0)
    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "val" / "labels").mkdir()
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(tmp_path / "val/images" / f"{name}.jpg")
        Image.fromarray(rng.integers(0, 21, (48, 80), dtype=np.uint8)).save(tmp_path / "val/labels" / f"{name}.png")
    code = main([str(raw), "--backbone", "resnet18", "--num-classes", "21", "--dataset", "pascal",
                 "--height", "64", "--width", "64", "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--parity-images", str(tmp_path / "val")])
    out = capsys.readouterr().out
    assert code == 0, out
    meta, _ = read_onnx_metadata(tmp_path / "out" / "model.onnx")
    assert meta.classes[15] == "person" and meta.input_size == (64, 64)
    parity = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert parity["labelled"] and parity["num_images"] == 2 and parity["reference_miou"] is not None
    assert abs(parity["backends"][0]["miou_delta"]) <= 0.1 and "not checked" not in out


@pytest.mark.parametrize("case", ["truncated", "wrong_classes", "raw_wrong_classes", "raw_without_flags"])
def test_bad_checkpoints_exit_2_with_a_clear_error(checkpoint, tmp_path, capsys, case):
    if case == "truncated":
        path = tmp_path / "cut.pt"
        path.write_bytes(checkpoint.read_bytes()[:5000])
        argv, expected = [str(path)], "cannot be read"
    elif case == "wrong_classes":
        argv, expected = [str(checkpoint), "--num-classes", "21"], "--num-classes 21 contradicts"
    elif case == "raw_wrong_classes":
        path = tmp_path / "raw.pth"
        torch.save(DeepLabV3Plus(ModelConfig.pascal(backbone="resnet18")).state_dict(), path)
        argv = [str(path), "--backbone", "resnet18", "--num-classes", "19", "--dataset", "cityscapes"]
        expected = "classifier.weight (checkpoint (21, 256, 1, 1), model (19, 256, 1, 1))"
    else:
        path = tmp_path / "raw.pth"
        torch.save(DeepLabV3Plus(TINY).state_dict(), path)
        argv, expected = [str(path)], "pass --backbone"
    assert main(argv + ["--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agmm-export: error: ") and expected in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_trt_without_tensorrt_writes_valid_onnx_then_exits_non_zero(checkpoint, tmp_path):
    """The real console script, in a subprocess, on this machine (no TensorRT, no GPU)."""
    from agmm_deploy.runtime.trt import tensorrt_missing

    if tensorrt_missing() is None:
        pytest.skip("TensorRT and a GPU are present here; tests/test_tensorrt.py covers --trt")
    script = Path(sys.executable).with_name("agmm-export")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([str(script), str(checkpoint), "--trt", "--out", str(tmp_path), "--parity-count", "1",
                           "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    assert json.loads((tmp_path / "parity.json").read_text())["passed"] is True
    assert not (tmp_path / "model.engine").exists()
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("agmm-export: --trt needs") and last.count(". ") == 0 and last.endswith("checked).")
    assert "Traceback" not in proc.stderr


def test_missing_image_folders_fail_before_exporting(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(checkpoint), "--parity-images", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "nowhere holds no images" in capsys.readouterr().err and not out.exists()
    assert main([str(checkpoint), "--precision", "int8", "--out", str(out)]) == 2
    assert "--precision int8 needs --calib-images DIR" in capsys.readouterr().err


@pytest.mark.parametrize("names", [tuple("abcde"), tuple(f"c{i}" for i in range(21))])
def test_metadata_that_does_not_fit_the_model_is_refused_before_export(tmp_path, capsys, names):
    path = save_checkpoint(tmp_path / "odd.pt", DeepLabV3Plus(TINY).eval(),
                           ModelMeta.for_dataset("folder", (64, 64), classes=names))
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"odd.pt: the metadata names {len(names)} classes" in err and "a model with 19 output channels" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--parity-count", "--height", "--width", "--max-batch", "--parity-batch"])
def test_zero_counts_and_sizes_are_refused_by_argparse(checkpoint, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), flag, "0"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: 0 is too small; expected a whole number >= 1" in capsys.readouterr().err


def test_unusable_output_folders_exit_2_before_the_export(checkpoint, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert main([str(checkpoint), "--out", str(taken)]) == 2
    assert f"--out {taken} is a file; expected a folder" in capsys.readouterr().err
    assert main([str(checkpoint), "--out", str(tmp_path / "model.onnx")]) == 2
    assert "looks like a model file; --out takes a folder" in capsys.readouterr().err
    assert main([str(checkpoint), "--out", str(taken / "sub")]) == 2  # cannot be created
    assert f"cannot write to --out {taken / 'sub'} (Not a directory)" in capsys.readouterr().err


def test_an_unwritable_output_folder_exits_2_before_the_export(checkpoint, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as root: permissions do not stop writes")
    assert main([str(checkpoint), "--out", str(locked / "sub")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write to --out {locked / 'sub'} (Permission denied)" in err and "Traceback" not in err


def test_a_full_disk_exits_2_with_a_sentence(checkpoint, tmp_path, capsys, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert main([str(checkpoint), "--out", str(tmp_path / "small")]) == 2
    assert "has 0 MB free; the artifacts need about" in capsys.readouterr().err
    monkeypatch.undo()

    def disk_full(*args, **kwargs):  # the disk fills up while the model is written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "full" / ".model.onnx.tmp"))

    monkeypatch.setattr(onnx, "save_model", disk_full)
    assert main([str(checkpoint), "--out", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert "failed (No space left on device); free some space or choose another --out" in err
    assert "Traceback" not in err and not (tmp_path / "full" / "model.onnx").exists()


def test_non_finite_weights_exit_2_before_the_export(checkpoint, tmp_path, capsys):
    data = torch.load(checkpoint, weights_only=True)
    data["model"]["backbone.conv1.0.weight"].view(-1)[0] = float("nan")
    torch.save(data, tmp_path / "nan.pt")
    code = main([str(tmp_path / "nan.pt"), "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "holds non-finite weights: backbone.conv1.0.weight has 1 NaN" in err, err
    assert not (tmp_path / "out").exists()


def test_absurd_weights_fail_parity_whatever_the_tolerance(checkpoint, tmp_path, capsys):
    data = torch.load(checkpoint, weights_only=True)
    for key in ("classifier.weight", "classifier.bias"):  # logits ~1e30: finite in fp32, absurd
        data["model"][key] *= 1e30
    torch.save(data, tmp_path / "huge.pt")
    code = main([str(tmp_path / "huge.pt"), "--device", "cpu", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "beyond the sane scale 10000 (MAX_LOGIT)" in out and "parity FAILED" in out
    assert (tmp_path / "out" / "model.onnx.failed").is_file()
