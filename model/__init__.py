"""Segmentation networks; ``build_model`` turns the resolved config into the network that trains."""

from model.backbone import build_backbone
from model.deeplabv3plus import DeepLabV3Plus
from model.scalematch import ScaleMatchNet


def build_model(cfg: dict) -> ScaleMatchNet:
    """DeepLabV3+ on the configured backbone (pretrained weights loaded when ``cfg['pretrained']`` is set),
    wrapped with the training branches."""
    backbone = build_backbone(cfg["backbone"], cfg["replace_stride_with_dilation"], cfg["pretrained"])
    return ScaleMatchNet(DeepLabV3Plus(backbone, cfg["nclass"], cfg["dilations"]))
