"""torchvision's own Faster R-CNN on our backbone: the reference our detectors are measured against.

``det/faster_rcnn`` builds Faster R-CNN from this package's stages. To know whether those stages cost or gain
anything, the benchmarks also train ``torchvision.models.detection.FasterRCNN`` - the implementation most people
would reach for - with everything that is not the detector's design held equal: the same tiny backbone, the same
input size (torchvision's transform neither shrinks nor grows a scenes image), the same normalisation statistics and
the same anchors (sizes and aspect ratios, one feature map). Everything else - the RPN's 2000 training proposals,
512 sampled RoIs per image, the 1024-wide two-layer box head, the loss normalisations - is torchvision's default,
as a user would get it.

The wrapper only adapts the calling conventions: our detectors take an ``(N, 3, H, W)`` batch of 0-255 pixels and
return losses whenever targets are given; torchvision takes a list of ``[0, 1]`` float images and computes losses in
train mode only. In eval mode with targets the wrapper returns ``{}``, which the detection task reports as a NaN
validation loss.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from ...config import number_list
from ...tasks.dense import MEAN, STD
from .backbone import BACKBONE_OPTIONS, build_detection_backbone
from .fast_rcnn import fpn_levels
from .faster_rcnn import TRAINING as FASTER_RCNN_TRAINING
from .rpn import RPN_OPTIONS, fpn_anchor_levels

# The anchors are the one part of the RPN set to ours (torchvision's default sizes 32-512 suit 800 px images, not
# 128 px scenes); the other RPN knobs are deliberately left at torchvision's defaults.
OPTIONS = {**BACKBONE_OPTIONS, **{key: RPN_OPTIONS[key] for key in ("anchor_scales", "anchor_ratios")}}
# The same optimiser settings as det/faster_rcnn, so that a benchmark's difference is the implementation's.
TRAINING = dict(FASTER_RCNN_TRAINING)


def _anchor_generator(config: dict) -> AnchorGenerator:
    """torchvision's anchors with our sizes and ratios: one feature map, or one size per FPN level."""
    scales = number_list("anchor_scales", config["anchor_scales"])
    ratios = number_list("anchor_ratios", config["anchor_ratios"])
    levels = fpn_levels(config)
    if levels is None:
        return AnchorGenerator((scales,), (ratios,))
    # torchvision's BackboneWithFPN returns the four levels plus a pooled one ("pool"): five maps, one size each.
    sizes = fpn_anchor_levels(scales, len(levels) + 1)
    return AnchorGenerator(tuple(sizes), (ratios,) * len(sizes))


class TorchvisionFasterRCNN(nn.Module):
    """``torchvision.models.detection.FasterRCNN`` behind the calling conventions of this package's detectors.

    ``forward(images, targets=None, proposals=None)``: ``images`` (N, 3, H, W) 0-255 pixels (uint8 or float);
    ``proposals`` is accepted and ignored (the RPN makes its own). Train mode with targets: torchvision's four named
    losses. Eval mode with targets: ``{}``. Without targets: a list of ``{"boxes", "scores", "labels"}`` per image.
    """

    def __init__(self, detector: FasterRCNN):
        super().__init__()
        self.detector = detector

    @staticmethod
    def _torchvision_targets(targets: list[dict]) -> list[dict]:
        """Only what torchvision reads. It has no notion of crowd regions - it would train them as objects - so they
        are dropped, as torchvision's own COCO recipe does; so are boxes without area, which it rejects."""
        converted = []
        for target in targets:
            boxes = target["boxes"].float()
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            crowd = target.get("iscrowd")
            if crowd is not None:
                keep &= ~crowd.bool().to(keep.device)
            converted.append({"boxes": boxes[keep], "labels": target["labels"][keep]})
        return converted

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None,
                proposals: list[torch.Tensor] | None = None):
        pictures = list(images.float().div(255.0).unbind(0))          # (N, 3, H, W) -> N x (3, H, W) in [0, 1]
        if targets is not None:
            if not self.training:
                return {}                                              # torchvision computes losses in train mode only
            return self.detector(pictures, self._torchvision_targets(targets))
        return self.detector(pictures)


def build(config: dict, info: dict) -> TorchvisionFasterRCNN:
    """torchvision's FasterRCNN with our backbone, input size, normalisation and anchors; its defaults elsewhere."""
    backbone = build_detection_backbone(config)          # has ``out_channels``, which FasterRCNN requires
    levels = fpn_levels(config)
    side = info["image_size"]
    detector = FasterRCNN(
        backbone, num_classes=info["num_classes"], min_size=side, max_size=side,
        image_mean=list(MEAN), image_std=list(STD),
        rpn_anchor_generator=_anchor_generator(config),
        box_roi_pool=MultiScaleRoIAlign(list(levels or ["0"]), output_size=7, sampling_ratio=2),
    )
    return TorchvisionFasterRCNN(detector)

