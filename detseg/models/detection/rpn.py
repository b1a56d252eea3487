"""The region proposal network (Faster R-CNN, Ren et al. 2015): proposals learned from the shared features.

Once Fast R-CNN shares the CNN across proposals, Selective Search - seconds per image on a CPU - is the bottleneck.
The RPN makes proposals part of the network: a small convolutional head slides over the backbone's feature map and,
at every cell, scores ``A`` fixed reference boxes (*anchors*, several scales x aspect ratios centred on the cell)
as object / not object and regresses deltas that turn each anchor into a better-fitting box. The best few hundred
boxes after NMS are the proposals of the RoI head. It costs one 3x3 and two 1x1 convolutions on features the
detector computes anyway.

Training labels anchors by IoU with the ground truth (>= 0.7 object, < 0.3 background, plus each object's best
anchor so that none is left without a positive), samples 256 anchors per image at most half positive, and adds two
losses to the detector's: binary cross-entropy on objectness and smooth L1 on the positives' deltas.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Option, number_list
from ...ops.anchors import AnchorGenerator, flatten_head_output
from ...ops.boxes import Matcher, assign_targets, clip_and_filter, decode_box_deltas, encode_box_deltas, \
    sample_balanced
from .backbone import FPN_RPN_LEVELS, uses_fpn

RPN_OPTIONS = {
    "anchor_scales": Option("8,16,32,64", "anchor sizes in pixels (sqrt of area); with FPN one per level, "
                                          "smallest on the finest level"),
    "anchor_ratios": Option("0.5,1,2", "anchor aspect ratios (height / width)"),
    "rpn_anchors_per_image": Option(256, "anchors sampled per training image for the RPN losses", min=1),
    "rpn_pre_nms": Option(600, "best-scoring boxes kept before NMS", min=1),
    "rpn_post_nms_train": Option(300, "proposals per image after NMS while training", min=1),
    "rpn_post_nms_test": Option(100, "proposals per image after NMS at test time", min=1),
    "rpn_nms_thresh": Option(0.7, "NMS IoU among proposals", min=0, max=1),
    "rpn_loss_weight": Option(1.0, "weight of the two RPN losses in the 4-part sum", min=0),
    "rpn_per_level": Option(False, "FPN: keep rpn_pre_nms boxes per pyramid level and run NMS within each level "
                                   "(torchvision's rule) instead of over all levels together"),
    "rpn_min_size": Option(1.0, "proposals with a side below this many pixels are dropped", min=0),
    "anchor_grid": Option("centred", "anchors centred on their cells (centred) or torchvision's grid: whole-pixel "
                                     "shapes at the cells' corners (torchvision, for converted checkpoints)",
                          choices=("centred", "torchvision")),
}


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then per anchor one objectness logit and four deltas, at every cell of every level."""

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.objectness = nn.Conv2d(in_channels, num_anchors, 1)
        self.deltas = nn.Conv2d(in_channels, 4 * num_anchors, 1)
        for layer in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[(N, C, h_l, w_l)] -> (N, sum_l h_l w_l A, 1), (N, sum_l h_l w_l A, 4)`` in anchor order."""
        scores, deltas = [], []
        for features in maps:
            hidden = F.relu(self.conv(features))
            scores.append(flatten_head_output(self.objectness(hidden), 1))
            deltas.append(flatten_head_output(self.deltas(hidden), 4))
        return torch.cat(scores, dim=1), torch.cat(deltas, dim=1)


class RegionProposalNetwork(nn.Module):
    """The proposer stage of Faster R-CNN and R-FCN (see :mod:`.generalized` for the contract); proposals are
    clipped to each image's own size within a padded batch (``image_sizes``)."""

    takes_image_sizes = True

    def __init__(self, in_channels: int, anchors: AnchorGenerator, anchors_per_image: int = 256,
                 pre_nms: int = 1000, post_nms_train: int = 300, post_nms_test: int = 100, nms_thresh: float = 0.7,
                 min_size: float = 1.0, loss_weight: float = 1.0, levels: tuple[str, ...] | None = None,
                 per_level: bool = False):
        super().__init__()
        if len(set(anchors.num_anchors_per_location)) != 1:
            raise ValueError("the RPN head is shared across levels: every level needs the same number of anchors")
        self.anchors = anchors
        self.head = RPNHead(in_channels, anchors.num_anchors_per_location[0])
        self.matcher = Matcher(0.7, 0.3, allow_low_quality=True)
        self.anchors_per_image, self.pre_nms = anchors_per_image, pre_nms
        self.post_nms_train, self.post_nms_test = post_nms_train, post_nms_test
        self.nms_thresh, self.min_size, self.loss_weight, self.levels = nms_thresh, min_size, loss_weight, levels
        self.per_level = per_level

    def forward(self, images, features, image_size, targets, image_sizes=None):
        maps = [features[name] for name in self.levels] if self.levels else [features]
        level_anchors = self.anchors(maps, image_size)
        anchors = torch.cat(level_anchors)                                                   # (A_total, 4)
        scores, deltas = self.head(maps)                                                     # (N, A_total, 1|4)
        proposals = self._proposals(anchors, [len(a) for a in level_anchors], scores.detach().squeeze(2),
                                    deltas.detach(), image_sizes or [image_size] * len(scores))
        if targets is None:
            return proposals, {}
        return proposals, self._losses(anchors, scores.squeeze(2), deltas, targets)

    def _proposals(self, anchors, level_lengths: list[int], scores, deltas,
                   image_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Per image the best boxes after NMS, clipped to that image's own (unpadded) size."""
        keep = self.post_nms_train if self.training else self.post_nms_test
        levels, starts = None, [0, *itertools.accumulate(level_lengths)][:-1]
        if self.per_level and len(level_lengths) > 1:
            levels = torch.repeat_interleave(torch.arange(len(level_lengths), device=scores.device),
                                             torch.tensor(level_lengths, device=scores.device))
        proposals = []
        for image_scores, image_deltas, size in zip(scores, deltas, image_sizes):
            # Rank first, decode only the best: decoding all anchors of a large image is most of the RPN's cost.
            if levels is None:
                best = image_scores.topk(min(self.pre_nms, len(image_scores))).indices
            else:           # the best of each level, so that coarse levels are not crowded out by fine ones
                best = torch.cat([level_scores.topk(min(self.pre_nms, len(level_scores))).indices + start
                                  for level_scores, start in zip(image_scores.split(level_lengths), starts)])
            boxes = decode_box_deltas(anchors[best], image_deltas[best])
            kept = clip_and_filter(boxes, image_scores[best], size, min_size=self.min_size,
                                   nms_thresh=self.nms_thresh, top_k=keep,
                                   labels=None if levels is None else levels[best])
            proposals.append(kept.boxes)
        return proposals

    def _losses(self, anchors, scores, deltas, targets) -> dict[str, torch.Tensor]:
        sampled_scores, sampled_labels, positive_deltas, positive_targets = [], [], [], []
        for image_scores, image_deltas, target in zip(scores, deltas, targets):
            crowd = target.get("iscrowd")
            with torch.no_grad():
                assigned = assign_targets(anchors, target["boxes"].to(anchors), None, self.matcher,
                                          crowd.bool().to(anchors.device) if crowd is not None else None)
                positives, negatives = sample_balanced(assigned.matches, self.anchors_per_image, 0.5)
            chosen = torch.cat([positives, negatives])
            sampled_scores.append(image_scores[chosen])
            sampled_labels.append((assigned.labels[chosen] > 0).to(image_scores.dtype))
            positive_deltas.append(image_deltas[positives])
            positive_targets.append(encode_box_deltas(anchors[positives], assigned.boxes[positives]))
        sampled = torch.cat(sampled_scores)
        objectness = F.binary_cross_entropy_with_logits(sampled, torch.cat(sampled_labels)) if len(sampled) \
            else scores.sum() * 0.0
        box = F.smooth_l1_loss(torch.cat(positive_deltas), torch.cat(positive_targets), beta=1.0 / 9,
                               reduction="sum") / max(1, len(sampled))
        return {"rpn_objectness": objectness * self.loss_weight, "rpn_box": box * self.loss_weight}


def fpn_anchor_levels(scales: tuple[float, ...], num_levels: int) -> list[tuple[float, ...]]:
    """One anchor size per pyramid level, finest first; missing sizes double the last one."""
    sizes = list(scales[:num_levels])
    while len(sizes) < num_levels:
        sizes.append(sizes[-1] * 2)
    return [(size,) for size in sizes]


def build_rpn(config: dict, in_channels: int) -> RegionProposalNetwork:
    """The RPN of a run config (``RPN_OPTIONS``); FPN backbones get one anchor size per level."""
    scales = number_list("anchor_scales", config["anchor_scales"])
    ratios = number_list("anchor_ratios", config["anchor_ratios"])
    levels = None
    grid = config.get("anchor_grid", "centred")         # .get: checkpoints from before the knob
    if uses_fpn(config):
        levels = FPN_RPN_LEVELS
        anchors = AnchorGenerator(fpn_anchor_levels(scales, len(levels)), ratios, grid=grid)
    else:
        anchors = AnchorGenerator(scales, ratios, grid=grid)
    return RegionProposalNetwork(in_channels, anchors, config["rpn_anchors_per_image"], config["rpn_pre_nms"],
                                 config["rpn_post_nms_train"], config["rpn_post_nms_test"],
                                 config["rpn_nms_thresh"], min_size=config.get("rpn_min_size", 1.0),
                                 loss_weight=config["rpn_loss_weight"], levels=levels,
                                 per_level=config.get("rpn_per_level", False))
