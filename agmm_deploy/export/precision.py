"""Every artifact agmm-export writes besides model.onnx, one row per (precision, runtime): ask the table, never branch.

Every row turns the fp32 ``model.onnx`` written by export_onnx (or, for AOTInductor, the torch model it was
exported from, at its input size and batch dimension) into the artifact of its precision, with the metadata
saying its ``precision`` and the ``device`` it targets (runners refuse another device rather than run it
slowly, or at another precision than it says):

=========  ===========  ======  ===============  =========================================================
precision  runtime      device  file             how
=========  ===========  ======  ===============  =========================================================
fp32       onnxruntime  any     model.onnx       the exported graph itself
fp32       aoti         any     model.fp32.pt2   AOTInductor package (torch.export, compiled ahead of time)
                                                 for the device the export targets (--device),
                                                 channels_last
tf32       onnxruntime  cuda    model.tf32.onnx  the fp32 graph, run by onnxruntime-cuda with TF32 tensor
                                                 cores on (use_tf32); refused on a machine without CUDA
fp16       aoti         cuda    model.fp16.pt2   AOTInductor package, fp16 weights and activations,
                                                 channels_last; ASPP image pooling and classifier (so the
                                                 final upsample) float32; float32 in and out
fp16       onnxruntime  cuda    model.fp16.onnx  float16 weights and activations for onnxruntime-cuda;
                                                 resize, softmax and reductions stay float32; inputs
                                                 and outputs stay float32
bf16       aoti         cuda    model.bf16.pt2   as fp16 aoti, in bfloat16
bf16       openvino     cpu     model.bf16.xml   OpenVINO IR compiled with inference precision bf16;
                                                 refused on a CPU without native bf16 (AVX-512 BF16/AMX)
int8       openvino     cpu     model.int8.xml   NNCF post-training quantisation on --calib-images
                                                 (per-channel int8 weights), the rest in f32
int8       onnxruntime  cpu     model.int8.onnx  ONNX Runtime static quantisation (QDQ, per-channel int8
                                                 weights, uint8 activations) for onnxruntime-cpu
fp32       tensorrt     cuda    model.engine     TensorRT engine built from model.onnx (TF32 off), with
                                                 its model.engine.json sidecar (agmm_deploy.export.tensorrt)
fp16       tensorrt     cuda    model.engine     TensorRT engine, fp16 kernels where TensorRT picks them
int8       tensorrt     cuda    model.engine     TensorRT engine, entropy calibration on --calib-images
                                                 (calibration.cache beside it), fp16 fallback
=========  ===========  ======  ===============  =========================================================

``agmm-export --precision P --runtime tensorrt`` (short: ``--trt``) writes the TensorRT row of P; its rows come
last, so they are never a precision's default.
``agmm-export --precision P`` writes the first row of P made for the device the export targets (``--device``;
auto = CUDA when available) that can be produced there (get_precision); ``--runtime`` picks another. So bf16
on a GPU machine is the CUDA AOTInductor package and on a CPU the OpenVINO IR, never one quietly for the other.
fp16 on CUDA defaults to AOTInductor: on published H100 figures torch.compile fp16 channels_last beat eager and a
naive ONNX Runtime fp16 model, and AOTInductor compiles ahead of time what torch.compile compiles just in time.
fp16/bf16 AOTInductor packages are refused for the CPU (a bf16 CPU package is not offered: OpenVINO has that
row); the fp32 package runs on the CPU too. int8 defaults to OpenVINO: on the development CPU (AVX2, no VNNI) it
was the int8 row that passed its gate within memory, and on a VNNI CPU the faster one. The figures behind these
defaults, with their devices and commands: docs/benchmarks.md; the table with its gates: docs/export.md.
OpenVINO and NNCF are the optional extra ``agmm-deploy[openvino]``; a row whose library or hardware is missing
is refused with a sentence saying what to install or which row to use instead.

The parity gates of each precision are in agmm_deploy.export.parity (tf32/fp16/bf16: argmax >= 99 %, mIoU
delta <= 0.1; int8: mIoU delta <= 1.0).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from agmm_deploy.atomic import atomic_write
from agmm_deploy.contract import ModelMeta, companion_files, library_versions, read_onnx_metadata, write_onnx_metadata

# Ops kept in float32 in fp16 models: Resize interpolates between neighbours whose difference fp16 rounds
# away at large upsampling factors; Softmax and reductions (the ASPP image pooling is a mean over 64x128
# positions) sum many terms, which overflows or loses digits in float16.
FP16_KEEP_FP32_OPS = ("Resize", "Softmax", "ReduceMean", "ReduceSum", "GlobalAveragePool", "Upsample")


def _load(path: Path) -> "onnx.ModelProto":  # noqa: F821
    import onnx

    return onnx.load(str(path))


def convert_fp16(onnx_path: Path, out_path: Path) -> None:
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


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX-512 VNNI or AVX-VNNI) dot-product instructions, from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_int8(onnx_path: Path, out_path: Path, calib_images: np.ndarray | None,
                  reduce_range: bool = False) -> None:
    """fp32 ONNX -> int8 QDQ ONNX by static post-training quantisation with ONNX Runtime's own tools.

    ``reduce_range``: 7-bit weights. Without VNNI, ONNX Runtime's u8 x s8 kernels (AVX2 vpmaddubsw) add pairs of
    products into int16, which saturates with full 8-bit weights and large activations; 7-bit weights keep the
    sum in range (ONNX Runtime's quantisation guide recommends it for non-VNNI CPUs).

    Per-channel int8 weights, uint8 activations whose ranges come from running ``calib_images`` (MinMax).
    uint8 activations (U8S8) rather than ONNX Runtime's int8 default (S8S8): DeepLabV3+ R50 at 256x512, batch 1,
    2 shared AVX-512 VNNI cores, median of 5 round-robin calls: fp32 6737 ms, U8S8 2880 ms, S8S8 5008 ms.

    Calibration memory does not grow with the number of images (MinMax keeps one min and max per tensor and
    image) but with the image size: ONNX Runtime's calibrator adds a ReduceMin/ReduceMax pair to every tensor
    and runs that graph in its default execution order, which schedules the reductions (all graph outputs)
    after the whole network, so every activation of one image stays alive (7.9 GiB at 512x1024). The same
    calibrator run with the priority-based order reduces each tensor as soon as it is made; the ranges, and so
    the quantised model, are the same (every initialiser equal, R18 256x512). Peak RSS of this function, R50 at
    256x512 (benchmarks/int8_calib_memory.py): 2118/2139 MiB for 2/8 images before, 731/746 MiB now.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          create_calibrator, quantize_static)
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calib_images is None or len(calib_images) == 0:
        raise ValueError("int8 needs calibration images (--calib-images DIR, a few dozen representative images)")
    try:
        from onnxruntime.quantization.calibrate import save_tensors_data
    except ImportError:
        raise RuntimeError(f"int8 for onnxruntime needs onnxruntime >= 1.31 (quantize_static's calibration_cache_"
                           f"path); got {ort.__version__}. pip install -U onnxruntime-gpu") from None
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
        # quantize_static's own calibration step, on the tensors of the ops it quantises (its default list),
        # with a session whose execution order frees each activation once reduced. Optimisation stays off, as
        # in the calibrator's own session: fusions would remove the tensors whose ranges are wanted.
        calibrator = create_calibrator(prepared, list(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        # One shape per run: a memory pattern saves nothing and holds its plan's buffers (R50 256x512: +90 MiB).
        options.enable_mem_pattern = False
        calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, options,
                                                        providers=["CPUExecutionProvider"])
        calibrator.collect_data(ImageReader())
        ranges = Path(tmp) / "ranges.json"
        save_tensors_data(calibrator.compute_data(), ranges)
        del calibrator
        # quantize_static reads the ranges from that file instead of calibrating again.
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(str(prepared), str(quantized), None, calibration_cache_path=str(ranges),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        data = quantized.read_bytes()
    atomic_write(out_path, lambda f: f.write(data))


@dataclass(frozen=True)
class ConvertJob:
    """What a row's convert gets: the fp32 ONNX model, the torch model it came from, and where to write.

    Attributes:
        onnx_path: the fp32 model.onnx written by export_onnx (its metadata is carried over).
        out_path: the artifact to write.
        meta, fields: the metadata to store (fields already say this row's precision, device and runtime).
        calib_images: normalised float32 (N, 3, H, W) at the export size; calibrated rows only.
        model: the torch model (rows that compile the model itself rather than convert the ONNX graph).
        device: cpu | cuda: the device the artifact is made for.
        workspace_gb: the TensorRT builder's workspace limit (engine rows).
    Input size, dynamic batch and max batch are those of the ONNX model: ``meta.input_size`` and ``fields``.
    """

    onnx_path: Path
    out_path: Path
    meta: ModelMeta
    fields: dict[str, Any]
    calib_images: np.ndarray | None = None
    model: Any = None  # torch.nn.Module
    device: str = "cpu"
    workspace_gb: float = 4.0


def write_onnx(source: Path, out_path: Path, meta: ModelMeta, fields: dict[str, Any]) -> None:
    """Writes the ONNX model ``source`` to ``out_path`` with the metadata, after onnx.checker has passed it."""
    import onnx

    model = _load(source)
    write_onnx_metadata(model, meta, **fields)
    onnx.checker.check_model(model)
    atomic_write(out_path, lambda f: onnx.save_model(model, f))


def export_tf32(job: ConvertJob) -> None:
    """The fp32 graph under precision tf32: the runner turns TF32 tensor cores on for it."""
    write_onnx(job.onnx_path, job.out_path, job.meta, job.fields)


def export_fp16(job: ConvertJob) -> None:
    convert_fp16(job.onnx_path, job.out_path)
    write_onnx(job.out_path, job.out_path, job.meta, job.fields)


def export_int8_onnx(job: ConvertJob) -> None:
    # 7-bit weights where this CPU lacks VNNI, so that the parity check run here sees what this CPU's int8
    # kernels compute without saturation; recorded in the metadata (a VNNI CPU runs such a model correctly too).
    reduce_range = not cpu_has_vnni()
    quantize_int8(job.onnx_path, job.out_path, job.calib_images, reduce_range=reduce_range)
    write_onnx(job.out_path, job.out_path, job.meta, {**job.fields, "int8_weight_bits": 7 if reduce_range else 8})


def export_openvino(job: ConvertJob) -> None:
    from agmm_deploy.export.openvino import export_openvino as export

    export(job.onnx_path, job.out_path, job.meta, job.fields, job.calib_images)


def export_aoti_package(job: ConvertJob) -> None:
    """Compiles the torch model (not the ONNX graph) into an AOTInductor package at the row's precision, with
    the ONNX model's input size, batch dimension and metadata."""
    from agmm_deploy.export.aoti import export_aoti

    if job.model is None:
        raise ValueError(f"an AOTInductor package ({job.out_path.name}) is compiled from the torch model, not from "
                         f"{job.onnx_path.name}; pass model= to convert_precision")
    height, width = job.meta.input_size
    export_aoti(job.model, job.meta, job.out_path, height=height, width=width, precision=job.fields["precision"],
                device=job.device, max_batch=int(job.fields.get("max_batch") or 1),
                dynamic_batch=bool(job.fields.get("dynamic_batch", True)),
                checkpoint_sha256=job.fields.get("checkpoint_sha256"))


def export_engine(job: ConvertJob) -> None:
    """Builds the TensorRT engine of the row's precision from the ONNX model, with its sidecar JSON; int8
    calibrates on the job's images and keeps calibration.cache beside the engine for rebuilds."""
    from agmm_deploy.export.tensorrt import build_engine

    calibrated = job.calib_images is not None
    build_engine(job.onnx_path, job.out_path, precision=job.fields["precision"],
                 max_batch=int(job.fields.get("max_batch") or 1), dynamic_hw=bool(job.fields.get("dynamic_hw")),
                 calib_images=job.calib_images,
                 calib_cache=job.out_path.parent / "calibration.cache" if calibrated else None,
                 workspace_gb=job.workspace_gb)


def tensorrt_row_missing(device: str) -> str | None:
    """None when TensorRT and a CUDA GPU are here, else the clause saying what is missing (whatever ``device``:
    an engine is built for the GPU of the machine that builds it)."""
    from agmm_deploy.runtime.trt import tensorrt_missing

    return tensorrt_missing("--trt")


def cuda_missing(device: str) -> str | None:
    """None when torch sees a CUDA GPU, else why tf32 cannot be produced or checked here."""
    import torch

    if torch.cuda.is_available():
        return None
    return ("tf32 is a mode of CUDA tensor cores and torch.cuda.is_available() is False on this machine, where "
            "it would run as plain fp32; export fp32 (model.onnx) for the CPU, or tf32 on a machine with a GPU")


def openvino_missing(device: str) -> str | None:
    from agmm_deploy.export.openvino import openvino_missing as missing

    return missing()


def openvino_bf16_missing(device: str) -> str | None:
    from agmm_deploy.runtime.openvino import bf16_missing

    return openvino_missing(device) or bf16_missing()


def aoti_cuda_missing(device: str) -> str | None:
    """fp16/bf16 packages are compiled for CUDA: None when the export targets a GPU here, else why not."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return None
    if device == "cuda":
        return "fp16/bf16 AOTInductor packages are compiled on a CUDA GPU, and torch.cuda.is_available() is False"
    return ("fp16/bf16 AOTInductor packages are made for CUDA GPUs (a bf16 CPU package is not offered: OpenVINO "
            "has that row), and the export targets the CPU (--device cpu, or no GPU here)")


@dataclass(frozen=True)
class Precision:
    """One row of the precision table.

    Attributes:
        name: fp32 | tf32 | fp16 | bf16 | int8, as recorded in the artifact's metadata; picks the parity gates.
        runtime: the backend row of agmm_deploy.runtime that runs the artifact (onnxruntime | openvino | aoti |
            tensorrt).
        device: the device the artifact is made for: cpu | cuda, or any: an ONNX model runs anywhere, an fp32
            AOTInductor package is compiled for the device the export targets.
        file_name: what agmm-export calls it in its output folder.
        calibrated: whether it needs calibration images.
        convert: (ConvertJob) -> None, writing the artifact with its metadata; None for model.onnx itself.
        inference_precision: what the runtime is asked to compute the unquantised layers in (OpenVINO: f32 or
            bf16); empty where the artifact's own types decide.
        missing: (target device, cpu | cuda) -> None, or one clause saying why this row cannot be produced
            for that device here; None = always can.
        skip_when_missing: agmm-export still writes and checks model.onnx when this row cannot be produced here,
            then exits 3 (TensorRT: the engine is often built later, on the GPU machine); otherwise it refuses
            before any work (exit 2).
    """

    name: str
    runtime: str
    device: str
    file_name: str
    calibrated: bool
    convert: Callable[[ConvertJob], None] | None
    inference_precision: str = ""
    missing: Callable[[str], str | None] | None = None
    skip_when_missing: bool = False


PRECISIONS: tuple[Precision, ...] = (
    Precision("fp32", "onnxruntime", "any", "model.onnx", False, None),
    Precision("fp32", "aoti", "any", "model.fp32.pt2", False, export_aoti_package),
    Precision("tf32", "onnxruntime", "cuda", "model.tf32.onnx", False, export_tf32, missing=cuda_missing),
    Precision("fp16", "aoti", "cuda", "model.fp16.pt2", False, export_aoti_package, missing=aoti_cuda_missing),
    Precision("fp16", "onnxruntime", "cuda", "model.fp16.onnx", False, export_fp16),
    Precision("bf16", "aoti", "cuda", "model.bf16.pt2", False, export_aoti_package, missing=aoti_cuda_missing),
    Precision("bf16", "openvino", "cpu", "model.bf16.xml", False, export_openvino, "bf16", openvino_bf16_missing),
    Precision("int8", "openvino", "cpu", "model.int8.xml", True, export_openvino, "f32", openvino_missing),
    Precision("int8", "onnxruntime", "cpu", "model.int8.onnx", True, export_int8_onnx),
    # Last: never a precision's default (get_precision), only asked for with --runtime tensorrt / --trt.
    Precision("fp32", "tensorrt", "cuda", "model.engine", False, export_engine, missing=tensorrt_row_missing,
              skip_when_missing=True),
    Precision("fp16", "tensorrt", "cuda", "model.engine", False, export_engine, missing=tensorrt_row_missing,
              skip_when_missing=True),
    Precision("int8", "tensorrt", "cuda", "model.engine", True, export_engine, missing=tensorrt_row_missing,
              skip_when_missing=True),
)


def precision_names() -> tuple[str, ...]:
    """Every precision of the table once, in table order."""
    return tuple(dict.fromkeys(p.name for p in PRECISIONS))


def get_precision(name: str, runtime: str | None = None, device: str | None = None) -> Precision:
    """The row of ``name`` for ``runtime`` (None: any) and the target ``device`` (cpu | cuda; None: any).

    Among the rows left, in table order: the first made for ``device`` (or any device) that can be produced
    here; else the first that can be produced for ``device`` at all (fp16 on a CPU-only machine: the
    onnxruntime-cuda model, as before AOTInductor); else the first made for ``device``, else the first row, for
    the caller to refuse with its reason. So bf16 on a GPU is the CUDA package, never quietly the CPU IR.
    Unknown names are refused with the known ones listed.
    """
    rows = [p for p in PRECISIONS if p.name == name]
    if not rows:
        raise ValueError(f"precision {name!r} is unknown; expected one of {', '.join(precision_names())}")
    matching = [row for row in rows if runtime in (None, row.runtime)]
    if not matching:
        raise ValueError(f"precision {name!r} has no {runtime} artifact; it has "
                         f"{', '.join(r.runtime for r in rows)} (--runtime {rows[0].runtime})")
    if device is None:
        return matching[0]
    local = [row for row in matching if row.device in ("any", device)]
    for candidates in (local, matching):
        for row in candidates:
            if row.missing is None or row.missing(device) is None:
                return row
    return (local or matching)[0]


@dataclass(frozen=True)
class PrecisionExport:
    """What convert_precision wrote."""

    path: Path
    precision: str
    runtime: str
    device: str
    size_bytes: int
    seconds: float


def convert_precision(onnx_path: str | Path, out_path: str | Path, precision: str,
                      calib_images: np.ndarray | None = None, runtime: str | None = None, *,
                      model: Any = None, device: str = "auto", workspace_gb: float = 4.0) -> PrecisionExport:
    """Writes the ``precision`` artifact of an fp32 ONNX model written by export_onnx, metadata included.

    Args:
        onnx_path: the fp32 model.onnx (its metadata, input size and batch dimension are carried over).
        out_path: the file to write (atomically; an OpenVINO .xml gets its .bin beside it).
        precision: fp32 | tf32 | fp16 | bf16 | int8 (a row of PRECISIONS other than model.onnx itself).
        calib_images: normalised float32 (N, 3, H, W) at the export size; int8 only.
        runtime: a runtime of the table (onnxruntime | openvino | aoti | tensorrt); None = the row get_precision
            picks for ``device``.
        model: the torch model onnx_path was exported from; AOTInductor rows compile it.
        device: auto | cpu | cuda: the device the artifact targets (auto = CUDA when available).
        workspace_gb: the TensorRT builder's workspace limit (engine rows).
    Returns:
        PrecisionExport.
    Raises:
        ValueError: an unknown precision/runtime, int8 without calibration images, aoti without model.
        RuntimeError: the row cannot be produced here (its library or hardware is missing; the message says).
    """
    from agmm_deploy.runtime.base import resolve_device

    device = resolve_device(device)
    row = get_precision(precision, runtime, device)
    if row.convert is None:
        raise ValueError(f"precision {precision!r} for {row.runtime} is what export_onnx writes; nothing to "
                         "convert")
    if row.missing is not None and (reason := row.missing(device)):
        raise RuntimeError(f"cannot write a {row.name} {row.runtime} model here: {reason}")
    if row.calibrated and (calib_images is None or len(calib_images) == 0):
        raise ValueError(f"{row.name} needs calibration images (--calib-images DIR, a few dozen representative "
                         "images)")
    start = time.perf_counter()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    meta, fields = read_onnx_metadata(onnx_path)
    target = device if row.device == "any" and row.runtime == "aoti" else row.device
    fields = {**fields, "precision": row.name, "device": target, "runtime": row.runtime,
              "versions": library_versions(), "source_onnx": onnx_path.name,
              "calibration_images": len(calib_images) if row.calibrated else 0}
    if row.inference_precision:
        fields["inference_precision"] = row.inference_precision
    row.convert(ConvertJob(onnx_path, out_path, meta, fields, calib_images, model,
                           target if target != "any" else device, workspace_gb))
    size = out_path.stat().st_size + sum(p.stat().st_size for p in companion_files(out_path))
    return PrecisionExport(out_path, row.name, row.runtime, target, size, time.perf_counter() - start)
