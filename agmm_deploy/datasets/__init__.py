"""The data formats this toolkit trains and evaluates on: one table, one file per format.

Each row says everything the rest of the code needs about a format: its folder layout, how to list the
(image, label) pairs of its train and val splits, its classes and palette (fixed, or read from the data root),
the paper's recipe for it (model and training hyperparameters), the flags it accepts and their allowed values,
how an official AGMM config's ``mode`` key reads, how evaluation runs on it, and how to write a synthetic data set
in its layout. Training, synthetic data, checkpoints, ``ModelConfig.for_dataset``, ``ModelMeta.for_dataset`` and
evaluation ask ``get_format(name)``; none of them names a format.

Adding a format is one new file here (its ``FORMAT = DataFormat(...)`` row) plus its module in ``_table()``.

    >>> get_format("cityscapes").recipe["crop_size"]
    721
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping


class DataError(ValueError):
    """A data root, split file, image or label is missing or holds values the training cannot use."""


@dataclass(frozen=True)
class Sample:
    image: Path
    label: Path


@dataclass(frozen=True)
class Flag:
    """A training flag that only some formats use (``--clicks``, ``--label``, ``--train-list``).

    Attributes:
        name: the setting's name (``--`` + name with dashes is the flag).
        type: the value's type (the flag's argparse type).
        choices: the values allowed, or None for any.
        default: the value when neither flag nor config file gives one.
        help: one line for ``--help``.
    """

    name: str
    type: type = str
    choices: tuple[Any, ...] | None = None
    default: Any = None
    help: str = ""


# Where the official recipes' backbone weights come from (the official resnet.py loads them with strict=False).
OFFICIAL_BACKBONE_WEIGHTS = ("the official code always starts from ImageNet-pretrained deep-stem ('v1c') ResNets, "
                             "resnet50.pth / resnet101.pth, linked under 'Pretrained Backbone' in the README of the "
                             "official AGMM code (GitHub Luffy03/AGMM-SASS)")

# Split files in the official AGMM format ('<image> <label>' per line) or VOC ids: formats with split files.
TRAIN_LIST = Flag("train_list", help="split file: '<image> <label>' per line (official format) or VOC ids")
VAL_LIST = Flag("val_list", help="split file of the validation images, same formats")


@dataclass(frozen=True)
class DataFormat:
    """One row of the table.

    Attributes:
        name: what ``--dataset`` takes.
        title: the data set's name in sentences.
        layout: the folder tree, as a user reads it in ``--help`` and errors.
        classes, palette: the class names (index = label value) and one RGB colour each; None when the data
            root says (``read_classes``).
        read_classes: root -> (classes, palette or None), for formats whose classes live with the data.
        model: ``ModelConfig`` fields of the paper's recipe (backbone, multi_grid, aspp_rates).
        recipe: training settings of the paper's recipe (crop_size, epochs, batch_size, lr, head_lr_mult,
            colour_aug).
        flags: the format-only flags it accepts (see ``Flag``); others are refused.
        train_samples, val_samples: (root, options) -> (image, label) pairs; options holds the values of
            ``flags``. ``val_samples`` returns None when the data set has no validation split.
        official_mode: an official config's ``mode`` value -> our settings; raises ValueError with the rest of
            a sentence that starts with the key and the file.
        val_mode: evaluation during training; final_val_mode for the last final_val_epochs epochs.
        eval_mode: the default of ``python -m training.evaluate``: the paper's protocol for the paper's data sets,
            else ``served`` (what agmm-predict and the service compute). Modes: training.engine.EVAL_MODES.
        official_input_size: the official crop, for a raw official state dict trained with this recipe; None
            when no official weights exist for this format.
        pretrained_source: for the paper's data sets, where the backbone weights of the official recipe come
            from (a training run then refuses to start without ``--pretrained``, or ``--pretrained none``);
            None where training from random weights is an ordinary choice.
        official_ids: the id of each class in the files the data set's official evaluation reads, where they
            differ from the class index (Cityscapes labelIds); ``training.evaluate --png-ids official`` writes them.
        write_synthetic: (root, split, index, rng, height, width, click_radius) -> image id; writes one image
            with its labels in this layout. finish_synthetic(root, ids) writes split files / class lists.
    """

    name: str
    title: str
    layout: str
    classes: tuple[str, ...] | None
    palette: tuple[tuple[int, int, int], ...] | None
    model: Mapping[str, Any]
    recipe: Mapping[str, Any]
    train_samples: Callable[[Path, Mapping[str, Any]], list[Sample]]
    val_samples: Callable[[Path, Mapping[str, Any]], list[Sample] | None]
    official_mode: Callable[[Any], dict[str, Any]]
    write_synthetic: Callable[..., str]
    finish_synthetic: Callable[[Path, dict[str, list[str]]], None]
    flags: tuple[Flag, ...] = ()
    read_classes: Callable[[Path], tuple[tuple[str, ...], tuple[tuple[int, int, int], ...] | None]] | None = None
    val_mode: str = "served"
    final_val_mode: str | None = None
    final_val_epochs: int = 0
    eval_mode: str = "served"
    official_input_size: tuple[int, int] | None = None
    pretrained_source: str | None = None
    official_ids: tuple[int, ...] | None = None

    def classes_and_palette(self, root: str | Path) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...] | None]:
        """The class names and palette of the data set under ``root`` (fixed ones need no root)."""
        if self.classes is not None:
            return self.classes, self.palette
        assert self.read_classes is not None, f"format {self.name} has neither classes nor read_classes"
        return self.read_classes(Path(root))

    def flag_defaults(self) -> dict[str, Any]:
        return {flag.name: flag.default for flag in self.flags}


# --- helpers the format files share: listing files and reading split files


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path} does not exist or is not a folder; expected {what}. Check --data-root.")
    return path


def require_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data-root {root} does not exist or is not a folder")
    return root


def read_list(list_file: Path) -> list[list[str]]:
    """The rows of a split file: '<image> <label>' (official AGMM format) or '<id>' (VOC ImageSets format)."""
    if not list_file.is_file():
        raise DataError(f"split file {list_file} does not exist")
    rows = [line.split() for line in list_file.read_text().splitlines() if line.strip()]
    if not rows:
        raise DataError(f"split file {list_file} is empty; expected one '<image> <label>' or '<id>' per line")
    bad = [i + 1 for i, row in enumerate(rows) if len(row) not in (1, 2)]
    if bad:
        raise DataError(f"split file {list_file} line {bad[0]} has {len(rows[bad[0] - 1])} fields; expected "
                        "'<image> <label>' (official AGMM format) or '<id>' (VOC ImageSets format)")
    return rows


def check_files(samples: list[Sample], source: str) -> list[Sample]:
    if not samples:
        raise DataError(f"no samples found in {source}")
    for sample in samples:
        for path in (sample.image, sample.label):
            if not path.is_file():
                raise DataError(f"{path} is listed by {source} but does not exist")
    return samples


# --- the table (after the helpers: the format files import them)


def _table() -> dict[str, DataFormat]:
    from agmm_deploy.datasets import cityscapes, folder, pascal

    return {row.name: row for row in (cityscapes.FORMAT, pascal.FORMAT, folder.FORMAT)}


DATA_FORMATS: dict[str, DataFormat] = _table()
# The format of a user's own classes (a raw official state dict trained on other classes is described as one).
OWN_CLASSES_FORMAT = "folder"


def get_format(name: str | None) -> DataFormat:
    """The row of ``name``; an unknown name is refused with the known ones."""
    if name not in DATA_FORMATS:
        raise ValueError(f"data set {name!r} is not supported; expected one of {sorted(DATA_FORMATS)}")
    return DATA_FORMATS[name]


def format_flags() -> dict[str, Flag]:
    """Every format-only flag of the table, by name (the union the training CLI offers)."""
    flags: dict[str, Flag] = {}
    for row in DATA_FORMATS.values():
        for flag in row.flags:
            flags.setdefault(flag.name, flag)
    return flags


def official_formats() -> list[DataFormat]:
    """The formats with an official AGMM recipe, so that a raw official state dict may come from them."""
    return [row for row in DATA_FORMATS.values() if row.official_input_size is not None]
