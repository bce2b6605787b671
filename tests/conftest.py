"""Shared fixtures and the automatic skipping of `gpu` / `tensorrt` tests where they cannot run."""

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


def _has_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    has_trt = _has_tensorrt()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False on this machine")
    skip_trt = pytest.mark.skip(reason="needs TensorRT (pip install agmm-deploy[trt]) and a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(skip_trt)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
