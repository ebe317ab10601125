"""Segmentation networks; ``build_model`` turns the resolved config into the network that trains."""

from model.backbone import build_backbone
from model.cif import CrossScaleInteractionFusion
from model.deeplabv3plus import DeepLabV3Plus
from model.scalematch import ScaleMatchNet


def build_model(cfg: dict) -> ScaleMatchNet:
    """DeepLabV3+ on the configured backbone (pretrained weights loaded when ``cfg['pretrained']`` is set),
    with the CIF module when ``cfg['cif']`` is on."""
    backbone = build_backbone(cfg["backbone"], cfg["replace_stride_with_dilation"], cfg["pretrained"])
    cif = None
    if cfg["cif"]:
        cif = CrossScaleInteractionFusion(cfg["head_channels"], cfg["cif_channels"], cfg["cif_blocks"],
                                          cfg["cif_gate_channels"], cfg["cif_gate"], wkv=cfg["cif_wkv"])
    segmenter = DeepLabV3Plus(backbone, cfg["nclass"], cfg["dilations"], cfg["head_channels"])
    return ScaleMatchNet(segmenter, cif, cfg["scaled_views_update_bn"])
