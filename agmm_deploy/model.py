"""DeepLabV3+ with a dilated ResNet backbone, as in the AGMM paper (docs/algorithm.md, "Model").

Module names follow the official AGMM state dict (``backbone.*``, ``head.b0..b4``, ``head.project``,
``reduce``, ``fuse``, ``classifier``) so its checkpoints load strictly.
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BACKBONE_DEPTHS = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
}
STEMS = ("deep", "torchvision")
# Which of layer2/3/4 trade their stride for dilation, keyed by output stride.
DILATE_BY_OUTPUT_STRIDE = {8: (False, True, True), 16: (False, False, True)}
# Multi-grid unit rates of the blocks in layer4 (DeepLabV3, "Going deeper with atrous convolution").
MULTI_GRID = (2, 2, 4)
ASPP_CHANNELS = 256
REDUCED_LOW_CHANNELS = 48


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint as a dict.

    Attributes:
        backbone: resnet18 | resnet34 | resnet50 | resnet101.
        num_classes: K, the number of output channels.
        stem: "deep" (the official v1c stem: three 3x3 convs, 128 channels) or "torchvision" (one 7x7 conv).
        output_stride: 8 or 16; the backbone's total downsampling.
        multi_grid: dilate layer4's blocks by (2, 2, 4) times the layer's dilation (Cityscapes config).
        aspp_rates: dilation rates of ASPP's three 3x3 branches.
    """

    backbone: str = "resnet50"
    num_classes: int = 19
    stem: str = "deep"
    output_stride: int = 8
    multi_grid: bool = True
    aspp_rates: tuple[int, int, int] = (12, 24, 36)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONE_DEPTHS:
            raise ValueError(f"backbone={self.backbone!r} is not supported; expected one of {sorted(BACKBONE_DEPTHS)}")
        if self.stem not in STEMS:
            raise ValueError(f"stem={self.stem!r} is not supported; expected one of {list(STEMS)}")
        if self.output_stride not in DILATE_BY_OUTPUT_STRIDE:
            raise ValueError(f"output_stride={self.output_stride!r} is not supported; expected 8 or 16")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes!r} is invalid; expected an integer >= 2")
        if self.num_classes >= 255:
            raise ValueError(f"num_classes={self.num_classes} is invalid; expected at most 254 (label value 255 is reserved for \"no supervision\")")
        rates = tuple(self.aspp_rates)
        if len(rates) != 3 or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates):
            raise ValueError(f"aspp_rates={self.aspp_rates!r} is invalid; expected three positive integers, e.g. (12, 24, 36)")
        object.__setattr__(self, "aspp_rates", rates)

    @classmethod
    def cityscapes(cls, **overrides: Any) -> "ModelConfig":
        """The paper's Cityscapes config: ResNet-50, multi-grid, ASPP rates 12/24/36, 19 classes."""
        return cls.for_dataset("cityscapes", **overrides)

    @classmethod
    def pascal(cls, **overrides: Any) -> "ModelConfig":
        """The paper's VOC config: ResNet-101, no multi-grid, ASPP rates 6/12/18, 21 classes."""
        return cls.for_dataset("pascal", **overrides)

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: Any) -> "ModelConfig":
        """The paper's architecture for a data format (``agmm_deploy.datasets``), with ``overrides`` applied."""
        from agmm_deploy.datasets import get_format

        return cls(**{**get_format(dataset).model, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples) as stored in checkpoints and ONNX metadata; from_dict inverts it."""
        data = dataclasses.asdict(self)
        data["aspp_rates"] = list(self.aspp_rates)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """The config of a to_dict() result. Raises ValueError naming unknown fields (a newer or foreign file)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model config has unknown fields {unknown}; expected only {sorted(known)}")
        data = dict(data)
        if "aspp_rates" in data:
            data["aspp_rates"] = tuple(data["aspp_rates"])
        return cls(**data)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block; unlike torchvision's, it accepts dilation (needed for output stride 8/16)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50/101 block with the stride on the 3x3 conv (v1.5), as both torchvision and AGMM use."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Dilated ResNet returning layer1 (stride 4) and layer4 (stride 8 or 16) features."""

    def __init__(self, depth: str, stem: str = "deep", output_stride: int = 8, multi_grid: bool = False) -> None:
        super().__init__()
        block = BasicBlock if depth in ("resnet18", "resnet34") else Bottleneck
        layers = BACKBONE_DEPTHS[depth]
        if stem == "deep":
            # Official "v1c" stem; note the last conv has no BN/ReLU here: bn1 below follows it.
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                nn.Conv2d(64, 128, 3, padding=1, bias=False),
            )
            self.inplanes = 128
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.inplanes = 64
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        self.dilation = 1
        dilate = DILATE_BY_OUTPUT_STRIDE[output_stride]
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=dilate[2], multi_grid=multi_grid)
        self.low_channels = 64 * block.expansion
        self.high_channels = 512 * block.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False, multi_grid: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        grids = MULTI_GRID[:blocks] if multi_grid else (1,) * blocks
        # As in the official code: the first block keeps the previous layer's dilation (times its grid).
        layers = [block(self.inplanes, planes, stride, previous_dilation * grids[0], downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, self.dilation * grids[i]) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)  # (B, low_channels, H/4, W/4)
        c4 = self.layer4(self.layer3(self.layer2(c1)))  # (B, high_channels, H/os, W/os)
        return c1, c4


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool, 1x1 conv, broadcast back to the feature size."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_ch, out_ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bilinear upsampling of a 1x1 map with align_corners=True (the official op) is a plain broadcast;
        # expand() says so directly and exports to ONNX/TensorRT without a Resize node.
        return self.gap(x).expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and an image-pool branch, then a projection."""

    def __init__(self, in_ch: int, rates: tuple[int, int, int], out_ch: int = ASPP_CHANNELS) -> None:
        super().__init__()
        self.b0 = _conv_bn_relu(in_ch, out_ch, 1)
        self.b1 = _conv_bn_relu(in_ch, out_ch, 3, rates[0])
        self.b2 = _conv_bn_relu(in_ch, out_ch, 3, rates[1])
        self.b3 = _conv_bn_relu(in_ch, out_ch, 3, rates[2])
        self.b4 = ASPPPooling(in_ch, out_ch)
        self.project = nn.Sequential(*_conv_bn_relu(5 * out_ch, out_ch, 1), nn.Dropout2d(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)]
        return self.project(torch.cat(branches, dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (Chen et al., 2018) as configured by the AGMM paper.

    ``forward(x)`` returns logits only, so exported graphs have one input and one output;
    ``forward_train(x)`` also returns the decoder feature that the AGMM loss needs.

    Shape:
        x: (B, 3, H, W), normalised RGB. logits: (B, K, H, W). feat: (B, 256, ceil(H/4), ceil(W/4)).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = ResNet(config.backbone, config.stem, config.output_stride, config.multi_grid)
        self.head = ASPP(self.backbone.high_channels, config.aspp_rates)
        self.reduce = _conv_bn_relu(self.backbone.low_channels, REDUCED_LOW_CHANNELS, 1)
        self.fuse = nn.Sequential(
            *_conv_bn_relu(ASPP_CHANNELS + REDUCED_LOW_CHANNELS, 256, 3),
            *_conv_bn_relu(256, 256, 3),
        )
        self.classifier = nn.Conv2d(256, config.num_classes, 1, bias=True)

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (feat, logits): feat (B, 256, H/4, W/4) from the decoder, logits (B, K, H, W)."""
        c1, c4 = self.backbone(x)
        c4 = F.interpolate(self.head(c4), size=c1.shape[-2:], mode="bilinear", align_corners=True)
        feat = self.fuse(torch.cat([self.reduce(c1), c4], dim=1))
        logits = F.interpolate(self.classifier(feat), size=x.shape[-2:], mode="bilinear", align_corners=True)
        return feat, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_train(x)[1]


