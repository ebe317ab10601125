"""Segmentation networks; ``build_model`` turns the resolved config into one."""

from torch import nn

from model.backbone import build_backbone
from model.deeplabv3plus import DeepLabV3Plus


def build_model(cfg: dict) -> nn.Module:
    """DeepLabV3+ on the configured backbone, with its pretrained weights loaded when ``cfg['pretrained']`` is set."""
    backbone = build_backbone(cfg["backbone"], cfg["replace_stride_with_dilation"], cfg["pretrained"])
    return DeepLabV3Plus(backbone, cfg["nclass"], cfg["dilations"])
