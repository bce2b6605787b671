"""The file contract: what every artifact of this project carries besides its weights.

``ModelMeta`` (classes, colours, preprocessing, input size) is stored in checkpoints, in ONNX
``metadata_props`` and in the JSON sidecar of engines, together with export facts (``opset``, ``precision``,
``versions``, ``checkpoint_sha256``, ``dynamic_batch``, ``dynamic_hw``, ``max_batch``, ``outputs``, ...), so
that export, prediction and serving never hard-code preprocessing. Readers and writers of that metadata live
here, so the runtime layer can read an artifact without importing any export code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agmm_deploy.atomic import atomic_write_bytes
from agmm_deploy.constants import IMAGENET_MEAN, IMAGENET_STD, default_palette


@dataclass(frozen=True)
class ModelMeta:
    """Attributes:
        classes: class names, index = label value.
        palette: one (R, G, B) per class.
        input_size: (H, W) the model was trained/exported at (the training crop).
        mean, std: per-channel RGB normalisation of images scaled to [0, 1].
        dataset: the data format's name, a row of agmm_deploy.datasets (informational).
    """

    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    input_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dataset: str = "folder"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "palette", tuple(tuple(int(v) for v in color) for color in self.palette))
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.palette) != len(self.classes):
            raise ValueError(f"palette has {len(self.palette)} colours for {len(self.classes)} classes; expected one each")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size={self.input_size!r} is invalid; expected (height, width) > 0")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values each with std > 0; got mean={self.mean}, std={self.std}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def for_dataset(cls, dataset: str, input_size: tuple[int, int],
                    classes: tuple[str, ...] | None = None,
                    palette: tuple[tuple[int, int, int], ...] | None = None) -> "ModelMeta":
        """Classes and palette of a data format (``agmm_deploy.datasets``): its own, or the ``classes`` (and
        ``palette``, default the VOC colour map) of a format whose classes come with the data."""
        from agmm_deploy.datasets import get_format

        row = get_format(dataset)
        if row.classes is not None:
            return cls(row.classes, row.palette, input_size, dataset=dataset)
        if classes is None:
            raise ValueError(f"dataset={dataset!r} needs an explicit class list")
        return cls(tuple(classes), palette or default_palette(len(classes)), input_size, dataset=dataset)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (lists for tuples) as stored in checkpoints, ONNX metadata and sidecars."""
        data = dataclasses.asdict(self)
        for key in ("classes", "input_size", "mean", "std"):
            data[key] = list(data[key])
        data["palette"] = [list(c) for c in self.palette]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelMeta":
        """The metadata of a to_dict() result; unknown keys are ignored, classes/palette/input_size required."""
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted({"classes", "palette", "input_size"} - set(data))
        if missing:
            raise ValueError(f"model metadata lacks {missing}; expected at least classes, palette and input_size")
        return cls(**{k: v for k, v in data.items() if k in known})




FORMAT = "agmm-deploy/1"
META_FIELDS = tuple(f.name for f in dataclasses.fields(ModelMeta))


def library_versions() -> dict[str, str]:
    """Versions of the libraries that produced an artifact (recorded for reproducibility)."""
    import importlib.metadata

    versions = {}
    for name in ("agmm-deploy", "torch", "onnx", "onnxscript", "onnxruntime-gpu", "onnxruntime", "onnxslim",
                 "tensorrt", "openvino", "nncf"):
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


# OpenVINO IR (.xml + .bin): the metadata is one JSON string in the model's rt_info under these keys, so the
# IR file carries it as an ONNX file does (ov.save_model writes rt_info into the .xml).
OPENVINO_RT_INFO = ("agmm_deploy", "metadata")


def write_openvino_metadata(model: "openvino.Model", meta: ModelMeta, **fields: Any) -> None:  # noqa: F821
    """Stores the metadata in the model's rt_info (ov.save_model then writes it into the .xml)."""
    model.set_rt_info(json.dumps(metadata_fields(meta, **fields)), list(OPENVINO_RT_INFO))