def build_model(config: ModelConfig, pretrained: str | None = None) -> DeepLabV3Plus:
    """Builds the network; ``pretrained`` is a backbone weights file or ``"imagenet"`` (see load_backbone_weights)."""
    model = DeepLabV3Plus(config)
    if pretrained:
        load_backbone_weights(model, pretrained)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def _strip_prefixes(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _download_imagenet_state(config: ModelConfig, timeout_s: float) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for the backbone, with a bounded wait instead of a hang offline."""
    import torchvision

    if config.stem != "torchvision":
        raise ValueError(
            f"pretrained='imagenet' gives torchvision weights, which fit stem='torchvision' only (got stem="
            f"{config.stem!r}). For the deep stem pass the official {config.backbone}.pth with --pretrained PATH."
        )
    weights = torchvision.models.get_model_weights(config.backbone).IMAGENET1K_V1
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as err:  # URLError, socket.timeout, hash mismatch: all mean "not available here"
        raise RuntimeError(
            f"could not download torchvision ImageNet weights for {config.backbone} from {weights.url} ({err}). "
            f"Without network access, download that file on another machine and pass --pretrained PATH/TO/FILE.pth."
        ) from err
    finally:
        socket.setdefaulttimeout(previous)


def load_backbone_weights(model: DeepLabV3Plus, source: str | Path, timeout_s: float = 30.0) -> None:
    """Loads ImageNet weights into ``model.backbone`` (strictly, ignoring the classifier ``fc.*``).

    Args:
        source: ``"imagenet"`` for torchvision's weights (downloaded, needs a network), or a path to a
            state dict: the official resnet50.pth / resnet101.pth (deep stem) or a torchvision file.
    """
    if str(source) == "imagenet":
        state = _download_imagenet_state(model.config, timeout_s)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained backbone weights {path} do not exist; expected a .pth state dict")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path} cannot be read as a PyTorch state dict ({err})") from err
        for wrapper in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    state = _strip_prefixes(state, ("module.", "backbone."))
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = model.backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        file_stem = "deep" if "conv1.0.weight" in state else "torchvision"
        hint = (f" The file has a {file_stem} stem and the model a {model.config.stem} stem; set the stem to match."
                if file_stem != model.config.stem else "")
        raise ValueError(
            f"backbone weights {source} do not fit {model.config.backbone} (stem={model.config.stem}): "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
            f"shape mismatches {mismatched[:4]}.{hint}"
        )
    model.backbone.load_state_dict(state, strict=True)
