"""ResNet feature extractors built on torchvision's ResNet, and loading of local pretrained weights.

Two families share one class:
- ``resnet50`` / ``resnet101``: the deep-stem variant (three 3x3 convs, 3-64-64-128) that the
  community checkpoints used by semi-supervised segmentation (e.g. ``pretrained/resnet101.pth``) expect;
- ``tv_resnet18/34/50/101``: torchvision's standard ResNets, matching torchvision's ImageNet weights;
- ``tv_resnet10``: torchvision's layout with one BasicBlock a stage (no ImageNet weights are published for it):
  the smallest network that runs every code path, for the tests and quick CPU runs.
"""

import logging
import os
from collections.abc import Mapping, Sequence
from functools import partial

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet, conv1x1, conv3x3

logger = logging.getLogger("scalematch")

# Share of the backbone's tensors a pretrained file must provide (by name and shape) to be accepted.
MIN_MATCHED_FRACTION = 0.99
# How many offending tensor names an error message lists.
NAMES_IN_MESSAGE = 5


class PretrainedError(Exception):
    """A pretrained weights file is missing, unreadable, or does not fit the backbone."""


def init_conv_bn_(module: nn.Module) -> None:
    """Initialise every conv and BN inside ``module`` the way torchvision initialises its ResNets."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _set_dilation(conv: nn.Conv2d, dilation: int) -> None:
    """Dilate a 3x3 conv, padding it so that its output keeps the input's size."""
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation, dilation)


def _dilate_basic_layers(layers: Sequence[nn.Sequential], replace_stride_with_dilation: Sequence[bool]) -> None:
    """Trade the stride of the chosen BasicBlock layers for dilation (torchvision refuses BasicBlock dilation).

    Same rule as torchvision applies to Bottleneck: the conv that carried the stride keeps the dilation in force
    before the layer, and every 3x3 conv after it is dilated by the accumulated factor (the a trous algorithm).
    """
    dilation = 1
    for layer, dilate in zip(layers, replace_stride_with_dilation):
        first = layer[0]
        stride_conv_dilation = dilation
        if dilate:
            dilation *= 2
            first.conv1.stride = (1, 1)
            first.downsample[0].stride = (1, 1)
            first.stride = 1
        _set_dilation(first.conv1, stride_conv_dilation)
        _set_dilation(first.conv2, dilation)
        for block in layer[1:]:
            _set_dilation(block.conv1, dilation)
            _set_dilation(block.conv2, dilation)


class ResNetBackbone(ResNet):
    """torchvision ResNet returning ``[c1, c2, c3, c4]`` (strides 4, 8, 16, 32 before dilation); no avgpool/fc.

    ``deep_stem`` replaces the 7x7 stem conv by three 3x3 convs (``conv1.0/.3/.6``) ending in 128 channels,
    followed by ``bn1`` (128); layer1's first block then takes 128 input channels.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        replace_stride_with_dilation: Sequence[bool] = (False, False, True),
        deep_stem: bool = False,
    ) -> None:
        replace_stride_with_dilation = [bool(flag) for flag in replace_stride_with_dilation]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                f"replace_stride_with_dilation must have 3 entries (layer2, layer3, layer4), "
                f"got {replace_stride_with_dilation}"
            )
        # torchvision dilates Bottleneck layers itself but raises for dilated BasicBlocks.
        dilate_natively = block is Bottleneck
        super().__init__(
            block, layers, replace_stride_with_dilation=replace_stride_with_dilation if dilate_natively else None
        )
        del self.avgpool, self.fc
        if not dilate_natively:
            _dilate_basic_layers((self.layer2, self.layer3, self.layer4), replace_stride_with_dilation)
        if deep_stem:
            self._replace_stem_with_deep_stem()
        self.channels = tuple(planes * block.expansion for planes in (64, 128, 256, 512))

    def _replace_stem_with_deep_stem(self) -> None:
        self.conv1 = nn.Sequential(
            conv3x3(3, 64, stride=2),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            conv3x3(64, 64),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            conv3x3(64, 128),
        )
        self.bn1 = nn.BatchNorm2d(128)
        # Only layer1's first block sees the stem output; its two input convs widen from 64 to 128 channels.
        first = self.layer1[0]
        first.conv1 = conv1x1(128, first.conv1.out_channels)
        first.downsample[0] = conv1x1(128, first.downsample[0].out_channels)
        for module in (self.conv1, self.bn1, first.conv1, first.downsample[0]):
            init_conv_bn_(module)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return [c1, c2, c3, c4]


BACKBONES = {
    "resnet50": partial(ResNetBackbone, Bottleneck, [3, 4, 6, 3], deep_stem=True),
    "resnet101": partial(ResNetBackbone, Bottleneck, [3, 4, 23, 3], deep_stem=True),
    "tv_resnet10": partial(ResNetBackbone, BasicBlock, [1, 1, 1, 1]),
    "tv_resnet18": partial(ResNetBackbone, BasicBlock, [2, 2, 2, 2]),
    "tv_resnet34": partial(ResNetBackbone, BasicBlock, [3, 4, 6, 3]),
    "tv_resnet50": partial(ResNetBackbone, Bottleneck, [3, 4, 6, 3]),
    "tv_resnet101": partial(ResNetBackbone, Bottleneck, [3, 4, 23, 3]),
}


def build_backbone(
    name: str,
    replace_stride_with_dilation: Sequence[bool] = (False, False, True),
    pretrained: str | None = None,
) -> ResNetBackbone:
    """Build the backbone ``name`` and, when ``pretrained`` is a path, load its weights from that local file."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
    backbone = BACKBONES[name](replace_stride_with_dilation=replace_stride_with_dilation)
    if pretrained is not None:
        load_pretrained(backbone, pretrained)
    return backbone


