"""The artifacts of a model folder, and which one a server runs; putting an export folder into the BentoML store.

``choose_model(settings)`` is the server's choice: the file AGMM_MODEL names, or one artifact of the folder it
names (or of the store entry AGMM_BENTO_MODEL names), by the table below.

A model folder is what agmm-export writes (``--out``) or a BentoML model store entry holding it: model.onnx
and, beside it, the reduced-precision files (model.int8.xml + .bin, model.fp16.onnx, model.engine + .json, ...).
The server runs exactly one of them, chosen once at start-up:

===========================  ==========================================================================
setting                      the artifact served
===========================  ==========================================================================
(none)                       the fp32 artifact (model.onnx): never another precision unasked; a folder
                             without one is refused with its choices listed
AGMM_PRECISION=int8          the artifact whose metadata says int8; where several do (model.int8.xml
                             and model.int8.onnx), the first this machine runs in this order: the
                             files agmm-export names in its precision table's order (model.onnx,
                             model.int8.xml before model.int8.onnx: its default int8 row), then the
                             others in the runtime table's order
AGMM_MODEL_FILE=model.x.y    that file of the folder (its precision must match AGMM_PRECISION if set)
===========================  ==========================================================================

Anything else is refused with the folder's artifacts listed, each with its precision and the setting that
selects it. Files renamed ``*.failed`` by agmm-export (they missed their parity gates) are never chosen, not even
by name; an artifact whose backend is missing here, or made for a device this machine lacks (model.fp16.onnx is
for CUDA), is listed with the reason and refused.

    python -m serving.artifacts exported/ --name agmm-city     # every artifact of the folder into the store
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from agmm_deploy import contract
from agmm_deploy.export.parity import FAILED_SUFFIX
from agmm_deploy.runtime import backend_for, describe_suffixes, model_suffixes
from serving.settings import ServeSettings, read_settings

DEFAULT_PRECISION = "fp32"
# Besides the artifacts and their companions, what the store entry keeps from an export folder.
RECORDS = ("parity.json",)


@dataclass(frozen=True)
class Artifact:
    """One servable file of a model folder."""

    path: Path
    backend: str  # the runtime table row that runs it
    precision: str  # from its metadata ("unknown" when it has none readable)
    device: str  # what it was made for, from its metadata: any | cpu | cuda
    missing: str | None  # why this machine cannot run it (None: it can)

    def describe(self) -> str:
        """e.g. 'model.int8.xml (int8, openvino, cpu)'; with the reason when it cannot run here."""
        where = f", cannot run here: {self.missing}" if self.missing else ""
        return f"{self.path.name} ({self.precision}, {self.backend}, {self.device}{where})"


def read_artifact(path: Path, device: str = "auto") -> Artifact:
    """The file's backend, precision and target device from its own metadata, and whether it runs here."""
    import torch

    backend = backend_for(path)
    precision, target = DEFAULT_PRECISION, "any"
    try:
        # Each runtime module reads its own artifacts' metadata (the runtime table); a checkpoint has none.
        found = backend.read_metadata(path)
    except (OSError, ValueError):  # a foreign or broken file: listed, never chosen by its precision
        found, precision, target = None, "unknown", "?"
    if found is not None:
        precision, target = found[1].get("precision", DEFAULT_PRECISION), found[1].get("device", "any")
    elif backend.name != "pytorch":  # a row without a reader (e.g. from AGMM_EXTRA_BACKENDS): unknown
        precision, target = "unknown", "?"
    missing = backend.missing(device)
    # The runners refuse an artifact made for another device rather than run it slowly (model.fp16.onnx is for
    # onnxruntime-cuda); say so here, before it is chosen.
    here = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if missing is None and target in ("cpu", "cuda") and target != here and not (target == "cpu" and
                                                                                 device == "auto"):
        missing = f"it was made for {target}, " + ("which this machine lacks" if device == "auto" else
                                                   f"not AGMM_DEVICE={device}")
    return Artifact(path, backend.name, precision, target, missing)


