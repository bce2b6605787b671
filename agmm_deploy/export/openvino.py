"""fp32 ONNX -> OpenVINO IR (.xml + .bin) for OpenVINO's CPU plugin: bf16, or int8 by NNCF post-training
quantisation. OpenVINO and NNCF are an optional extra (``pip install 'agmm-deploy[openvino]'``), imported here
only.

The IR's weights stay float32 (``compress_to_fp16=False``); what a model computes in is the CPU plugin's
inference precision, recorded in the metadata as ``inference_precision`` and asked for by the runner:
bf16 for a bf16 model; for an int8 model f32 on the layers NNCF leaves unquantised (on a CPU with native bf16,
OpenVINO could run them in bf16; the parity gates are the int8 ones either way).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from agmm_deploy.contract import ModelMeta, write_openvino_metadata

INSTALL = "pip install 'agmm-deploy[openvino]'"


def openvino_missing() -> str | None:
    """None when OpenVINO and NNCF are installed, else one clause naming what is missing."""
    absent = [name for name in ("openvino", "nncf") if importlib.util.find_spec(name) is None]
    return f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed ({INSTALL})" if absent \
        else None


def _convert(onnx_path: Path) -> "openvino.Model":  # noqa: F821
    import openvino as ov

    return ov.convert_model(str(onnx_path))


def quantize_nncf(model: "openvino.Model", calib_images: np.ndarray) -> "openvino.Model":  # noqa: F821
    """int8 by NNCF post-training quantisation: per-channel symmetric int8 weights and int8 activations whose
    ranges come from running ``calib_images`` (N, 3, H, W) one at a time (NNCF's CPU defaults)."""
    import nncf

    dataset = nncf.Dataset([image[None] for image in calib_images.astype(np.float32)])
    return nncf.quantize(model, dataset, preset=nncf.QuantizationPreset.PERFORMANCE,
                         target_device=nncf.TargetDevice.CPU, subset_size=len(calib_images))


def save_ir(model: "openvino.Model", out_path: Path, meta: ModelMeta, fields: dict[str, Any]) -> None:
    """Writes ``out_path`` (.xml) and its .bin with the metadata in rt_info; each file appears whole or not at
    all (written in a temporary folder beside them, then moved)."""
    import tempfile

    import openvino as ov

    write_openvino_metadata(model, meta, **fields)
    with tempfile.TemporaryDirectory(prefix="agmm-ir-", dir=out_path.parent) as tmp:
        staged = Path(tmp) / out_path.name
        ov.save_model(model, str(staged), compress_to_fp16=False)
        # Renames within one folder are atomic; the .bin first, so a reader that finds the .xml finds its weights.
        os.replace(staged.with_suffix(".bin"), out_path.with_suffix(".bin"))
        os.replace(staged, out_path)


def export_openvino(onnx_path: Path, out_path: Path, meta: ModelMeta, fields: dict[str, Any],
                    calib_images: np.ndarray | None = None) -> None:
    """fp32 ONNX -> IR at ``fields['precision']`` (bf16 | int8), metadata included.

    Args:
        onnx_path: the fp32 model.onnx written by export_onnx.
        out_path: the .xml to write (the .bin goes beside it).
        meta, fields: the metadata to store; ``precision`` picks bf16 or int8.
        calib_images: normalised float32 (N, 3, H, W) at the export size; int8 only.
    """
    reason = openvino_missing()
    if reason:
        raise RuntimeError(f"the OpenVINO {fields['precision']} export needs OpenVINO and NNCF, but {reason}")
    model = _convert(onnx_path)
    if fields["precision"] == "int8":
        if calib_images is None or len(calib_images) == 0:
            raise ValueError("int8 needs calibration images (--calib-images DIR, a few dozen representative images)")
        model = quantize_nncf(model, calib_images)
    save_ir(model, out_path, meta, fields)
