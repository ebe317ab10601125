"""Cross-scale Interaction Fusion (CIF, ScaleMatch Eqs. 4-13): fuse the predictions of a weak view and
of its copy rescaled by v through a learned spatial gate.

VCFI (Eqs. 4-8): concatenate the 1x decoder features with the rescaled view's features (resized to the
1x grid), reduce them with a 1x1 conv, mix the flattened map with Vision-RWKV block(s), LayerNorm.
Scale-Aware Gate (Eqs. 9-12): channel attention over the concatenation of the mixed map and its input,
depth-wise + point-wise convs, a 1x1 conv to one channel and a sigmoid give the gate s.
Fusion (Eq. 13): p = s * p_w + (1 - s) * p_v.
"""
import torch
import torch.nn.functional as F
from torch import nn

from model.rwkv import VRWKVBlock


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: per-channel weights from globally pooled statistics."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.excite = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.excite(x.mean(dim=(2, 3)))
        return x * weights[:, :, None, None]


class CrossScaleInteractionFusion(nn.Module):
    def __init__(self, feature_channels: int = 256, reduced_channels: int = 32, rwkv_blocks: int = 1,
                 gate_channels: int = 32, se_reduction: int = 4):
        super().__init__()
        self.reduce = conv_bn_relu(2 * feature_channels, reduced_channels)
        self.rwkv = nn.ModuleList(VRWKVBlock(reduced_channels, layer_id=i, n_layers=rwkv_blocks)
                                  for i in range(rwkv_blocks))
        self.norm = nn.LayerNorm(reduced_channels)
        self.attention = ChannelAttention(2 * reduced_channels, se_reduction)
        self.depthwise = conv_bn_relu(2 * reduced_channels, 2 * reduced_channels, 3, groups=2 * reduced_channels)
        self.pointwise = conv_bn_relu(2 * reduced_channels, gate_channels)
        self.to_gate = nn.Conv2d(gate_channels, 1, 1)

    def gate(self, features_w: torch.Tensor, features_v: torch.Tensor) -> torch.Tensor:
        """Spatial gate s in (0, 1) on the 1x feature grid, shape (B, 1, h, w)."""
        height, width = features_w.shape[-2:]
        features_v = F.interpolate(features_v, size=(height, width), mode="bilinear", align_corners=True)
        reduced = self.reduce(torch.cat((features_w, features_v), dim=1))
        tokens = reduced.flatten(2).transpose(1, 2)
        for block in self.rwkv:
            tokens = block(tokens, (height, width))
        mixed = self.norm(tokens).transpose(1, 2).reshape_as(reduced)
        gate_input = self.attention(torch.cat((mixed, reduced), dim=1))
        return torch.sigmoid(self.to_gate(self.pointwise(self.depthwise(gate_input))))

    def forward(self, features_w, features_v, logits_w, logits_v) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused logits at logits_w's size and the gate (upsampled to that size)."""
        size = logits_w.shape[-2:]
        gate = F.interpolate(self.gate(features_w, features_v), size=size, mode="bilinear", align_corners=True)
        logits_v = F.interpolate(logits_v, size=size, mode="bilinear", align_corners=True)
        return gate * logits_w + (1 - gate) * logits_v, gate
