"""DeepLabV3+: a backbone, ASPP on its deepest features, and a decoder fusing them with the low-level features.

The network is split into ``encode`` (backbone) and ``decode`` (head) so that training can run the decoder again
on perturbed (UniMatch's feature perturbation) or rescaled (ScaleMatch's feature scale variation) features
without re-running the backbone. Layers keep PyTorch's default initialisation, as in the release and UniMatch.
"""

from collections.abc import Sequence

import torch
from torch import nn

from util.resize import rescale, resize_to

HEAD_CHANNELS = 256  # the release's ASPP and decoder width
LOW_LEVEL_CHANNELS = 48


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average, 1x1 conv + BN + ReLU, broadcast back to the input grid."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = _conv_bn_relu(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_to(self.conv(self.pool(x)), x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 conv, one 3x3 conv per dilation and image pooling, projected to
    ``out_channels``."""

    def __init__(self, in_channels: int, dilations: Sequence[int], out_channels: int = HEAD_CHANNELS) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels)]
            + [_conv_bn_relu(in_channels, out_channels, kernel_size=3, dilation=d) for d in dilations]
            + [ImagePooling(in_channels, out_channels)]
        )
        self.project = _conv_bn_relu(len(self.branches) * out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ over a backbone returning ``[c1, c2, c3, c4]`` and exposing ``.channels``.

    Everything outside ``.backbone`` is the head, so optimisers can give it its own learning rate.
    """

    def __init__(self, backbone: nn.Module, nclass: int, dilations: Sequence[int] = (6, 12, 18),
                 head_channels: int = HEAD_CHANNELS) -> None:
        super().__init__()
        self.backbone = backbone
        low_channels, high_channels = backbone.channels[0], backbone.channels[-1]
        self.aspp = ASPP(high_channels, dilations, head_channels)
        self.reduce = _conv_bn_relu(low_channels, LOW_LEVEL_CHANNELS)
        self.fuse = nn.Sequential(
            _conv_bn_relu(LOW_LEVEL_CHANNELS + head_channels, head_channels, kernel_size=3),
            _conv_bn_relu(head_channels, head_channels, kernel_size=3),
        )
        self.classifier = nn.Conv2d(head_channels, nclass, kernel_size=1)
        # A module (not functional dropout) so that, as in UniMatch, the perturbation is active in train mode only.
        self.feature_dropout = nn.Dropout2d(0.5)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features ``(low, high)``: c1 (stride 4) and c4."""
        features = self.backbone(x)
        return features[0], features[-1]

    def decode(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the head on encoder features; return ``(logits, features)`` on the low-level grid.

        ``features`` are the ``head_channels``-channel fuse output that the classifier reads.
        """
        context = resize_to(self.aspp(high), low.shape[-2:])
        features = self.fuse(torch.cat([self.reduce(low), context], dim=1))
        return self.classifier(features), features

    def decode_perturbed(self, low: torch.Tensor, high: torch.Tensor,
                         feature_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The release's (and UniMatch's) feature-perturbation pass: both inputs resized by ``feature_scale``
        (sizes floored), then one decoder batch [clean, Dropout2d(0.5)(clean)]. Returns the clean half's
        ``(logits, features)`` and the perturbed half's logits, on the resized low-level grid.

        In train mode the clean half is normalised with statistics of the whole batch, perturbed half included,
        as in the release; in eval mode the dropout is off and both halves are the clean decoding.
        """
        if feature_scale != 1.0:
            low, high = rescale(low, feature_scale), rescale(high, feature_scale)
        logits, features = self.decode(torch.cat((low, self.feature_dropout(low))),
                                       torch.cat((high, self.feature_dropout(high))))
        logits_clean, logits_perturbed = logits.chunk(2)
        return logits_clean, features.chunk(2)[0], logits_perturbed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input's spatial size."""
        logits, _ = self.decode(*self.encode(x))
        return resize_to(logits, x.shape[-2:])