def folder_artifacts(folder: Path, device: str = "auto") -> list[Artifact]:
    """The folder's servable files, in the order of preference of the module docstring; ``*.failed`` files have
    no suffix of the runtime table, so they are not among them."""
    from agmm_deploy.export.precision import PRECISIONS

    suffixes = model_suffixes()
    named = [row.file_name for row in PRECISIONS]  # agmm-export's names, its default row of each precision first

    def preference(path: Path) -> tuple[int, int, str]:
        return (named.index(path.name) if path.name in named else len(named), suffixes.index(path.suffix.lower()),
                path.name)

    found = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes), key=preference)
    return [read_artifact(p, device) for p in found]


def selector(artifact: Artifact, artifacts: list[Artifact]) -> str:
    """The setting that selects ``artifact``: none for the fp32 one served by default, AGMM_PRECISION when it is
    the one that precision picks (choose_artifact's order), else AGMM_MODEL_FILE."""
    same = [a for a in artifacts if a.precision == artifact.precision and not a.missing]
    if artifact.precision == "unknown" or artifact.missing or same[0] != artifact:
        return f"AGMM_MODEL_FILE={artifact.path.name}"
    if artifact.precision == DEFAULT_PRECISION:
        return "no setting (the default)"
    return f"AGMM_PRECISION={artifact.precision}"


def describe_choices(artifacts: list[Artifact], failed: list[Path], leave_out: Path | None = None) -> list[str]:
    """One line per artifact but ``leave_out``: what it is and the setting that serves it; then the files set
    aside as ``*.failed``."""
    lines = [f"{a.describe()} -> {selector(a, artifacts)}" for a in artifacts if a.path != leave_out]
    return lines + [f"{p.name} (missed its parity gates; never served)" for p in failed]


def failed_files(folder: Path) -> list[Path]:
    """The artifacts agmm-export set aside in ``folder`` (renamed ``*.failed``)."""
    return sorted(p for p in folder.iterdir() if p.name.endswith(FAILED_SUFFIX))


def choose_artifact(folder: Path, precision: str = "", file_name: str = "", device: str = "auto") -> Artifact:
    """The artifact of ``folder`` a server runs: by file name, by precision, or the fp32 one (module docstring).

    Raises:
        FileNotFoundError / ValueError with one sentence listing the folder's choices.
    """
    artifacts = folder_artifacts(folder, device)
    choices = "; ".join(describe_choices(artifacts, failed_files(folder))) or "nothing servable"
    if file_name:
        named = [a for a in artifacts if a.path.name == file_name]
        if not named:
            why = " (it missed its parity gates)" if (folder / file_name).exists() and \
                file_name.endswith(FAILED_SUFFIX) else ""
            raise FileNotFoundError(f"AGMM_MODEL_FILE={file_name} is not a servable file of {folder}{why}; it holds: "
                                    f"{choices}")
        chosen = named[0]
        if precision and chosen.precision != precision:
            raise ValueError(f"AGMM_MODEL_FILE={file_name} is {chosen.precision}, not AGMM_PRECISION={precision}; "
                             f"unset one of them. {folder} holds: {choices}")
    else:
        wanted = precision or DEFAULT_PRECISION
        matching = [a for a in artifacts if a.precision == wanted]
        runnable = [a for a in matching if not a.missing]
        if not runnable:
            asked = f"AGMM_PRECISION={precision}" if precision else "no AGMM_PRECISION (the default is fp32)"
            have = "none of them runs on this machine" if matching else f"it holds no {wanted} artifact"
            raise FileNotFoundError(f"{asked}, but {have} in {folder}; it holds: {choices}. Set AGMM_PRECISION or "
                                    "AGMM_MODEL_FILE as listed.")
        chosen = runnable[0]
    if chosen.missing:
        raise RuntimeError(f"{chosen.path.name} cannot run on this machine: {chosen.missing}. {folder} holds: "
                           f"{choices}")
    return chosen


@dataclass(frozen=True)
class ModelChoice:
    """The artifact this server runs, and how it was chosen (logged at start-up, reported by /info)."""

    path: Path
    chosen_by: str  # e.g. "AGMM_MODEL", "AGMM_PRECISION=int8", "the default (fp32)"
    folder: Path | None = None  # the model folder it was chosen from
    others: tuple[str, ...] = ()  # the folder's other artifacts: "<file> (<precision>, ...) -> <setting>"