def _unwrap_state_dict(checkpoint: object, path: str) -> dict[str, torch.Tensor]:
    """Peel ``state_dict`` / ``model`` wrappers and the ``module.`` prefix (DataParallel/DDP); drop ``fc.*``."""
    while isinstance(checkpoint, Mapping):
        wrapper = next((key for key in ("state_dict", "model") if isinstance(checkpoint.get(key), Mapping)), None)
        if wrapper is None:
            break
        checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, Mapping):
        raise PretrainedError(f"{path}: expected a state dict of tensors, found {type(checkpoint).__name__}")
    state = {}
    for name, value in checkpoint.items():
        name = name.removeprefix("module.")
        if isinstance(value, torch.Tensor) and not name.startswith("fc."):
            state[name] = value
    return state


def load_pretrained(backbone: nn.Module, path: str) -> None:
    """Copy weights from the local file ``path`` into ``backbone``, matching tensors by name and shape.

    Raises PretrainedError when the file is missing or unreadable, or when fewer than 99 % of the backbone's
    tensors (parameters and buffers, BN's ``num_batches_tracked`` aside) have a same-named, same-shaped tensor.
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise PretrainedError(f"pretrained weights file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PretrainedError(f"{path}: cannot read pretrained weights ({reason})") from error
    source = _unwrap_state_dict(checkpoint, path)

    target = backbone.state_dict()
    matched = {name: tensor for name, tensor in source.items() if name in target and tensor.shape == target[name].shape}
    counted = [name for name in target if not name.endswith("num_batches_tracked")]
    missing = [name for name in counted if name not in source]
    misshaped = [
        f"{name} {tuple(source[name].shape)} vs {tuple(target[name].shape)}"
        for name in counted
        if name in source and name not in matched
    ]
    n_matched = len(counted) - len(missing) - len(misshaped)
    if n_matched < MIN_MATCHED_FRACTION * len(counted):
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:NAMES_IN_MESSAGE])})")
        if misshaped:
            problems.append(f"{len(misshaped)} mis-shaped (e.g. {', '.join(misshaped[:NAMES_IN_MESSAGE])})")
        raise PretrainedError(
            f"{path}: only {n_matched}/{len(counted)} backbone tensors match by name and shape; "
            + "; ".join(problems)
        )
    backbone.load_state_dict(matched, strict=False)
    logger.info(f"loaded {n_matched}/{len(counted)} backbone tensors from {path}")
    if missing or misshaped:
        logger.warning(f"not loaded from {path} (left at initialisation): {', '.join(missing + misshaped)}")
