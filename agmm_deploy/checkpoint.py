"""Self-describing checkpoints: atomic writes, and loading of our own files or raw official state dicts.

A checkpoint written here is a dict::

    {"format": "agmm-deploy/1", "model": state_dict, "model_config": ModelConfig.to_dict(),
     "meta": ModelMeta.to_dict(), "epoch": ..., "step": ..., "optimizer": ..., "scheduler": ..., "scaler": ...,
     "args": {...}, ...}

Export and serving rebuild the model from it alone. A raw state dict written by the official AGMM code
(``torch.save(model.module.state_dict())``) has no config, so the caller names backbone and classes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agmm_deploy.atomic import atomic_write
from agmm_deploy.contract import ModelMeta
from agmm_deploy.datasets import OWN_CLASSES_FORMAT, get_format, official_formats
from agmm_deploy.model import DeepLabV3Plus, ModelConfig

FORMAT = "agmm-deploy/1"


def raw_recipes() -> tuple[str, ...]:
    """The official recipes a raw state dict can come from: the data formats with official weights (each fixes
    the ASPP rates and multi-grid)."""
    return tuple(row.name for row in official_formats())


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the requested model."""


@dataclass
class LoadedModel:
    """What load_model returns.

    Attributes:
        model: the network in eval mode, on the CPU.
        config: its architecture.
        meta: classes, palette, input size, normalisation.
        checkpoint: the file's dict (for a raw state dict: one built like ours, with ``raw: True``).
        path: the file read.
    """

    model: DeepLabV3Plus
    config: ModelConfig
    meta: ModelMeta
    checkpoint: dict[str, Any]
    path: Path


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _plain(value: Any) -> Any:
    """Makes run args loadable with weights_only=True: paths and other objects become strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """Writes ``obj`` with ``torch.save`` to ``path`` atomically (temporary file, fsync, rename).

    A reader (or a run killed mid-write) sees either the old file or the complete new one, never a torn file.
    """
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: str | Path, model: nn.Module, meta: ModelMeta, *,
                    args: dict[str, Any] | None = None, **training_state: Any) -> Path:
    """Saves model weights, its config and metadata, plus any training state, atomically.

    Args:
        model: the DeepLabV3Plus (possibly DDP-wrapped); its ``config`` is stored as a dict.
        meta: classes, palette, input size and normalisation.
        args: the run's arguments (stored as plain values).
        training_state: e.g. epoch=, step=, optimizer=opt.state_dict(), scheduler=..., scaler=..., best_miou=.
    Returns:
        The path written.
    """
    net = unwrap(model)
    state = {
        "format": FORMAT,
        "model": net.state_dict(),
        "model_config": net.config.to_dict(),
        "meta": meta.to_dict(),
        "args": _plain(args or {}),
        "versions": {"torch": str(torch.__version__)},  # TorchVersion is not weights_only-safe
        **training_state,
    }
    return atomic_torch_save(state, path)


def first_nonfinite(tensors: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor holding NaN or Inf (``None`` when all are finite).

    One rule for the load side (export, serving, prediction refuse such a checkpoint) and the save side
    (training never writes one), so both name the same tensor.
    """
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read ``chunk`` bytes at a time (recorded in exported artifacts for traceability)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint file (ours or a raw state dict) with ``weights_only=True``; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; expected a .pt/.pth file written by training.run "
                              "or a raw AGMM state dict")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle errors, unsafe globals
        reason = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line),
                      str(err).splitlines()[0] if str(err) else "")
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {reason}); "
            "the file may be truncated or not a PyTorch checkpoint. Re-copy it or point to another file."
        ) from err
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}; expected a dict (state dict or "
                              "agmm-deploy checkpoint)")
    return data