def choose_model(settings: ServeSettings | None = None) -> ModelChoice:
    """The artifact named by AGMM_MODEL (a file, or a folder to choose from) or chosen from the BentoML store entry
    named by AGMM_BENTO_MODEL; AGMM_PRECISION / AGMM_MODEL_FILE pick within a folder (choose_artifact).

    Args:
        settings: the service's; None reads them from the environment now.
    Raises:
        RuntimeError (no model named), FileNotFoundError / ValueError (a choice that cannot be met), each one
        sentence; bentoml.exceptions.NotFound for an unknown store tag.
    """
    settings = read_settings() if settings is None else settings
    precision, file_name, device = settings.precision, settings.model_file, settings.device
    folder = None
    if path := settings.model:
        path = Path(path).expanduser()
        if path.is_dir():
            folder = path
        elif not path.is_file():
            raise FileNotFoundError(f"AGMM_MODEL={path} does not exist; expected {describe_suffixes()}, or a "
                                    "folder agmm-export wrote")
        elif file_name:
            raise ValueError(f"AGMM_MODEL_FILE={file_name} picks a file within a model folder, but AGMM_MODEL={path} "
                             "names a file already; unset one of them")
        elif precision and (found := read_artifact(path, device).precision) != precision:
            raise ValueError(f"AGMM_MODEL={path} is {found}, not AGMM_PRECISION={precision}; unset AGMM_PRECISION "
                             "or point AGMM_MODEL at the folder holding the artifacts")
        else:
            return ModelChoice(path, "AGMM_MODEL")
    elif tag := settings.bento_model:
        import bentoml

        folder = Path(bentoml.models.get(tag).path)
    else:
        raise RuntimeError(no_model_message())
    chosen = choose_artifact(folder, precision, file_name, device)
    chosen_by = (f"AGMM_MODEL_FILE={file_name}" if file_name else f"AGMM_PRECISION={precision}" if precision
                 else "the default (fp32)")
    others = describe_choices(folder_artifacts(folder, device), failed_files(folder), leave_out=chosen.path)
    return ModelChoice(chosen.path, chosen_by, folder, tuple(others))




def no_model_message() -> str:
    """The sentence for a server started without a model, its artifact list from the runtime table."""
    return (f"No model to serve: set AGMM_MODEL=path/to/model (a file: {describe_suffixes()}; or an agmm-export "
            "folder), or AGMM_BENTO_MODEL=<tag> of a model saved in the BentoML model store.")


def save_to_store(folder: Path, name: str) -> str:
    """Copies every servable artifact of an export folder, with the files that travel with it (an engine's .json,
    an IR's .bin) and parity.json, into a new BentoML model store entry; ``*.failed`` files stay behind.

    Returns:
        The entry's tag, e.g. 'agmm-city:abc123'.
    """
    import bentoml

    artifacts = folder_artifacts(folder)
    if not artifacts:
        raise FileNotFoundError(f"{folder} holds no artifact to serve ({'/'.join(model_suffixes())}); expected an "
                                "agmm-export output folder")
    files = [f for a in artifacts for f in (a.path, *contract.companion_files(a.path))]
    files += [folder / r for r in RECORDS if (folder / r).is_file()]
    with bentoml.models.create(name, metadata={"artifacts": {a.path.name: a.precision for a in artifacts}}) as model:
        for path in files:
            shutil.copy2(path, model.path_of(path.name))
    return str(model.tag)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m serving.artifacts",
                                     description="Save an agmm-export output folder into the BentoML model store, "
                                                 "every precision with it; serve it with AGMM_BENTO_MODEL=<tag>.")
    parser.add_argument("folder", type=Path, help="the agmm-export --out folder (model.onnx, model.int8.xml, ...)")
    parser.add_argument("--name", required=True, help="the store entry's name, e.g. agmm-city")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not args.folder.is_dir():
        print(f"python -m serving.artifacts: {args.folder} is not a folder; expected the agmm-export --out folder",
              file=sys.stderr)
        return 2
    try:
        tag = save_to_store(args.folder, args.name)
    except FileNotFoundError as err:
        print(f"python -m serving.artifacts: {err}", file=sys.stderr)
        return 2
    artifacts = folder_artifacts(args.folder)
    print(f"saved {tag}; AGMM_BENTO_MODEL={tag} bentoml serve serves, by setting:")
    for line in describe_choices(artifacts, []):
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
