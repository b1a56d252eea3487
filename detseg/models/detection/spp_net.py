"""SPP-net (He et al., 2014): the CNN runs once per image; each proposal is pooled from the shared feature map.

R-CNN's cost is one CNN pass per warped proposal, ~2000 per image, though the proposals overlap heavily. SPP-net
swaps the order of the two stages: the convolutional layers run **once** over the whole image, and each Selective
Search proposal is projected onto the resulting feature map (box pixels times the map's scale, 1/8 for the tiny
backbone). The fully-connected layers still need a fixed-length input, whatever the proposal's size, so the
proposal's window of the map is max-pooled by a **spatial pyramid**: into a 1 x 1, a 2 x 2 and a 4 x 4 grid of
cells (``pyramid``), 21 maxima per channel, concatenated. No image is cropped or warped any more, so no object is
distorted either.

Only the region head changes from :mod:`.rcnn` (and the backbone becomes shared); proposals, sampling, the
multi-task loss and post-processing are the same. The paper fine-tuned only the layers behind the pyramid; here the
whole network trains end to end, as Fast R-CNN - whose RoI pooling is a one-level pyramid - later showed it should.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import roi_pool

from ...config import Option, number_list
from ...errors import ConfigError
from ..backbones import conv_bn_relu
from .backbone import BACKBONE_OPTIONS, build_detection_backbone
from .generalized import BoxPredictor, RegionDetector, detector_transform
from .heads import ROI_HEAD_OPTIONS, fully_connected_trunk, roi_head_settings
from .proposers import SELECTIVE_SEARCH_OPTIONS, selective_search_proposer

SPP_OPTIONS = {
    "pyramid": Option("1,2,4", "spatial pyramid: each level k max-pools a proposal's window into k x k cells"),
}


def pyramid_levels(text: str) -> tuple[int, ...]:
    """``"1,2,4" -> (1, 2, 4)``; anything but positive whole numbers is a ConfigError."""
    levels = number_list("pyramid", text)
    if not all(level.is_integer() for level in levels):
        raise ConfigError(f"pyramid={text}: expected whole numbers of cells per side, e.g. 1,2,4")
    return tuple(int(level) for level in levels)


def spatial_pyramid_pool(features: torch.Tensor, rois: list[torch.Tensor], image_size: tuple[int, int],
                         levels: tuple[int, ...]) -> torch.Tensor:
    """Max-pool every RoI's window of the shared map at every pyramid level: ``(N, C, h, w) -> (R, C sum k^2)``.

    ``torchvision.ops.roi_pool`` with output ``k`` is one level: it maps the box to feature cells (rounding its edges
    to whole cells, as SPP-net did), splits that window into ``k x k`` bins and takes each bin's maximum.
    ``roi_pool`` counts the cell its rounded right/bottom edge falls on as part of the window (Caffe's inclusive
    pixel boxes), so that edge is moved back by one cell first: a box covering cells 0-3 then pools cells 0-3, not
    0-4 - a difference that matters when one cell is 8 px and objects are 6 px.
    """
    scale = features.shape[-1] / image_size[1]
    last_cell = [boxes - boxes.new_tensor([0.0, 0.0, 1.0, 1.0]) / scale for boxes in rois]
    return torch.cat([roi_pool(features, last_cell, level, spatial_scale=scale).flatten(1)  # (R, C, k, k) -> (R, Ck^2)
                      for level in levels], dim=1)


class SpatialPyramidHead(nn.Module):
    """Spatial pyramid pooling on the shared features -> two fully-connected layers -> class scores + box deltas.

    ``forward(features, rois, image_size)`` -> logits ``(R, K+1)`` and class-specific deltas ``(R, 4 (K+1))``.
    """

    def __init__(self, in_channels: int, num_classes: int, levels: tuple[int, ...] = (1, 2, 4), hidden: int = 256,
                 roi_channels: int = 0):
        super().__init__()
        self.levels = tuple(levels)
        # As in Fast R-CNN's head: a 1x1 convolution, once per image, narrows the map so that every region's
        # 21 bins x channels vector - and the first fully-connected layer - stay small.
        self.narrow = conv_bn_relu(in_channels, roi_channels, kernel=1) if roi_channels else None
        channels = roi_channels or in_channels
        self.fc = fully_connected_trunk(channels * sum(level * level for level in self.levels), hidden)
        self.predictor = BoxPredictor(hidden, num_classes)

    def forward(self, features: torch.Tensor, rois: list[torch.Tensor], image_size: tuple[int, int]):
        if self.narrow is not None:
            features = self.narrow(features)                                                # (N, C', h, w)
        pooled = spatial_pyramid_pool(features, rois, image_size, self.levels)             # (R, C' * 21)
        return self.predictor(self.fc(pooled))                                              # (R, K+1), (R, 4(K+1))


# SPP-net predates feature pyramids: one map, so the backbone's ``fpn`` switch and Fast R-CNN's choice of pooling
# (``pool``, ``pool_size``: the pyramid replaces them) are left out.
OPTIONS = {
    **{key: option for key, option in BACKBONE_OPTIONS.items() if key != "fpn"},
    **SELECTIVE_SEARCH_OPTIONS,
    **SPP_OPTIONS,
    **{key: option for key, option in ROI_HEAD_OPTIONS.items() if key not in ("pool", "pool_size")},
}


def build(config: dict, info: dict) -> RegionDetector:
    """SPP-net: shared backbone + Selective Search proposals + spatial pyramid pooling head."""
    levels = pyramid_levels(config["pyramid"])
    backbone = build_detection_backbone({**config, "fpn": False})
    sampling, postprocess, weights = roi_head_settings(config)
    head = SpatialPyramidHead(backbone.out_channels, info["num_classes"], levels, config["head_hidden"],
                              config["roi_channels"])
    return RegionDetector(info["num_classes"], selective_search_proposer(config), head, backbone,
                          sampling, postprocess, weights, transform=detector_transform(config, info))
