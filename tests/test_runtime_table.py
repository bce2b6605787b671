"""The runtime table: every caller asks it, and a new backend is one file plus one row.

tests/fixed_logits_backend.py is such a backend (a made-up ``.fixedlogits`` artifact). Added to the table with
AGMM_EXTRA_BACKENDS, agmm-predict, agmm-bench and a real `bentoml serve` all run it, with no other change.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from agmm_deploy.contract import ModelMeta
from agmm_deploy.runtime import (BACKENDS, EXTRA_BACKENDS_ENV, backend_for, backends, get_backend, load_runner,
                                 model_suffixes)

import fixed_logits_backend

ROOT = Path(__file__).resolve().parents[1]
ENTRY = "fixed_logits_backend:ROW"
META = ModelMeta.for_dataset("folder", (32, 48), classes=("dark", "mid", "bright"))


@pytest.fixture
def fixed_model(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(EXTRA_BACKENDS_ENV, ENTRY)
    return fixed_logits_backend.write(tmp_path / "model.fixedlogits", META)


@pytest.fixture
def image(tmp_path) -> Path:
    """A 40x100 image: dark left, bright right (so the expected labels are known), tiled by a 32x48 model."""
    rgb = np.zeros((40, 100, 3), np.uint8)
    rgb[:, 50:] = 255
    path = tmp_path / "half.png"
    Image.fromarray(rgb).save(path)
    return path


def test_every_suffix_names_one_backend_and_unknown_names_list_the_known():
    suffixes = model_suffixes()
    assert len(suffixes) == len(set(suffixes))
    for backend in BACKENDS:
        assert all(backend_for(f"m{s}") is backend for s in backend.suffixes)
    with pytest.raises(ValueError, match="unknown backend 'tvm'; expected one of pytorch, onnxruntime, tensorrt, "
                                         "openvino"):
        get_backend("tvm")


def test_extra_rows_come_from_the_environment(fixed_model, monkeypatch):
    assert backends()[-1] is fixed_logits_backend.ROW and ".fixedlogits" in model_suffixes()
    runner = load_runner(fixed_model)  # auto on a CPU-only backend means the CPU, GPU or not
    assert runner.backend == "fixed-logits" and runner.device.type == "cpu" and runner.meta == META
    images = np.zeros((2, 3, 32, 48), np.float32)
    images[1] = 2.0
    assert runner(images).argmax(1)[:, 0, 0].tolist() == [1, 2]
    with pytest.raises(ValueError, match="fixed-logits runs on cpu only; got device='cuda'"):
        load_runner(fixed_model, device="cuda")
    monkeypatch.setenv(EXTRA_BACKENDS_ENV, "")
    assert backends() == BACKENDS
    with pytest.raises(ValueError, match="cannot tell the format of .*model.fixedlogits"):
        load_runner(fixed_model)


@pytest.mark.parametrize("spec, message", [
    ("no_such_module:ROW", "entry 'no_such_module:ROW' cannot be loaded .*expected module:ATTRIBUTE"),
    ("fixed_logits_backend:load", "entry 'fixed_logits_backend:load' is a type; expected an agmm_deploy.runtime"),
    ("fixed_logits_backend:ROW,fixed_logits_backend:ROW", "has the name 'fixed-logits', which backend "
                                                         "'fixed-logits' already has"),
])
def test_bad_extra_rows_are_refused_with_a_sentence(monkeypatch, spec, message):
    monkeypatch.setenv(EXTRA_BACKENDS_ENV, spec)
    with pytest.raises(ValueError, match=message):
        backends()


def test_agmm_predict_runs_the_new_backend(fixed_model, image, tmp_path, capsys):
    from agmm_deploy.cli.predict import main

    assert main([str(fixed_model), str(image), "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    assert "backend=fixed-logits" in capsys.readouterr().out
    labels = np.asarray(Image.open(tmp_path / "pred" / "half.png"))
    assert labels.shape == (40, 100) and (labels[:, :40] == 0).all() and (labels[:, 60:] == 2).all()
    assert main([str(fixed_model), str(image), "--out", str(tmp_path / "x"), "--backbone", "resnet50"]) == 2
    assert "--backbone describe raw official state dicts; model.fixedlogits is a fixed-logits model" in \
        capsys.readouterr().err


def test_agmm_bench_times_the_new_backend(fixed_model, capsys):
    from agmm_deploy.cli.bench import main

    assert main([str(fixed_model), "--iters", "3", "--device", "cpu", "--gemm-size", "128"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("fixed-logits"))
    assert row.split()[1:4] == ["fixedlogits", "fp32", "1"] and "FLOPs unknown" in out


def test_the_service_serves_the_new_backend(fixed_model, image, tmp_path):
    from serving.launch import serving

    pythonpath = os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    with serving(fixed_model, tmp_path, timeout_s=120, AGMM_DEVICE="cpu", PYTHONPATH=pythonpath,
                 **{EXTRA_BACKENDS_ENV: ENTRY}) as url:
        info = requests.post(f"{url}/info", timeout=30).json()
        assert info["backend"] == "fixed-logits" and info["classes"] == list(META.classes)
        assert info["model"] == "model.fixedlogits" and info["input_size"] == [32, 48]
        response = requests.post(f"{url}/segment", files={"image": ("half.png", image.read_bytes())}, timeout=60)
        assert response.status_code == 200, response.text
        labels = np.asarray(Image.open(io.BytesIO(response.content)))
        assert labels.shape == (40, 100) and (labels[:, :40] == 0).all() and (labels[:, 60:] == 2).all()
