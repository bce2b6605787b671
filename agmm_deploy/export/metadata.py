"""Metadata that travels with exported artifacts: ONNX ``metadata_props`` and the engine sidecar JSON.

Both hold the same flat mapping of JSON values: the ModelMeta fields (``classes``, ``palette``, ``input_size``,
``mean``, ``std``, ``dataset``, ``extra``) plus export facts (``opset``, ``precision``, ``versions``,
``checkpoint_sha256``, ``dynamic_batch``, ``dynamic_hw``, ``max_batch``, ``outputs``, ...). Serving and
agmm-predict read preprocessing from here and never hard-code it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from agmm_deploy.atomic import atomic_write_bytes
from agmm_deploy.meta import ModelMeta

FORMAT = "agmm-deploy/1"
META_FIELDS = tuple(f.name for f in dataclasses.fields(ModelMeta))


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced an artifact (recorded for reproducibility)."""
    import importlib.metadata

    versions = {}
    for name in ("agmm-deploy", "torch", "onnx", "onnxscript", "onnxruntime-gpu", "onnxruntime", "onnxslim",
                 "tensorrt"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def metadata_fields(meta: ModelMeta, **fields: Any) -> dict[str, Any]:
    """The flat mapping stored in artifacts: ModelMeta fields, ``format`` and the given export facts."""
    clash = sorted(set(fields) & set(META_FIELDS))
    if clash:
        raise ValueError(f"export fields {clash} collide with ModelMeta fields; pass them through meta instead")
    return {"format": FORMAT, **meta.to_dict(), **fields}


def split_fields(data: dict[str, Any], source: str) -> tuple[ModelMeta, dict[str, Any]]:
    """Flat mapping -> (ModelMeta, the other fields); errors name ``source``."""
    try:
        meta = ModelMeta.from_dict({k: v for k, v in data.items() if k in META_FIELDS})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source} carries no valid agmm-deploy model metadata ({err}); was it written by "
                         "agmm-export?") from err
    return meta, {k: v for k, v in data.items() if k not in META_FIELDS}


def write_onnx_metadata(model: "onnx.ModelProto", meta: ModelMeta, **fields: Any) -> None:  # noqa: F821
    """Replaces the model's ``metadata_props`` with the metadata (each value JSON-encoded)."""
    del model.metadata_props[:]
    for key, value in metadata_fields(meta, **fields).items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(value)


def read_onnx_metadata(path: str | Path) -> tuple[ModelMeta, dict[str, Any]]:
    """Reads the metadata of an ONNX file written by export_onnx, without loading its weights.

    Returns:
        (ModelMeta, dict of the other fields: opset, precision, versions, checkpoint_sha256, ...).
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist")
    model = onnx.load(str(path), load_external_data=False)
    data = {}
    for entry in model.metadata_props:
        try:
            data[entry.key] = json.loads(entry.value)
        except json.JSONDecodeError:
            data[entry.key] = entry.value  # a key someone else added as plain text
    return split_fields(data, str(path))


def sidecar_path(engine_path: str | Path) -> Path:
    """model.engine -> model.engine.json"""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Writes ``data`` as indented JSON, atomically (readers never see half a file); returns the path."""
    return atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def write_engine_sidecar(engine_path: str | Path, meta: ModelMeta, **fields: Any) -> Path:
    """Writes ``<engine>.json`` beside a TensorRT engine; returns its path."""
    return write_json_atomic(sidecar_path(engine_path), metadata_fields(meta, **fields))


def read_engine_sidecar(engine_path: str | Path) -> tuple[ModelMeta, dict[str, Any]]:
    """Reads ``<engine>.json``; (ModelMeta, other fields)."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise FileNotFoundError(f"engine metadata {path} does not exist; agmm-export --trt writes it beside "
                                f"{Path(engine_path).name}. Re-export, or copy it along with the engine.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"engine metadata {path} is not valid JSON ({err})") from err
    return split_fields(data, str(path))
