"""Faster R-CNN (Ren et al., 2015): Fast R-CNN whose proposals come from the network itself.

The one change from :mod:`.fast_rcnn` is the proposer stage: Selective Search is replaced by a region proposal
network (:mod:`.rpn`) on the same shared features, so the whole detector is one network trained with four losses -
RPN objectness, RPN box regression, RoI classification, RoI box regression - and test time no longer includes
seconds of CPU-bound region merging. Everything behind the proposals (RoI pooling, the two fully-connected layers,
class-specific box deltas) is Fast R-CNN's head, unchanged.
"""
from __future__ import annotations

from ...config import Option
from .backbone import BACKBONE_OPTIONS, build_detection_backbone
from .fast_rcnn import build_roi_pool_head
from .generalized import RegionDetector, detector_transform
from .heads import ROI_HEAD_OPTIONS, roi_head_settings
from .rpn import RPN_OPTIONS, build_rpn

OPTIONS = {**BACKBONE_OPTIONS, **RPN_OPTIONS, **ROI_HEAD_OPTIONS}
TRAINING = {
    "lr": Option(2e-3, "peak learning rate", min=0),
    "batch_size": Option(8, "images per step", min=1),
    "epochs": Option(20, "passes over the training set", min=0),
}


def build(config: dict, info: dict) -> RegionDetector:
    """Faster R-CNN: shared backbone + region proposal network + RoI pooling head."""
    backbone = build_detection_backbone(config)
    sampling, postprocess, weights = roi_head_settings(config)
    return RegionDetector(info["num_classes"], build_rpn(config, backbone.out_channels),
                          build_roi_pool_head(config, backbone, info["num_classes"]), backbone,
                          sampling, postprocess, weights, transform=detector_transform(config, info))
