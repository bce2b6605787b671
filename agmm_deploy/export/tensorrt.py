"""ONNX -> TensorRT engine (placeholder; build_engine follows)."""

from __future__ import annotations


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message is one sentence saying which."""


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTUnavailable("TensorRT is not installed (pip install 'agmm-deploy[trt]' on a machine with "
                                  "an NVIDIA GPU).") from err
    return tensorrt
