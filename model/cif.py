"""Cross-scale Interaction Fusion (CIF, ScaleMatch Eqs. 4-13): fuse the predictions of a weak view and of its copy
rescaled by v through a learned spatial gate, as the authors' release computes it.

The two views are told apart by resolution: for v > 1 the 1x view is the lower-resolution one, for v < 1 the
rescaled view is. On the 1x feature grid (the other view's decoder features resized onto it):

VCFI (Eqs. 4-8): concatenate [lower-resolution, higher-resolution] features, reduce them with a 1x1 conv + BN + ReLU,
mix the flattened map with Vision-RWKV block(s), LayerNorm: the interacted features.
Scale-Aware Gate (Eqs. 9-12): squeeze-excitation over [concatenated features, interacted features] (``gate_input``
"release") or over the interacted features alone ("paper"), then depth-wise 3x3 + BN + ReLU, point-wise + BN + ReLU,
depth-wise 3x3 + BN + ReLU, a point-wise conv to one channel without bias, and a sigmoid: the gate s, the weight of
the lower-resolution prediction.
Fusion (Eq. 13), at image resolution. "release": s is resized to the lower-resolution prediction's size and
multiplied there; the product and s are resized to the higher-resolution prediction's size (the 1x image size), where
(1 - s) weights that prediction. "paper": s and the lower-resolution prediction are resized to the 1x image size and
blended there, p = s p_low + (1 - s) p_high. For v > 1 the two rules agree.
"""
import torch
from torch import nn

from model.rwkv import VRWKVBlock
from util.resize import resize_to

GATE_INPUTS = ("release", "paper")
# The release's LayerNorms in the CIF (its RWKV block and the final norm).
LAYER_NORM_EPS = 1e-6


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SqueezeExcitation(nn.Module):
    """Per-channel weights from globally pooled statistics: 1x1 conv (with bias), ReLU, 1x1 conv, sigmoid."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.squeeze = nn.Conv2d(channels, hidden, 1)
        self.excite = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.excite(torch.relu(self.squeeze(pooled))))


class CrossScaleInteractionFusion(nn.Module):
    def __init__(self, feature_channels: int = 256, reduced_channels: int = 32, rwkv_blocks: int = 1,
                 gate_channels: int = 128, gate_input: str = "release", se_reduction: int = 16,
                 wkv: str = "formula"):
        super().__init__()
        if gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input must be one of {GATE_INPUTS}, got {gate_input!r}")
        self.gate_input = gate_input
        self.reduce = conv_bn_relu(2 * feature_channels, reduced_channels)
        # The release builds its single block as the first of a two-layer stack (total_layers=2) for the fancy init.
        self.rwkv = nn.ModuleList(VRWKVBlock(reduced_channels, layer_id=i, n_layers=rwkv_blocks + 1,
                                             norm_eps=LAYER_NORM_EPS, wkv=wkv) for i in range(rwkv_blocks))
        self.norm = nn.LayerNorm(reduced_channels, eps=LAYER_NORM_EPS)
        attended = reduced_channels + (2 * feature_channels if gate_input == "release" else 0)
        self.attention = SqueezeExcitation(attended, se_reduction)
        self.gate_head = nn.Sequential(
            *conv_bn_relu(attended, attended, 3, groups=attended),
            *conv_bn_relu(attended, gate_channels),
            *conv_bn_relu(gate_channels, gate_channels, 3, groups=gate_channels),
            nn.Conv2d(gate_channels, 1, 1, bias=False), nn.Sigmoid())

    def interact(self, features: torch.Tensor) -> torch.Tensor:
        """VCFI: the interacted features (B, h*w, reduced_channels) of the concatenated two-view features."""
        reduced = self.reduce(features)
        tokens = reduced.flatten(2).transpose(1, 2)
        for block in self.rwkv:
            tokens = block(tokens, reduced.shape[-2:])
        return self.norm(tokens)

    def gate(self, features_low: torch.Tensor, features_high: torch.Tensor) -> torch.Tensor:
        """The gate s in (0, 1), (B, 1, h, w), weight of the lower-resolution view; both inputs on one (h, w) grid."""
        if features_low.shape != features_high.shape:
            raise ValueError(f"CIF: the two views' features must share one grid, got {tuple(features_low.shape)} "
                             f"and {tuple(features_high.shape)}")
        joint = torch.cat((features_low, features_high), dim=1)
        interacted = self.interact(joint).transpose(1, 2).reshape(len(joint), -1, *joint.shape[-2:])
        gate_input = torch.cat((joint, interacted), dim=1) if self.gate_input == "release" else interacted
        return self.gate_head(self.attention(gate_input))

    def blend(self, gate: torch.Tensor, pred_low: torch.Tensor,
              pred_high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 13: the fused logits at ``pred_high``'s size, and the gate as it weights ``pred_low`` there."""
        size = pred_high.shape[-2:]
        if self.gate_input == "paper":
            gate_high = resize_to(gate, size)
            return gate_high * resize_to(pred_low, size) + (1 - gate_high) * pred_high, gate_high
        gate_low = resize_to(gate, pred_low.shape[-2:])
        gate_high = resize_to(gate_low, size)
        return resize_to(gate_low * pred_low, size) + (1 - gate_high) * pred_high, gate_high

    def forward(self, features_1x: torch.Tensor, pred_1x: torch.Tensor, features_v: torch.Tensor,
                pred_v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse the 1x view with the view rescaled by ``scale``.

        features_1x  decoder features of the 1x view: their grid is the gate's
        pred_1x      its logits at the image size
        features_v   decoder features of the rescaled view, on its own grid
        pred_v       its logits where the release fuses them: at the rescaled image's size when scale < 1 (the
                     lower-resolution side), at the image size when scale > 1
        Returns the fused logits at the image size and the weight of the 1x prediction there.
        """
        features_v = resize_to(features_v, features_1x.shape[-2:])
        if scale > 1:
            fused, gate_high = self.blend(self.gate(features_1x, features_v), pred_1x, pred_v)
            return fused, gate_high
        fused, gate_high = self.blend(self.gate(features_v, features_1x), pred_v, pred_1x)
        return fused, 1 - gate_high
