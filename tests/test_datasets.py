"""The data-format table: every row complete, unknown names refused by listing the known ones, classes.txt."""

import pytest

from agmm_deploy.checkpoint import raw_recipes
from agmm_deploy.contract import ModelMeta
from agmm_deploy.datasets import DATA_FORMATS, DataError, get_format
from agmm_deploy.datasets.folder import read_classes
from agmm_deploy.model import ModelConfig


def test_unknown_format_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"'ade20k' is not supported; expected one of \['cityscapes', 'folder', "
                                         r"'pascal'\]"):
        get_format("ade20k")


@pytest.mark.parametrize("name", sorted(DATA_FORMATS))
def test_every_row_builds_a_model_and_metadata(name):
    row = get_format(name)
    classes = row.classes or ("a", "b", "c")
    config = ModelConfig.for_dataset(name, num_classes=len(classes))
    assert config.aspp_rates == tuple(row.model["aspp_rates"]) and config.multi_grid == row.model["multi_grid"]
    meta = ModelMeta.for_dataset(name, (32, 32), classes)
    assert meta.classes == classes and len(meta.palette) == len(classes) and meta.dataset == name
    assert set(row.recipe) == {"crop_size", "epochs", "batch_size", "lr", "head_lr_mult", "colour_aug"}


def test_raw_recipes_are_the_formats_with_official_weights():
    assert raw_recipes() == ("cityscapes", "pascal")
    assert ModelConfig.pascal() == ModelConfig(backbone="resnet101", num_classes=21, multi_grid=False,
                                               aspp_rates=(6, 12, 18))


def test_classes_txt_names_with_optional_colours(tmp_path):
    (tmp_path / "classes.txt").write_text("background\npotted plant\n")
    assert read_classes(tmp_path) == (("background", "potted plant"), ((0, 0, 0), (128, 0, 0)))
    (tmp_path / "classes.txt").write_text("background 0 0 0\npotted plant 10 200 30\n")
    assert read_classes(tmp_path) == (("background", "potted plant"), ((0, 0, 0), (10, 200, 30)))
    (tmp_path / "classes.txt").write_text("background 0 0 0\ncow\n")
    with pytest.raises(DataError, match="colour .* on 1 of 2 lines"):
        read_classes(tmp_path)
    (tmp_path / "classes.txt").write_text("only\n")
    with pytest.raises(DataError, match="lists 1 class"):
        read_classes(tmp_path)