def read_openvino_metadata(path: str | Path) -> tuple[ModelMeta, dict[str, Any]]:
    """Reads the metadata of an OpenVINO IR .xml written by agmm-export, without OpenVINO or the weights.

    Returns:
        (ModelMeta, dict of the other fields: precision, device, inference_precision, versions, ...).
    """
    import xml.etree.ElementTree as ElementTree

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OpenVINO model {path} does not exist")
    try:
        node = ElementTree.parse(path).getroot().find("rt_info/" + "/".join(OPENVINO_RT_INFO))
    except ElementTree.ParseError as err:
        raise ValueError(f"{path} is not an OpenVINO IR .xml file ({err})") from err
    if node is None or node.get("value") is None:
        raise ValueError(f"{path} carries no agmm-deploy metadata (rt_info {'/'.join(OPENVINO_RT_INFO)}); "
                         "export it with agmm-export --precision bf16|int8 --runtime openvino")
    return split_fields(json.loads(node.get("value")), str(path))


# AOTInductor package (.pt2, a zip): the metadata is one JSON string under this key of the package's own
# metadata (inductor config ``aot_inductor.metadata``). AOTInductor compiles it into the shared library, where
# ``AOTICompiledModel.get_metadata()`` returns it, and also writes it as ``<hash>.wrapper_metadata.json`` into
# the zip, where it can be read without loading (or being able to load) the library: e.g. a CUDA package on a
# CPU-only machine still says what it is. No sidecar: the package travels as one file.
AOTI_METADATA_KEY = "agmm_deploy"
AOTI_METADATA_SUFFIX = "wrapper_metadata.json"


def aoti_metadata_config(meta: ModelMeta, **fields: Any) -> dict[str, str]:
    """The ``aot_inductor.metadata`` inductor config carrying the metadata (AOTInductor takes str -> str)."""
    return {AOTI_METADATA_KEY: json.dumps(metadata_fields(meta, **fields))}


def read_aoti_package_metadata(path: str | Path) -> dict[str, str]:
    """AOTInductor's own metadata of a .pt2 package (str -> str: AOTI_DEVICE_KEY, AOTI_CPU_ISA, ... and ours),
    read from the zip without loading the compiled library."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AOTInductor package {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(AOTI_METADATA_SUFFIX)]
            if not names:
                raise ValueError(f"{path} is a zip archive but no AOTInductor package (it has no "
                                 f"*{AOTI_METADATA_SUFFIX}); export it with agmm-export --runtime aoti")
            return json.loads(archive.read(names[0]))
    except (zipfile.BadZipFile, OSError) as err:
        size = path.stat().st_size
        raise ValueError(f"{path} ({size} bytes) is not an AOTInductor package: not a readable zip archive "
                         f"({err}); it is empty, truncated or another format. Re-export it with agmm-export "
                         "--runtime aoti") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its AOTInductor metadata is not valid JSON ({err}); re-export it") from None


def read_aoti_metadata(path: str | Path) -> tuple[ModelMeta, dict[str, Any]]:
    """Reads the metadata of an AOTInductor .pt2 package written by export_aoti, without loading it.

    Returns:
        (ModelMeta, dict of the other fields: precision, device, channels_last, versions, ...).
    """
    package = read_aoti_package_metadata(path)
    if AOTI_METADATA_KEY not in package:
        raise ValueError(f"{path} carries no agmm-deploy metadata (AOTInductor metadata key "
                         f"{AOTI_METADATA_KEY!r}); export it with agmm-export --runtime aoti")
    return split_fields(json.loads(package[AOTI_METADATA_KEY]), str(path))


def companion_files(path: str | Path) -> list[Path]:
    """The files that travel with an artifact and exist: an engine's JSON sidecar, an IR's .bin weights."""
    path = Path(path)
    candidates = [sidecar_path(path)] + ([path.with_suffix(".bin")] if path.suffix.lower() == ".xml" else [])
    return [p for p in candidates if p.is_file()]
