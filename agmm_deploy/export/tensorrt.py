"""ONNX -> TensorRT engine with the TensorRT Python API (>= 10), plus the sidecar JSON serving reads.

TensorRT is an optional extra (``pip install 'agmm-deploy[trt]'``) and needs a CUDA GPU; it is imported only
inside these functions, so the rest of the toolkit works without it. ``tensorrt_missing()`` (from the runtime,
which also runs engines) says in one sentence what is missing on a machine that cannot build engines.

Precisions: fp32; fp16 (``BuilderFlag.FP16``: TensorRT may pick fp16 kernels per layer); int8 by post-training
entropy calibration (``IInt8EntropyCalibrator2``) over calibration images, with fp16 allowed as a fallback for
layers without int8 kernels. The calibration cache makes a rebuild skip the calibration pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agmm_deploy.atomic import atomic_write_bytes
from agmm_deploy.contract import library_versions, read_onnx_metadata, write_engine_sidecar
from agmm_deploy.runtime.trt import TensorRTUnavailable, import_tensorrt, tensorrt_missing

# What build_engine can build; agmm-export finds them as the tensorrt rows of the precision table
# (agmm_deploy.export.precision), and tests/test_export_precision.py checks that the two agree.
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class EngineBuild:
    """What build_engine wrote."""

    path: Path
    sidecar: Path
    precision: str
    min_shape: tuple[int, int, int, int]
    opt_shape: tuple[int, int, int, int]
    max_shape: tuple[int, int, int, int]
    calibration_cache: Path | None
    size_bytes: int
    seconds: float


def _make_calibrator(trt: Any, images: np.ndarray, batch_size: int, cache: Path | None) -> Any:
    """An entropy calibrator feeding normalised images (N, 3, H, W) through one CUDA buffer."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.images = images
            self.batch_size = batch_size
            self.cache = cache
            self.index = 0
            self.buffer = torch.empty((batch_size, *images.shape[1:]), dtype=torch.float32, device="cuda")

        def get_batch_size(self) -> int:
            return self.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index + self.batch_size > len(self.images):
                return None  # no more full batches: calibration is done
            chunk = self.images[self.index:self.index + self.batch_size]
            self.buffer.copy_(torch.from_numpy(np.ascontiguousarray(chunk)))
            torch.cuda.synchronize()
            self.index += self.batch_size
            return [int(self.buffer.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            if self.cache is not None and self.cache.is_file():
                return self.cache.read_bytes()
            return None

        def write_calibration_cache(self, data: Any) -> None:
            if self.cache is not None:
                atomic_write_bytes(self.cache, bytes(data))

    return EntropyCalibrator()


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, precision: str = "fp32", max_batch: int = 8,
                 opt_batch: int | None = None, dynamic_hw: bool = False,
                 min_hw: tuple[int, int] | None = None, max_hw: tuple[int, int] | None = None,
                 calib_images: np.ndarray | None = None, calib_batch: int = 4,
                 calib_cache: str | Path | None = None, workspace_gb: float = 4.0) -> EngineBuild:
    """Builds a serialized engine from an ONNX file written by export_onnx and writes ``<engine>.json``.

    Args:
        onnx_path: the ONNX model (its metadata is copied into the sidecar).
        engine_path: the engine file to write.
        precision: fp32 | fp16 | int8.
        max_batch, opt_batch: the optimisation profile over batch: min 1, opt (default max_batch // 2 or 1), max.
        dynamic_hw: also let height/width vary from ``min_hw`` (default half the export size) to ``max_hw``
            (default twice); the ONNX must have been exported with dynamic_hw.
        calib_images: normalised float32 (N, 3, H, W) at the export size; required for int8 unless the
            calibration cache exists.
        calib_cache: where the int8 calibration cache is read from / written to.
        workspace_gb: builder workspace limit.
    Returns:
        EngineBuild.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; expected one of {PRECISIONS}")
    missing = tensorrt_missing("building a TensorRT engine")
    if missing:
        raise TensorRTUnavailable(missing + ".")
    trt = import_tensorrt()
    start = time.perf_counter()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    meta, fields = read_onnx_metadata(onnx_path)
    if dynamic_hw and not fields.get("dynamic_hw"):
        raise ValueError(f"{onnx_path} has a fixed input size {meta.input_size}; export it with --dynamic-hw to "
                         "build an engine with a dynamic height/width profile")
    calib_cache = Path(calib_cache) if calib_cache else None
    if precision == "int8" and calib_images is None and not (calib_cache and calib_cache.is_file()):
        raise ValueError("int8 needs calibration images (--calib-images DIR) or an existing calibration cache")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    h, w = meta.input_size
    (min_h, min_w) = min_hw or ((max(32, h // 2), max(32, w // 2)) if dynamic_hw else (h, w))
    (max_h, max_w) = max_hw or ((2 * h, 2 * w) if dynamic_hw else (h, w))
    if not fields.get("dynamic_batch", True):
        max_batch = 1
    opt_batch = opt_batch or max(1, max_batch // 2)
    min_shape, opt_shape, max_shape = (1, 3, min_h, min_w), (opt_batch, 3, h, w), (max_batch, 3, max_h, max_w)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    input_name = network.get_input(0).name
    profile.set_shape(input_name, min_shape, opt_shape, max_shape)
    config.add_optimization_profile(profile)
    if precision == "fp32":
        # TensorRT allows TF32 tensor-core kernels by default (10-bit mantissa); fp32 means fp32 here.
        config.clear_flag(trt.BuilderFlag.TF32)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        images = calib_images if calib_images is not None else np.zeros((0, 3, h, w), np.float32)
        batch = max(1, min(calib_batch, len(images))) if len(images) else 1
        config.int8_calibrator = _make_calibrator(trt, images, batch, calib_cache)
        # Calibration runs at one fixed shape: the export size.
        calib_profile = builder.create_optimization_profile()
        calib_profile.set_shape(input_name, (batch, 3, h, w), (batch, 3, h, w), (batch, 3, h, w))
        config.set_calibration_profile(calib_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    atomic_write_bytes(engine_path, bytes(serialized))
    sidecar = write_engine_sidecar(
        engine_path, meta, **{**fields, "precision": precision, "device": "cuda", "versions": library_versions(),
                              "max_batch": max_batch, "dynamic_hw": dynamic_hw, "onnx": onnx_path.name,
                              "profile": {"min": list(min_shape), "opt": list(opt_shape), "max": list(max_shape)},
                              "gpu": torch.cuda.get_device_name()})
    return EngineBuild(path=engine_path, sidecar=sidecar, precision=precision, min_shape=min_shape,
                       opt_shape=opt_shape, max_shape=max_shape,
                       calibration_cache=calib_cache if precision == "int8" else None,
                       size_bytes=engine_path.stat().st_size, seconds=time.perf_counter() - start)
