import re

import pytest
import torch

from agmm_deploy.model import (
    BACKBONE_DEPTHS,
    DeepLabV3Plus,
    ModelConfig,
    build_model,
    count_parameters,
    load_backbone_weights,
)


@pytest.mark.parametrize("backbone", sorted(BACKBONE_DEPTHS))
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_shapes_every_backbone_and_stride(backbone, output_stride):
    config = ModelConfig(backbone=backbone, num_classes=5, output_stride=output_stride, multi_grid=True)
    model = build_model(config).eval()
    x = torch.randn(1, 3, 67, 93)  # odd sizes: logits must still come back at input size
    with torch.no_grad():
        feat, logits = model.forward_train(x)
        plain = model(x)
    assert logits.shape == (1, 5, 67, 93)
    assert feat.shape == (1, 256, 17, 24)  # stride-4 decoder grid: ceil(67/4), ceil(93/4)
    torch.testing.assert_close(plain, logits)


@pytest.mark.parametrize("output_stride,expected", [(8, (9, 9)), (16, (5, 5))])
def test_backbone_output_stride(output_stride, expected):
    model = build_model(ModelConfig(backbone="resnet18", output_stride=output_stride)).eval()
    with torch.no_grad():
        c1, c4 = model.backbone(torch.randn(1, 3, 65, 65))
    assert tuple(c1.shape[-2:]) == (17, 17)
    assert tuple(c4.shape[-2:]) == expected


def test_multi_grid_dilations_follow_official_code():
    model = build_model(ModelConfig(backbone="resnet50", multi_grid=True, output_stride=8))
    dilations = [block.conv2.dilation[0] for block in model.backbone.layer4]
    assert dilations == [4, 8, 16]  # previous dilation 2 * 2, then 4 * 2, 4 * 4
    assert [b.conv2.dilation[0] for b in model.backbone.layer3] == [1] + [2] * 5
    plain = build_model(ModelConfig(backbone="resnet50", multi_grid=False, output_stride=8))
    assert [block.conv2.dilation[0] for block in plain.backbone.layer4] == [2, 4, 4]


def test_basic_block_is_dilated_for_small_backbones():
    model = build_model(ModelConfig(backbone="resnet18", multi_grid=False, output_stride=8))
    assert [b.conv1.dilation[0] for b in model.backbone.layer4] == [2, 4]
    assert model.backbone.layer4[0].conv1.stride == (1, 1)


def test_paper_presets_and_parameter_counts():
    city = ModelConfig.cityscapes()
    voc = ModelConfig.pascal()
    assert (city.backbone, city.num_classes, city.multi_grid, city.aspp_rates) == ("resnet50", 19, True, (12, 24, 36))
    assert (voc.backbone, voc.num_classes, voc.multi_grid, voc.aspp_rates) == ("resnet101", 21, False, (6, 12, 18))
    # docs/algorithm.md: 40.5 M (R50) and 59.5 M (R101) parameters.
    assert round(count_parameters(DeepLabV3Plus(city)) / 1e6, 1) == 40.5
    assert round(count_parameters(DeepLabV3Plus(voc)) / 1e6, 1) == 59.5


def test_official_module_names():
    keys = DeepLabV3Plus(ModelConfig.cityscapes()).state_dict().keys()
    for key in ["backbone.conv1.0.weight", "backbone.conv1.6.weight", "backbone.bn1.weight",
                "head.b0.0.weight", "head.b1.0.weight", "head.b4.gap.1.weight", "head.project.0.weight",
                "reduce.0.weight", "fuse.0.weight", "fuse.3.weight", "classifier.weight", "classifier.bias"]:
        assert key in keys
    tv_keys = DeepLabV3Plus(ModelConfig.cityscapes(stem="torchvision")).state_dict().keys()
    assert "backbone.conv1.weight" in tv_keys and "backbone.conv1.0.weight" not in tv_keys


@pytest.mark.parametrize("field,value,message", [
    ("backbone", "resnet152", "backbone='resnet152'"),
    ("stem", "v1d", "stem='v1d'"),
    ("output_stride", 32, "output_stride=32"),
    ("num_classes", 1, "num_classes=1"),
    ("num_classes", 300, "num_classes=300"),
    ("aspp_rates", (6, 12), "aspp_rates=(6, 12)"),
    ("aspp_rates", (6, 12, 0), "aspp_rates"),
])
def test_bad_config_values_give_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message) + ".*expected"):
        ModelConfig(**{field: value})


def test_config_dict_round_trip_and_unknown_field():
    config = ModelConfig.pascal(backbone="resnet34", output_stride=16)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown fields \\['dropout'\\]"):
        ModelConfig.from_dict({**config.to_dict(), "dropout": 0.1})


def test_pretrained_backbone_file_loads_and_mismatch_is_named(tmp_path):
    source = build_model(ModelConfig(backbone="resnet18", stem="torchvision"))
    # A torchvision-style file: bare backbone keys plus an ImageNet classifier that must be ignored.
    state = {**source.backbone.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    target = build_model(ModelConfig(backbone="resnet18", stem="torchvision"), pretrained=str(path))
    torch.testing.assert_close(target.backbone.layer3[0].conv1.weight, source.backbone.layer3[0].conv1.weight)

    with pytest.raises(ValueError, match="torchvision stem and the model a deep stem"):
        build_model(ModelConfig(backbone="resnet18", stem="deep"), pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model(ModelConfig(backbone="resnet18"), pretrained=str(tmp_path / "nope.pth"))


def test_imagenet_weights_need_torchvision_stem():
    model = DeepLabV3Plus(ModelConfig(backbone="resnet18", stem="deep"))
    with pytest.raises(ValueError, match="fit stem='torchvision' only"):
        load_backbone_weights(model, "imagenet")