def _check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
                  for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}"
                     f"{' ...' if len(unexpected) > 10 else ''}")
    if mismatched:
        parts.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:6])}")
    cfg = model.config
    raise CheckpointError(
        f"{source} does not match DeepLabV3+ {cfg.backbone} (stem={cfg.stem}, num_classes={cfg.num_classes}): "
        + "; ".join(parts)
        + ". Check --backbone, --num-classes and the stem (deep vs torchvision) against the file."
    )


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuses weights holding NaN or Inf: such a model answers one class everywhere and passes a parity check
    (argmax of NaN is 0 on every backend alike), so it must not get that far."""
    name = first_nonfinite(state)
    if name is None:
        return
    value = state[name]
    nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
    raise CheckpointError(f"{path} holds non-finite weights: {name} has {nan} NaN and {inf} Inf of its "
                          f"{value.numel()} values (the first such tensor); the training run diverged or the file "
                          "was damaged. Use an earlier checkpoint (e.g. best.pt) or train again with a lower --lr")


def _infer_stem(state: dict[str, torch.Tensor]) -> str:
    return "deep" if "backbone.conv1.0.weight" in state else "torchvision"


def _raw_config_and_meta(path: Path, state: dict[str, torch.Tensor], backbone: str, num_classes: int,
                         dataset: str | None, input_size: tuple[int, int] | None,
                         classes: tuple[str, ...] | None) -> tuple[ModelConfig, ModelMeta]:
    """The architecture and metadata of a raw official state dict, from what the caller says about it."""
    # The file says nothing about the recipe, and both recipes have the same weight shapes: a strict load
    # would succeed with the wrong ASPP rates / multi-grid and give wrong logits. So the recipe is never guessed.
    if dataset not in raw_recipes():
        recipes = " or ".join(f"{row.name} (ASPP rates {'/'.join(map(str, row.model['aspp_rates']))}"
                              f"{', multi-grid' if row.model['multi_grid'] else ''})" for row in official_formats())
        raise CheckpointError(
            f"{path} is a raw state dict, so --dataset must name the official recipe it was trained with: "
            f"{recipes}; got {dataset!r}. A model trained on other classes takes its recipe plus its class names "
            "(--classes)."
        )
    recipe = get_format(dataset)
    try:
        config = ModelConfig.for_dataset(dataset, backbone=backbone, num_classes=num_classes, stem=_infer_stem(state))
    except ValueError as err:
        raise CheckpointError(f"cannot build a model for {path}: {err}") from err
    size = input_size or recipe.official_input_size  # the official crop
    if classes is not None:
        if len(classes) != num_classes:
            raise CheckpointError(f"{len(classes)} class names were given for --num-classes {num_classes} "
                                  f"({path}); expected one name per class")
        return config, ModelMeta.for_dataset(OWN_CLASSES_FORMAT, size, tuple(classes))
    meta = ModelMeta.for_dataset(dataset, size)
    if meta.num_classes != num_classes:
        same_size = [row for row in official_formats() if len(row.classes) == num_classes]
        hint = (f"a {num_classes}-class {same_size[0].title} model needs --dataset {same_size[0].name}" if same_size
                else "for a model trained on other classes pass their names with --classes")
        raise CheckpointError(f"--num-classes {num_classes} does not match the {meta.num_classes} classes of "
                              f"--dataset {dataset} ({path}); {hint}")
    return config, meta


def load_model(path: str | Path, *, backbone: str | None = None, num_classes: int | None = None,
               dataset: str | None = None, input_size: tuple[int, int] | None = None,
               classes: tuple[str, ...] | None = None) -> LoadedModel:
    """Rebuilds the model (in eval mode) from a checkpoint alone, or from a raw official state dict.

    Args:
        path: our checkpoint, or a raw state dict (keys ``backbone.*``, ``head.*``, ``reduce.*``, ``fuse.*``,
            ``classifier.*``, optionally prefixed by ``module.``).
        backbone, num_classes, dataset: required for raw state dicts only; ``dataset`` (a data format with
            an official recipe, see raw_recipes()) is the official recipe the weights were trained with: it
            selects the ASPP rates and multi-grid, and the class names unless ``classes`` is given.
        input_size, classes: optional metadata for raw state dicts (default: the recipe's crop and classes);
            ``classes`` names the classes of a model trained on other data (one name per class).
    Returns:
        LoadedModel with the model in eval mode on the CPU.
    """
    path = Path(path)
    data = read_checkpoint(path)
    if "model_config" in data:
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{path} has format {data.get('format')!r}; this version reads {FORMAT!r}")
        try:
            config = ModelConfig.from_dict(data["model_config"])
            meta = ModelMeta.from_dict(data["meta"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path} has an invalid model_config/meta: {err}") from err
        if num_classes is not None and num_classes != config.num_classes:
            raise CheckpointError(f"--num-classes {num_classes} contradicts {path}, which was trained with "
                                  f"num_classes={config.num_classes}; drop the flag or use the right checkpoint")
        state = data["model"]
        checkpoint = data
    else:
        state = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if not state:
            raise CheckpointError(f"{path} holds no tensors; expected a state dict or an agmm-deploy checkpoint")
        if backbone is None or num_classes is None:
            raise CheckpointError(
                f"{path} is a raw state dict without a model config; pass --backbone (e.g. resnet101), "
                f"--num-classes (e.g. 21) and --dataset {'|'.join(raw_recipes())} (the recipe it was trained with)"
            )
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        config, meta = _raw_config_and_meta(path, state, backbone, num_classes, dataset, input_size, classes)
        checkpoint = {"model": state, "model_config": config.to_dict(), "meta": meta.to_dict(), "raw": True}
    model = DeepLabV3Plus(config)
    _check_state_dict(model, state, str(path))
    _check_finite(state, path)
    model.load_state_dict(state, strict=True)
    model.eval()
    return LoadedModel(model=model, config=config, meta=meta, checkpoint=checkpoint, path=path)
