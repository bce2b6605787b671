"""The training configuration: resolved once, from the data format's recipe < a YAML file < flags, and checked here.

A YAML file holds our setting names (``lr``, ``head_lr_mult``, ...) or the keys of an official AGMM config
(``lr_multi``, ``dilations``, ``aug``, ``mode``, ``criterion``, ``nclass``, ``aux``,
``replace_stride_with_dilation``), read as the official code reads them; values with no equivalent here (OHEM
criterion, aux head, full-label mode) are refused with the key and the file named. Flags that only some data
formats use (``--clicks``, ``--label``, ``--train-list``) are refused for the others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from agmm_deploy.datasets import DATA_FORMATS, DataFormat, format_flags, get_format
from agmm_deploy.model import BACKBONE_DEPTHS, DILATE_BY_OUTPUT_STRIDE, STEMS
from training.engine import EVAL_MODES

LOSSES = ("agmm", "ce")
# auto: bf16 autocast on a CUDA GPU that supports bf16, none (exact fp32) elsewhere; see resolve_for_device.
AMP_MODES = ("auto", "none", "bf16", "fp16")
# auto: channels_last on CUDA (cuDNN's fast NHWC convolutions), contiguous (exactly today's fp32 path) on the CPU.
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
# Mid-epoch checkpoints without --save-every: every 15 minutes of training (a spot machine's notice is ~30 s, an
# epoch at paper scale hours); a save of the R50 model costs about a second, well under 1 % of that.
SAVE_EVERY_SECONDS = 15 * 60
# --pretrained none: random weights, chosen explicitly (the paper's data sets refuse a run that says nothing).
PRETRAINED_NONE = "none"
# Keys of the official YAML configs, read as ours.
OFFICIAL_KEYS = {"lr_multi": "head_lr_mult", "dilations": "aspp_rates", "aug": "colour_aug"}
# Official keys that need a translation or a check (see _read_official_key). conf_thresh and weight are read by
# no official training script (train_city.py, train_voc.py), so they change nothing there either.
TRANSLATED_OFFICIAL_KEYS = {"mode", "criterion", "nclass", "aux", "replace_stride_with_dilation"}
UNUSED_OFFICIAL_KEYS = {"conf_thresh", "weight"}
# replace_stride_with_dilation of the official ResNet, as our output stride.
OUTPUT_STRIDE_OF_DILATION = {dilate: stride for stride, dilate in DILATE_BY_OUTPUT_STRIDE.items()}


class ConfigError(ValueError):
    """A setting (flag, config file value, or their combination) that this training cannot run with."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. Defaults here are the official code's; the data format's row gives
    the recipe (model and schedule) and the values of its own flags (``options``).

    Attributes (the flags of ``python -m training.run`` with underscores):
        options: the data format's own settings, e.g. {"clicks": 20, "train_list": None} for Cityscapes.
        lr: backbone learning rate; the head gets lr x head_lr_mult.
        batch_size: images per process (per GPU).
        max_steps: stop after this many optimiser steps (the poly schedule ends there too).
        pretrained: backbone weights (file or 'imagenet'), 'none' for random weights on purpose, or None (not
            given: refused for a format with ``pretrained_source`` unless the run resumes).
        amp, memory_format: ``auto`` until ``resolve_for_device`` picks the device's choice (what checkpoints keep).
        workers: data loader workers per process; None: derived from the cores per process (training.data).
        eval_mode: auto (the data format's schedule) or one of EVAL_MODES.
        log_every: log (and copy the losses from the device) every N steps.
        table_every: the per-class IoU table with every N-th evaluation's line (and always with the last one).
        save_every: a mid-epoch checkpoint (last.pt) every N optimiser steps; None: every SAVE_EVERY_SECONDS of
            training; 0: at epoch ends only.
    """

    dataset: str
    data_root: str
    out: str
    backbone: str
    multi_grid: bool
    aspp_rates: tuple[int, int, int]
    crop_size: int
    epochs: int
    batch_size: int
    lr: float
    head_lr_mult: float
    colour_aug: bool
    options: dict[str, Any] = field(default_factory=dict)
    stem: str = "deep"
    output_stride: int = 8
    pretrained: str | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    max_steps: int | None = None
    loss: str = "agmm"
    amp: str = "auto"
    memory_format: str = "auto"
    workers: int | None = None
    seed: int = 0
    device: str = "auto"
    eval_mode: str = "auto"
    eval_every: int = 1
    table_every: int = 10
    max_val_images: int | None = None
    log_every: int = 10
    save_every: int | None = None
    resume: str | None = None

    @property
    def data_format(self) -> DataFormat:
        return get_format(self.dataset)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the data format's options flattened in), as written to config.yaml and checkpoints."""
        data = dataclasses.asdict(self)
        data.update(data.pop("options"))
        data["aspp_rates"] = list(self.aspp_rates)
        return data


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Settings of the form "int >= minimum" / "float >= minimum" (None allowed where the default is None).
_INTS = {"crop_size": 1, "epochs": 1, "batch_size": 1, "output_stride": 1, "workers": 0, "seed": 0,
         "max_steps": 1, "eval_every": 1, "table_every": 1, "max_val_images": 1, "log_every": 1,
         "save_every": 0}
_FLOATS = {"lr": 0.0, "head_lr_mult": 0.0, "momentum": 0.0, "weight_decay": 0.0, "poly_power": 0.0}
_CHOICES = {"backbone": tuple(BACKBONE_DEPTHS), "stem": STEMS, "output_stride": tuple(DILATE_BY_OUTPUT_STRIDE),
            "loss": LOSSES, "amp": AMP_MODES, "memory_format": MEMORY_FORMATS, "eval_mode": ("auto", *EVAL_MODES)}  # auto: the data format's schedule
_BOOLS = ("multi_grid", "colour_aug")


def resolve_config(flags: dict[str, Any], config_path: str | Path | None = None) -> TrainConfig:
    """The run's settings: the data format's recipe < the ``--config`` file < explicit flags.

    Args:
        flags: settings given on the command line, our names with underscores; None means "not given".
        config_path: YAML file of our settings or of official AGMM keys (lr_multi, dilations, aug, mode, ...).
    Returns:
        The checked TrainConfig. Raises ConfigError naming the setting (and the file) otherwise.
    """
    path = Path(config_path) if config_path else None
    from_file, official = _read_config_file(path) if path is not None else ({}, {})
    given = {k: v for k, v in flags.items() if v is not None}
    dataset = given.get("dataset", from_file.get("dataset"))
    if dataset is None:
        raise ConfigError(f"--dataset is required ({', '.join(sorted(DATA_FORMATS))}), as a flag or in --config")
    if dataset not in DATA_FORMATS:
        raise ConfigError(f"dataset {dataset!r} is not supported; expected one of {sorted(DATA_FORMATS)}")
    row = get_format(dataset)
    for key, value in official.items():
        for ours, setting in _read_official_key(key, value, row, path).items():
            if ours in from_file and from_file[ours] != setting:
                raise ConfigError(f"--config {path}: {key}: {value!r} means {ours}={setting!r}, but the file also "
                                  f"sets {ours}: {from_file[ours]!r}; keep one of the two")
            from_file[ours] = setting
    own = {flag.name for flag in row.flags}
    for name in format_flags():
        if name not in own and (name in given or name in from_file):
            where = "" if name in given else f"--config {path}: "
            takes = ", ".join(f"--{f.name.replace('_', '-')}" for f in row.flags) or "none of them"
            raise ConfigError(f"{where}--{name.replace('_', '-')} is not used by --dataset {dataset} (its data-set "
                              f"flags: {takes}); remove it")
    model = {k: v for k, v in row.model.items() if k in _FIELDS}  # num_classes comes from the data
    settings = {**model, **row.recipe, **row.flag_defaults(), **from_file, **given, "dataset": dataset}
    options = {name: settings.pop(name) for name in own}
    if settings.get("data_root") is None:
        raise ConfigError("--data-root is required: the folder holding the data set")
    if settings.get("out") is None:
        settings["out"] = f"runs/{dataset}"
    values = {name: _checked(name, value, path) for name, value in settings.items()}
    if values.get("pretrained") is None and values.get("resume") is None and row.pretrained_source:
        raise missing_pretrained(row, values["backbone"])
    for flag in row.flags:
        if options[flag.name] is not None and flag.choices is not None and options[flag.name] not in flag.choices:
            raise ConfigError(f"{flag.name}={options[flag.name]!r} is not a {row.title} setting; expected one of "
                              f"{list(flag.choices)}")
    return TrainConfig(**values, options=options)


def resolve_for_device(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """``cfg`` with ``amp`` and ``memory_format`` ``auto`` replaced by what this device runs fastest.

    On CUDA: bf16 autocast where the GPU supports bf16 (Ampere and later; else none, never a quiet fp16 with its
    loss scaling) and channels_last. On the CPU: none and contiguous, the exact fp32 path. An explicit
    ``--amp bf16|fp16`` is kept and checked here: refused on the CPU, and bf16 on a GPU without it.
    """
    cuda = device.type == "cuda"
    amp, memory_format = cfg.amp, cfg.memory_format
    if amp == "auto":
        amp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "none"
    elif amp != "none" and not cuda:
        raise ConfigError(f"--amp {amp} needs a CUDA device; this run is on {device}. Use --amp none on CPU.")
    elif amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--amp bf16: {torch.cuda.get_device_name(device)} does not support bfloat16 "
                          "(torch.cuda.is_bf16_supported() is False); use --amp fp16 or --amp none")
    if memory_format == "auto":
        memory_format = "channels_last" if cuda else "contiguous"
    return dataclasses.replace(cfg, amp=amp, memory_format=memory_format)


def missing_pretrained(row: DataFormat, backbone: str, why: str = "") -> ConfigError:
    """The refusal of a paper-recipe run without backbone weights: random weights there are a wasted week."""
    return ConfigError(f"--dataset {row.name} needs --pretrained{why}: {row.pretrained_source}. Pass --pretrained "
                       f"/path/to/{backbone}.pth, or --pretrained none to train from random weights on purpose")


def random_weights(pretrained: str | None) -> bool:
    """Whether the run starts from random weights (``--pretrained`` not given, or ``none``)."""
    return pretrained is None or pretrained.lower() == PRETRAINED_NONE


def _read_config_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(our settings, official keys still to translate) of a YAML file."""
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path} holds a {type(loaded).__name__}; expected a mapping of settings")
    known = (set(_FIELDS) - {"options"}) | set(format_flags())
    ours, official = {}, {}
    for key, value in loaded.items():
        key = OFFICIAL_KEYS.get(key.replace("-", "_"), key.replace("-", "_"))
        if key in UNUSED_OFFICIAL_KEYS:
            continue
        if key in TRANSLATED_OFFICIAL_KEYS:
            official[key] = value
            continue
        if key not in known:
            raise ConfigError(f"--config {path}: unknown setting {key!r}; expected one of "
                              f"{sorted(known | TRANSLATED_OFFICIAL_KEYS)}")
        ours[key] = value
    return ours, official


def _read_official_key(key: str, value: Any, row: DataFormat, path: Path) -> dict[str, Any]:
    """One official config key as our settings (maybe none), or a ConfigError naming the key and the file."""
    where = f"--config {path}: {key}: {value!r}"
    if key == "mode":
        try:
            return row.official_mode(value)
        except ValueError as err:  # the row says the rest of the sentence
            raise ConfigError(f"{where}{err}") from None
    if key == "criterion":
        # The official scripts use plain cross-entropy for name CELoss and OHEM for any other name; we have CE.
        criterion = value if isinstance(value, dict) else {"name": value}
        extra = {k: v for k, v in (criterion.get("kwargs") or {}).items() if (k, v) != ("ignore_index", 255)}
        unknown = set(criterion) - {"name", "kwargs", "use_class_weight"}
        if criterion.get("name") != "CELoss" or criterion.get("use_class_weight") or extra or unknown:
            raise ConfigError(f"{where} is not implemented: the seg term here is plain cross-entropy (criterion "
                              "name CELoss, no class weights, ignore_index 255; OHEM is not available). Set name: "
                              "CELoss or remove the key")
        return {}
    if key == "nclass":
        if row.classes is None:
            raise ConfigError(f"{where}: a {row.title} data set names its classes in its data root; remove the key")
        if value != len(row.classes):
            raise ConfigError(f"{where} does not match dataset {row.name} ({len(row.classes)} classes)")
        return {}
    if key == "aux":
        if value:
            raise ConfigError(f"{where}: the auxiliary head is not implemented; set aux: False or remove the key")
        return {}
    if key == "replace_stride_with_dilation":
        stride = OUTPUT_STRIDE_OF_DILATION.get(tuple(bool(v) for v in value) if isinstance(value, list) else None)
        if stride is None:
            raise ConfigError(f"{where} cannot be mapped; expected [False, True, True] (output stride 8) or "
                              "[False, False, True] (output stride 16)")
        return {"output_stride": stride}
    raise AssertionError(f"no translation for official key {key!r}")


def _checked(name: str, value: Any, path: Path | None) -> Any:
    """``value`` as the type of setting ``name`` (YAML may give "1e-3" as text), or a ConfigError saying why not."""
    def refuse(expected: str) -> ConfigError:
        return ConfigError(f"{name}={value!r} is invalid; expected {expected}"
                           + (f" (flag or --config {path})" if path else ""))

    if name in _BOOLS:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            value = value.lower() in ("true", "yes", "on", "1")
        if not isinstance(value, bool):
            raise refuse("true or false")
    elif name in _INTS:
        if value is None and _FIELDS[name].default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < _INTS[name]:
            raise refuse(f"an integer >= {_INTS[name]}")
    elif name in _FLOATS:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise refuse("a number") from None
        if not value >= _FLOATS[name]:
            raise refuse(f"a number >= {_FLOATS[name]:g}")
    elif name == "aspp_rates":
        if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in value):
            raise refuse("three positive integers, e.g. [12, 24, 36]")
        value = tuple(value)
    elif name in ("dataset", "data_root", "out", "pretrained", "resume", "device"):
        value = None if value is None else str(value)
    if name in _CHOICES and value not in _CHOICES[name]:
        raise refuse(f"one of {list(_CHOICES[name])}")
    return value
