"""Reduced-precision ONNX models for ONNX Runtime, one row per precision: no TensorRT needed.

Every row turns the fp32 ``model.onnx`` written by export_onnx into the artifact of its precision, with the
metadata rewritten to say its ``precision`` and the ``device`` it targets (runners refuse another device
rather than run it slowly or not at all):

=========  ============  ==================  ======================================================
precision  device        file                how
=========  ============  ==================  ======================================================
fp32       any           model.onnx          the exported graph itself
fp16       cuda          model.fp16.onnx     float16 weights and activations for onnxruntime-cuda;
                                             resize, softmax and reductions stay float32; inputs
                                             and outputs stay float32
int8       cpu           model.int8.onnx     static quantisation by ONNX Runtime (QDQ, per-channel
                                             int8 weights, uint8 activations calibrated on
                                             --calib-images) for onnxruntime-cpu (VNNI kernels)
=========  ============  ==================  ======================================================

The parity gates of each precision are in agmm_deploy.export.parity (fp16: argmax >= 99 %, mIoU delta <= 0.1;
int8: mIoU delta <= 1.0).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from agmm_deploy.atomic import atomic_write
from agmm_deploy.contract import library_versions, read_onnx_metadata, write_onnx_metadata

# Ops kept in float32 in fp16 models: Resize interpolates between neighbours whose difference fp16 rounds
# away at large upsampling factors; Softmax and reductions (the ASPP image pooling is a mean over 64x128
# positions) sum many terms, which overflows or loses digits in float16.
FP16_KEEP_FP32_OPS = ("Resize", "Softmax", "ReduceMean", "ReduceSum", "GlobalAveragePool", "Upsample")


def _load(path: Path) -> "onnx.ModelProto":  # noqa: F821
    import onnx

    return onnx.load(str(path))


def convert_fp16(onnx_path: Path, out_path: Path, calib_images: np.ndarray | None = None) -> None:
    """fp32 ONNX -> fp16 ONNX for onnxruntime-cuda (keep_io_types: float32 in, float32 logits out)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = convert_float_to_float16(_load(onnx_path), keep_io_types=True,
                                     op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32_OPS])
    # The converter appends the float32 <-> float16 Casts at the graph's inputs and outputs to the end of the
    # node list; ONNX requires nodes in topological order (onnx.checker refuses the graph otherwise).
    _sort_topologically(model.graph)
    atomic_write(out_path, lambda f: onnx.save_model(model, f))


def _sort_topologically(graph: "onnx.GraphProto") -> None:  # noqa: F821
    """Reorders ``graph.node`` so that every node comes after the nodes producing its inputs (stable)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        left = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                left.append(node)
        if len(left) == len(pending):
            raise ValueError(f"the graph has a cycle or a missing input near node {left[0].name!r}")
        pending = left
    copies = [type(node)() for node in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def quantize_int8(onnx_path: Path, out_path: Path, calib_images: np.ndarray | None = None) -> None:
    """fp32 ONNX -> int8 QDQ ONNX by static post-training quantisation with ONNX Runtime's own tools.

    Per-channel int8 weights, uint8 activations whose ranges come from running ``calib_images`` (MinMax).
    uint8 activations (U8S8) rather than ONNX Runtime's int8 default (S8S8): DeepLabV3+ R50 at 256x512, batch 1,
    2 shared AVX-512 VNNI cores, median of 5 round-robin calls: fp32 6737 ms, U8S8 2880 ms, S8S8 5008 ms.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calib_images is None or len(calib_images) == 0:
        raise ValueError("int8 needs calibration images (--calib-images DIR, a few dozen representative images)")
    input_name = _load(onnx_path).graph.input[0].name

    class ImageReader(CalibrationDataReader):
        """One normalised image (1, 3, H, W) per call, then None."""

        def __init__(self) -> None:
            self.feeds = iter([{input_name: image[None]} for image in calib_images.astype(np.float32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory(prefix="agmm-int8-", dir=out_path.parent) as tmp:
        # Shape inference and graph optimisation first (BN folding, fusions), as ONNX Runtime recommends
        # before quantising, so that quantisation sees the graph the CPU kernels will run.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(str(prepared), str(quantized), ImageReader(),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        data = quantized.read_bytes()
    atomic_write(out_path, lambda f: f.write(data))


@dataclass(frozen=True)
class Precision:
    """One row of the precision table.

    Attributes:
        name: fp32 | fp16 | int8, as recorded in the artifact's metadata and used to pick parity gates.
        device: the device the ONNX artifact is made for: any | cpu | cuda.
        file_name: what agmm-export calls it in its output folder.
        calibrated: whether it needs calibration images.
        convert: (fp32 onnx path, output path, calibration images or None) -> None; None for fp32.
    """

    name: str
    device: str
    file_name: str
    calibrated: bool
    convert: Callable[[Path, Path, np.ndarray | None], None] | None


PRECISIONS: tuple[Precision, ...] = (
    Precision("fp32", "any", "model.onnx", False, None),
    Precision("fp16", "cuda", "model.fp16.onnx", False, convert_fp16),
    Precision("int8", "cpu", "model.int8.onnx", True, quantize_int8),
)


def get_precision(name: str) -> Precision:
    """The row named ``name``; an unknown name is refused with the known ones listed."""
    for precision in PRECISIONS:
        if precision.name == name:
            return precision
    raise ValueError(f"precision {name!r} has no ONNX Runtime artifact; expected one of "
                     f"{', '.join(p.name for p in PRECISIONS)} (bf16: ONNX opset 18, which the export emits, "
                     "allows no bfloat16 convolutions; fp16/int8 TensorRT engines come from --trt)")


@dataclass(frozen=True)
class PrecisionExport:
    """What convert_precision wrote."""

    path: Path
    precision: str
    device: str
    size_bytes: int
    seconds: float


def convert_precision(onnx_path: str | Path, out_path: str | Path, precision: str,
                      calib_images: np.ndarray | None = None) -> PrecisionExport:
    """Writes the ``precision`` artifact of an fp32 ONNX model written by export_onnx, metadata included.

    Args:
        onnx_path: the fp32 model.onnx (its metadata is carried over).
        out_path: the file to write (atomically).
        precision: fp16 | int8 (a row of PRECISIONS other than fp32).
        calib_images: normalised float32 (N, 3, H, W) at the export size; int8 only.
    Returns:
        PrecisionExport.
    """
    row = get_precision(precision)
    if row.convert is None:
        raise ValueError(f"precision {precision!r} is what export_onnx writes; nothing to convert")
    start = time.perf_counter()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    meta, fields = read_onnx_metadata(onnx_path)
    row.convert(onnx_path, out_path, calib_images)
    model = _load(out_path)
    write_onnx_metadata(model, meta, **{**fields, "precision": row.name, "device": row.device,
                                        "versions": library_versions(), "source_onnx": onnx_path.name,
                                        "calibration_images": len(calib_images) if row.calibrated else 0})
    import onnx

    onnx.checker.check_model(model)
    atomic_write(out_path, lambda f: onnx.save_model(model, f))
    return PrecisionExport(out_path, row.name, row.device, out_path.stat().st_size, time.perf_counter() - start)
