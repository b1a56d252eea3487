"""Fast R-CNN (Girshick, 2015): run the CNN once per image, then crop each proposal *from the feature map*.

R-CNN's cost was the CNN run on every one of ~2000 warped crops. Fast R-CNN swaps the order: one forward pass of
the backbone over the whole image, then **RoI pooling** cuts each proposal's window out of the shared feature map
and max-pools it into a fixed ``7 x 7`` grid, whatever the proposal's size - so fully-connected layers can follow.
Everything behind the proposals trains end to end with one multi-task loss (class + box). Proposals still come from
Selective Search, which now dominates the test time: the problem Faster R-CNN removes.

``pool=roi_align`` replaces RoI pooling's rounding of box edges to feature cells by bilinear sampling (Mask R-CNN's
fix), which matters when a cell spans 8 pixels and objects are 6 px.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import MultiScaleRoIAlign, roi_align, roi_pool

from ...ops.pooling import ThreadedMultiScaleRoIAlign
from ..backbones import conv_bn_relu
from .backbone import BACKBONE_OPTIONS, build_detection_backbone, fpn_levels
from .generalized import BoxPredictor, RegionDetector, detector_transform
from .heads import ROI_HEAD_OPTIONS, roi_head_settings
from .proposers import SELECTIVE_SEARCH_OPTIONS, selective_search_proposer


def pool_regions(features, rois: list[torch.Tensor], image_size: tuple[int, int], output_size: int,
                 pool: str = "roi_align", multi_scale: MultiScaleRoIAlign | None = None) -> torch.Tensor:
    """Cut every RoI out of the shared features: ``(N, C, h, w), [(R_i, 4)] -> (R, C, s, s)``.

    The feature map's scale relative to the image (1/8 for the tiny backbone) maps box pixels to feature cells. A
    feature pyramid (a dict of maps) pools each RoI from the level matching its size.
    """
    if isinstance(features, dict):
        return multi_scale(features, rois, [image_size] * len(rois))
    scale = features.shape[-1] / image_size[1]
    if pool == "roi_pool":
        return roi_pool(features, rois, output_size, spatial_scale=scale)
    # One bilinear sample per bin: at stride 8 a 7x7 grid over a scenes object already puts bins under a feature
    # cell apart, and torchvision's CPU backward of RoI Align costs in proportion to the samples.
    return roi_align(features, rois, output_size, spatial_scale=scale, sampling_ratio=1, aligned=True)


class RoIPoolHead(nn.Module):
    """RoI pooling -> flatten -> two fully-connected layers -> class scores and class-specific box deltas."""

    def __init__(self, in_channels: int, num_classes: int, pool: str = "roi_align", pool_size: int = 7,
                 hidden: int = 256, fpn_levels: tuple[str, ...] | None = None, roi_channels: int = 0):
        super().__init__()
        self.pool, self.pool_size = pool, pool_size
        # Narrowing once per image (a 1x1 convolution on a small map) is cheap; pooling and the first fully-connected
        # layer then handle a fraction of the channels for each of hundreds of regions.
        self.narrow = None
        if roi_channels and not fpn_levels:
            self.narrow = conv_bn_relu(in_channels, roi_channels, kernel=1)
            in_channels = roi_channels
        self.multi_scale = ThreadedMultiScaleRoIAlign(list(fpn_levels), pool_size, 2) if fpn_levels else None
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * pool_size * pool_size, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        )
        self.predictor = BoxPredictor(hidden, num_classes)

    def per_image(self, features):
        """Once per image, timed with the shared convolutions: the narrowing 1x1 convolution."""
        return self.narrow(features) if self.narrow is not None else features                # (N, C', h, w)

    def codes(self, features, rois: list[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        """The region code the predictor reads: ``(R, hidden)`` (DenseCap's captioner reads it too)."""
        pooled = pool_regions(features, rois, image_size, self.pool_size, self.pool, self.multi_scale)  # (R, C, s, s)
        return self.fc(pooled)

    def forward(self, features, rois: list[torch.Tensor], image_size: tuple[int, int]):
        return self.predictor(self.codes(features, rois, image_size))                       # (R, K+1), (R, 4(K+1))


def build_roi_pool_head(config: dict, backbone: nn.Module, num_classes: int) -> RoIPoolHead:
    return RoIPoolHead(backbone.out_channels, num_classes, config["pool"], config["pool_size"],
                       config["head_hidden"], fpn_levels(config), config["roi_channels"])


OPTIONS = {**BACKBONE_OPTIONS, **SELECTIVE_SEARCH_OPTIONS, **ROI_HEAD_OPTIONS}


def build(config: dict, info: dict) -> RegionDetector:
    """Fast R-CNN: shared backbone + Selective Search proposals + RoI pooling head."""
    backbone = build_detection_backbone(config)
    sampling, postprocess, weights = roi_head_settings(config)
    return RegionDetector(info["num_classes"], selective_search_proposer(config),
                          build_roi_pool_head(config, backbone, info["num_classes"]), backbone,
                          sampling, postprocess, weights, transform=detector_transform(config, info))
