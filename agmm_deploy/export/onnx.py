"""PyTorch -> ONNX: one self-contained file, input ``image``, output ``logits``, metadata in ``metadata_props``.

Uses the dynamo-based ``torch.onnx.export`` (torch.export + onnxscript). That exporter emits opset 18 at the
least; asking for 17 is converted up to 18, so the opset recorded in the result and the metadata is the one
the file really has.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from agmm_deploy.atomic import atomic_write
from agmm_deploy.checkpoint import unwrap
from agmm_deploy.contract import library_versions, write_onnx_metadata
from agmm_deploy.contract import ModelMeta

INPUT_NAME = "image"
LOGITS_NAME = "logits"
# Bounds of the symbolic dimensions; TensorRT profiles narrow them further at build time.
MAX_DYNAMIC_BATCH = 1024
MIN_DYNAMIC_SIDE, MAX_DYNAMIC_SIDE = 32, 8192


@dataclass(frozen=True)
class OnnxExport:
    """What export_onnx wrote."""

    path: Path
    opset: int
    input_size: tuple[int, int]
    dynamic_batch: bool
    dynamic_hw: bool
    simplified: bool
    precision: str
    outputs: tuple[str, ...]
    size_bytes: int
    seconds: float


def check_meta_matches_model(model: nn.Module, meta: ModelMeta) -> None:
    """Refuses metadata whose class list does not fit the model's outputs (one name and colour per channel).

    Raises:
        ValueError: the metadata names another number of classes than the model has output channels.
    """
    net = unwrap(model)
    channels = net.classifier.out_channels if hasattr(net, "classifier") else None
    if channels is not None and channels != meta.num_classes:
        shown = ", ".join(meta.classes[:5]) + (", ..." if meta.num_classes > 5 else "")
        raise ValueError(f"the metadata names {meta.num_classes} classes ({shown}) for a model with {channels} "
                         f"output channels; expected one class name and colour per output. Save the checkpoint "
                         f"with the {channels} class names it was trained on.")


def export_onnx(model: nn.Module, meta: ModelMeta, path: str | Path, *, height: int, width: int,
                opset: int = 18, dynamic_batch: bool = True, dynamic_hw: bool = False, simplify: bool = False, checkpoint_sha256: str | None = None, precision: str = "fp32",
                max_batch: int = 8) -> OnnxExport:
    """Exports the model's ``forward`` (logits) to one ONNX file and checks it with ``onnx.checker``.

    Args:
        model: the DeepLabV3Plus (any wrapper is removed); it is put in eval mode.
        meta: classes, palette, mean/std; stored in ``metadata_props`` with ``input_size=(height, width)``.
        path: the .onnx file to write (parent folders are created; the write is atomic).
        height, width: the example input size, and the fixed input size unless ``dynamic_hw``.
        opset: requested ONNX opset (the dynamo exporter emits >= 18; the real one is recorded).
        dynamic_batch: symbolic batch dimension ``batch``; otherwise the graph takes exactly one image.
        dynamic_hw: symbolic ``height``/``width`` too.
        simplify: run onnxslim over the graph.
        checkpoint_sha256: sha256 of the source checkpoint, recorded for traceability.
        precision: must be ``fp32``: the exported graph is always float32, and runners pick their parity
            gates from the recorded precision (fp16/int8 artifacts are converted from it: convert_precision,
            build_engine).
        max_batch: the largest batch the artifact is meant for (recorded; runners split bigger batches).
    Returns:
        OnnxExport describing the file.
    Raises:
        ValueError: ``meta`` does not fit the model (check_meta_matches_model), or an unsupported precision.
    Shape:
        image: (N, 3, H, W) float32 normalised RGB. logits: (N, K, H, W) float32.
    """
    import onnx

    if precision != "fp32":
        raise ValueError(f"precision={precision!r} cannot be exported to ONNX directly: the exported graph is "
                         "float32. Export fp32, then convert it (agmm_deploy.export.precision.convert_precision, "
                         "agmm-export --precision fp16|int8) or build a TensorRT engine from it (--trt).")
    check_meta_matches_model(model, meta)
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = unwrap(model).eval()
    # One output: serving and prediction resize (letterbox) or softmax-average (tiles) the logits before the
    # argmax, so an in-graph argmax at the model size would have no reader.
    outputs = (LOGITS_NAME,)

    # An example batch of 2: torch.export specialises dimensions whose example value is 1.
    example = torch.zeros(2 if dynamic_batch else 1, 3, height, width)
    dims = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
    if dynamic_hw:
        dims[2] = torch.export.Dim("height", min=MIN_DYNAMIC_SIDE, max=MAX_DYNAMIC_SIDE)
        dims[3] = torch.export.Dim("width", min=MIN_DYNAMIC_SIDE, max=MAX_DYNAMIC_SIDE)
    with torch.no_grad():
        program = torch.onnx.export(
            net, (example,), None, input_names=[INPUT_NAME], output_names=list(outputs),
            opset_version=opset, dynamo=True, external_data=False, verbose=False,
            dynamic_shapes=({"x": dims} if dims else None),
        )
    proto = program.model_proto
    del program, example  # the exported program holds a copy of the weights; free it before serialising
    if simplify:
        import onnxslim

        proto = onnxslim.slim(proto)
    real_opset = next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))
    meta = ModelMeta(**{**meta.to_dict(), "input_size": (height, width)})
    write_onnx_metadata(
        proto, meta, opset=real_opset, precision=precision, device="any", versions=library_versions(),
        checkpoint_sha256=checkpoint_sha256, dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw,
        max_batch=(max_batch if dynamic_batch else 1), input=INPUT_NAME, outputs=list(outputs),
        model_config=(net.config.to_dict() if hasattr(net, "config") else None),
    )
    onnx.checker.check_model(proto, full_check=True)

    atomic_write(path, lambda f: onnx.save_model(proto, f))
    return OnnxExport(path=path, opset=real_opset, input_size=(height, width), dynamic_batch=dynamic_batch,
                      dynamic_hw=dynamic_hw, simplified=simplify, precision=precision,
                      outputs=outputs, size_bytes=path.stat().st_size, seconds=time.perf_counter() - start)
