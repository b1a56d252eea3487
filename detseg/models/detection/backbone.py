"""The shared convolutional features of SPP-net, Fast/Faster R-CNN and R-FCN: computed once per image.

``tiny`` (the default for the 128 px scenes) is :class:`detseg.models.backbones.TinyConvNet` at stride 8 - a
stride-2 stem and two stride-2 stages: the smallest scenes objects are ~6 px, and a stride-16 map would give them
less than half a cell, while full-resolution early layers would cost most of the training time. ``resnet18`` /
``resnet50`` (random init, optionally with a feature pyramid) are for real images.
"""
from __future__ import annotations

from torch import nn

from ...config import Option
from ..backbones import BACKBONES, TinyConvNet, torchvision_backbone

BACKBONE_OPTIONS = {
    "backbone": Option("tiny", "shared features: tiny|resnet18|resnet50 (random init)", choices=BACKBONES),
    "fpn": Option(False, "resnet backbones: add a feature pyramid (RoIs pooled from the level that fits their size)"),
    "width": Option(32, "tiny backbone: channels of the first stage", min=4, max=1024),
    "depth": Option(2, "tiny backbone: number of stride-2 stages after the stem (2 = stride 8 with stem_stride 2)", min=1, max=5),
    "stem_stride": Option(2, "tiny backbone: stride of the first convolution", choices=(1, 2)),
    "backbone_norm": Option("batch", "resnet backbones: batch (trained batch norm) | frozen (fixed per-channel "
                                     "affine maps, torchvision's FrozenBatchNorm2d of pretrained weights)",
                            choices=("batch", "frozen")),
    "bn_eps": Option(1e-5, "resnet backbones: epsilon of their batch norms (torchvision loads its published "
                           "detection weights with 0)", min=0),
}


# torchvision's BackboneWithFPN names its maps "0".."3" (strides 4-32) plus "pool" (stride 64). RoIs are pooled
# from the four, the RPN slides over all five: one definition, read by every head and the RPN.
FPN_ROI_LEVELS = ("0", "1", "2", "3")
FPN_RPN_LEVELS = FPN_ROI_LEVELS + ("pool",)


def uses_fpn(config: dict) -> bool:
    return config.get("backbone", "tiny") != "tiny" and bool(config.get("fpn"))


def fpn_levels(config: dict) -> tuple[str, ...] | None:
    """Names of the pyramid levels RoIs are pooled from, or None without a feature pyramid."""
    return FPN_ROI_LEVELS if uses_fpn(config) else None


def build_detection_backbone(config: dict) -> nn.Module:
    """The backbone named by ``config``; it has ``out_channels`` and, for FPN, returns a dict of maps."""
    if config["backbone"] == "tiny":
        return TinyConvNet(width=config["width"], depth=config["depth"], stem_stride=config["stem_stride"])
    return torchvision_backbone(config["backbone"], fpn=config["fpn"], norm=config.get("backbone_norm", "batch"),
                                eps=config.get("bn_eps", 1e-5))
