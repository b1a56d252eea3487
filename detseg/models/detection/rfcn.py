"""R-FCN (Dai et al., 2016): region-based, fully convolutional - almost no computation per region.

Faster R-CNN made the proposals nearly free, yet its RoI head still runs two fully-connected layers on every one of
the hundreds of regions: with a deep head (ResNet's conv5 per RoI) that per-region part dominates the test time.
R-FCN moves *all* learned computation in front of the RoI pooling, where it is shared by every region of the image:

1. 1x1 convolutions turn the shared features into ``k*k*(K+1)`` **position-sensitive score maps**: for every class
   one map per cell of a ``k x k`` grid, scoring "the *top-left* (or centre, or ...) part of a class-c object is
   here". A second bank of ``k*k*4`` maps does the same for box deltas.
2. **Position-sensitive RoI pooling** splits each proposal into ``k x k`` bins and pools bin ``(i, j)`` only from
   the maps of group ``(i, j)``: the top-left bin asks the top-left maps, and so on. A region scores high for a
   class only if every part sits where that class's part detectors fire - which is how a translation-invariant
   convolutional network becomes translation-*variant* enough to localise.
3. **Voting**: the ``k*k`` bins are averaged, giving ``K+1`` class scores and 4 deltas per region.

The per-region work is pooling and averaging, no learned weights: adding proposals costs next to nothing, and the
whole detector is convolutional up to the vote. The proposals come from the RPN of :mod:`.rpn`, exactly as in
Faster R-CNN; sampling, the multi-task loss and post-processing are :mod:`.generalized`'s, shared by the family.

Stage timing note: the score-map convolutions run inside the RoI head, so ``stage_seconds["per_region"]`` includes
them although they are computed once per image (cheap 1x1 convolutions on a 16x16 map).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import ps_roi_align, ps_roi_pool

from ...config import Option
from .backbone import BACKBONE_OPTIONS, build_detection_backbone
from .generalized import RegionDetector, detector_transform
from .heads import ROI_HEAD_OPTIONS, SHARED_ROI_HEAD_KEYS, roi_head_settings
from .rpn import RPN_OPTIONS, build_rpn

PS_POOLS = ("ps_roi_align", "ps_roi_pool")

RFCN_HEAD_OPTIONS = {
    "k": Option(3, "position-sensitive grid: each RoI is split into k x k bins, each pooled from its own score maps "
                   "(3 suits 16x16 feature maps, where objects span 1-9 cells)", min=1, max=15),
    "reduce_channels": Option(256, "channels of the 1x1 conv (+ReLU) before the score maps (0 = none)",
                              min=0, max=4096),
    "ps_pool": Option("ps_roi_align", "position-sensitive pooling: ps_roi_align (bilinear) | ps_roi_pool "
                                      "(average over cells, R-FCN's original)", choices=PS_POOLS),
    "class_specific_boxes": Option(False, "one set of k*k*4 box maps per class instead of one shared set"),
}


def position_sensitive_vote(score_maps: torch.Tensor, rois: list[torch.Tensor], k: int, spatial_scale: float,
                            pool: str = "ps_roi_align") -> torch.Tensor:
    """Pool every RoI's ``k x k`` bins from their own maps, then average the bins: ``(N, C*k*k, h, w) -> (R, C)``.

    Channel ``(c * k + i) * k + j`` is bin ``(i, j)`` (row i, column j) of output ``c`` - the layout torchvision's
    position-sensitive pooling reads. ``rois`` are per-image ``(R_i, 4)`` boxes in image pixels, rows of the result
    in image order.
    """
    if pool == "ps_roi_pool":
        bins = ps_roi_pool(score_maps, rois, k, spatial_scale=spatial_scale)                # (R, C, k, k)
    else:
        bins = ps_roi_align(score_maps, rois, k, spatial_scale=spatial_scale, sampling_ratio=2)
    return bins.mean(dim=(2, 3))                                                           # (R, C, k, k) -> (R, C)


class PositionSensitiveHead(nn.Module):
    """Shared features -> position-sensitive class and box maps -> per RoI: pool, vote.

    Returns what every RoI head of :mod:`.generalized` returns: logits ``(R, K+1)`` and class-specific deltas
    ``(R, 4 (K+1))``. R-FCN regresses one class-agnostic box per region (``k*k*4`` maps); to fit the family's
    delta layout - the loss reads the ground-truth class's four numbers, decoding makes one box per class - the four
    voted deltas are repeated for every class. All copies are the same tensor, so the loss trains the single shared
    regressor and every class decodes the same box. ``class_specific_boxes=True`` learns ``k*k*4(K+1)`` maps
    instead (the paper's variant), at K+1 times the box maps.
    """

    def __init__(self, in_channels: int, num_classes: int, k: int = 3, reduce_channels: int = 256,
                 pool: str = "ps_roi_align", class_specific_boxes: bool = False):
        super().__init__()
        self.num_classes, self.k, self.pool = num_classes, k, pool
        self.box_outputs = 4 * num_classes if class_specific_boxes else 4
        if reduce_channels:
            # R-FCN's randomly initialised 1x1 conv between the backbone and the score maps: fewer channels to
            # feed k*k*(K+1) maps from, and one more non-linearity learned for the detection task.
            self.reduce = nn.Sequential(nn.Conv2d(in_channels, reduce_channels, 1), nn.ReLU(inplace=True))
            in_channels = reduce_channels
        else:
            self.reduce = nn.Identity()
        self.class_maps = nn.Conv2d(in_channels, k * k * num_classes, 1)
        self.box_maps = nn.Conv2d(in_channels, k * k * self.box_outputs, 1)
        # Small initial outputs, like BoxPredictor: uniform class scores and near-zero deltas to start from.
        nn.init.normal_(self.class_maps.weight, std=0.01)
        nn.init.normal_(self.box_maps.weight, std=0.001)
        nn.init.zeros_(self.class_maps.bias)
        nn.init.zeros_(self.box_maps.bias)

    def per_image(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Once per image (timed with the shared convolutions): (N, C, h, w) -> k*k*(K+1) and k*k*4 score maps."""
        if isinstance(features, dict):
            raise TypeError("the R-FCN head pools from one feature map, not a feature pyramid (use fpn=false)")
        shared = self.reduce(features)                                     # (N, C, h, w) -> (N, C', h, w)
        return self.class_maps(shared), self.box_maps(shared)

    def forward(self, maps: tuple[torch.Tensor, torch.Tensor], rois: list[torch.Tensor],
                image_size: tuple[int, int]):
        class_maps, box_maps = maps
        scale = class_maps.shape[-1] / image_size[1]                       # 1/8 for the tiny backbone
        # Per region: no weights, just pooling and voting.
        logits = position_sensitive_vote(class_maps, rois, self.k, scale, self.pool)       # (R, K+1)
        deltas = position_sensitive_vote(box_maps, rois, self.k, scale, self.pool)         # (R, 4 or 4(K+1))
        if self.box_outputs == 4:
            deltas = deltas.repeat(1, self.num_classes)                                    # (R, 4) -> (R, 4(K+1))
        return logits, deltas


# A feature pyramid does not fit R-FCN's single bank of score maps, so the backbone's fpn knob is left out.
OPTIONS = {
    **{key: option for key, option in BACKBONE_OPTIONS.items() if key != "fpn"},
    **RPN_OPTIONS,
    **{key: ROI_HEAD_OPTIONS[key] for key in SHARED_ROI_HEAD_KEYS},
    **RFCN_HEAD_OPTIONS,
}
TRAINING = {
    "lr": Option(2e-3, "peak learning rate", min=0),
    "batch_size": Option(8, "images per step", min=1),
    "epochs": Option(20, "passes over the training set", min=0),
}


def build_position_sensitive_head(config: dict, in_channels: int, num_classes: int) -> PositionSensitiveHead:
    return PositionSensitiveHead(in_channels, num_classes, config["k"], config["reduce_channels"],
                                 config["ps_pool"], config["class_specific_boxes"])


def build(config: dict, info: dict) -> RegionDetector:
    """R-FCN: shared backbone + region proposal network + position-sensitive score maps and voting."""
    backbone = build_detection_backbone({**config, "fpn": False})
    sampling, postprocess, weights = roi_head_settings(config)
    head = build_position_sensitive_head(config, backbone.out_channels, info["num_classes"])
    return RegionDetector(info["num_classes"], build_rpn(config, backbone.out_channels), head, backbone,
                          sampling, postprocess, weights, transform=detector_transform(config, info))
