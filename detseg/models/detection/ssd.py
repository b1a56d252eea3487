"""SSD (Liu et al., 2016): single-shot detection from default boxes on feature maps of several strides.

YOLO predicts from one coarse grid, so every object, small or large, is the business of the same few cells. SSD's
answer is to predict from several feature maps at once: the backbone's stride-8 map and a few extra stride-2 blocks
after it (strides 16, 32, 64: at 128 px maps of 16x16, 8x8, 4x4, 2x2). Each map gets *default boxes* sized for it -
small boxes on the fine map, large ones on the coarse maps - a few aspect ratios at every cell, and a 3x3
convolution that predicts, for each default box, K+1 class scores (background included) and four offsets. The
whole detector is one pass of convolutions; there is no proposal stage and no per-region network.

The default boxes for the 128 px scenes (objects ~6-90 px, median ~27): sizes 14, 32, 64, 112 on the stride 8, 16,
32, 64 maps, each at ratios 1, 2 and 1/2 (height / width; the stick-figure people are up to ~2.5 times taller than
wide) plus a square box of sqrt(s_k s_k+1) = 21, 45, 85, 127: four boxes per cell, 1360 in all. A box about twice its
map's stride matters more than it seems: an object lies anywhere between cell centres, and boxes of 1.25 strides
(10, 20, 40, 80) give only ~60-70% of the scenes' objects a box at IoU >= 0.5, against ~97% of those above 16 px
with these sizes (objects under 16 px: ~55% either way - the stride-8 grid is too coarse for them); on the scenes
that took the AP after 300 s of training from 0.29 to 0.43.

Training, as in the paper:

* **Matching.** A default box is positive for the ground truth it overlaps most if that IoU is >= 0.5; besides,
  every ground truth takes its own best default box whatever the IoU, so that a tiny or oddly shaped object still
  has a predictor learning it. All other boxes are background.
* **Hard-negative mining.** Most of the 1360 default boxes are background; using all of them would drown the
  positives. Only the negatives with the highest classification loss are kept, 3 per positive, and at least
  ``min_negatives`` per image, so that an image without objects still teaches the background.
* **Loss.** Cross-entropy over positives and the mined negatives, plus smooth L1 on the positives' offsets (encoded
  with weights (10, 10, 5, 5), the paper's "variances"), both divided by the number of positives.

The loss is computed for the whole batch at once: ground truths are padded to one ``(N, G)`` tensor, matched by one
batched IoU, and the mining is one ``topk`` per batch. Default boxes are computed once per feature-map size.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ...config import Option, number_list
from ...errors import ConfigError
from ...ops.anchors import AnchorGenerator, anchor_shapes, flatten_head_output
from ...ops.boxes import broadcast_box_iou, decode_box_deltas, encode_box_deltas
from ..backbones import conv_bn_relu
from ..base import ImageTransform
from .backbone import BACKBONE_OPTIONS, build_detection_backbone
from .generalized import detector_transform
from .single_shot import SINGLE_SHOT_OPTIONS, SingleShotDetector, SingleShotPostprocess

# The feature pyramid of the resnet backbones is not used: SSD builds its own levels from one map.
FEATURE_OPTIONS = {
    **{key: option for key, option in BACKBONE_OPTIONS.items() if key != "fpn"},
    "extra_levels": Option(3, "stride-2 blocks after the backbone, one more feature map each", min=0, max=6),
    "extra_channels": Option(0, "channels of the extra feature maps (0 = the backbone's)", min=0, max=4096),
    "channels_last": Option(True, "run the convolutions on channels-last tensors (oneDNN's own layout: faster "
                                  "on CPUs, the same numbers up to rounding)"),
}
DEFAULT_BOX_OPTIONS = {
    "box_sizes": Option("14,32,64,112,144", "default-box sizes in input pixels, one per level plus one: level k "
                                            "has size s_k at every ratio and sqrt(s_k s_k+1) at ratio 1"),
    "box_ratios": Option("1,2,0.5", "default-box aspect ratios (height / width): one list for every level, or "
                                    "one per level separated by ';'"),
}
OPTIONS = {
    **FEATURE_OPTIONS,
    **DEFAULT_BOX_OPTIONS,
    "match_iou": Option(0.5, "a default box with IoU >= this with a ground truth is positive for it", min=0, max=1),
    "neg_pos_ratio": Option(3.0, "hard negatives kept per positive", min=0),
    "min_negatives": Option(8, "hard negatives kept per image at least (images without objects too)", min=0),
    "box_loss_weight": Option(1.0, "weight of the smooth L1 box loss against the classification loss", min=0),
    "box_weights": Option("10,10,5,5", "scaling of the (x, y, w, h) offset targets"),
    **SINGLE_SHOT_OPTIONS,
    # The paper's evaluation threshold (and torchvision's SSD's): COCO's AP counts every detection up to 100 per
    # image, and the low-scoring ones still add recall (AP 0.166 -> 0.172 on a 40 s checkpoint of the scenes).
    "score_thresh": Option(0.01, "detections below this score are dropped", min=0, max=1),
}
TRAINING = {
    "lr": Option(3e-3, "peak learning rate", min=0),
    "batch_size": Option(8, "images per step", min=1),
    "epochs": Option(30, "passes over the training set", min=0),
}


# --- the feature maps -----------------------------------------------------------------------------------------------

class MultiScaleFeatures(nn.Module):
    """The backbone's map, then ``extra_levels`` blocks that each halve the resolution: an ordered dict of maps.

    An extra block is the paper's: a 1x1 convolution to half the channels, then a stride-2 3x3 convolution. The
    output is an ``OrderedDict`` ``"0"``, ``"1"``, ... finest first - the form torchvision's SSD expects of a
    backbone, so ``det/torchvision_ssd`` runs on this very module.

    ``channels_last`` stores weights and activations as (N, H, W, C) in memory (the shapes stay (N, C, H, W)):
    the layout CPU convolution kernels work in, which spares layout conversions around every layer (~15-20% of a
    training step on two CPU cores).
    """

    def __init__(self, backbone: nn.Module, extra_levels: int = 3, extra_channels: int = 0,
                 channels_last: bool = False):
        super().__init__()
        self.backbone = backbone
        channels = [backbone.out_channels]
        blocks = []
        for _ in range(extra_levels):
            width = extra_channels or channels[-1]
            blocks.append(nn.Sequential(conv_bn_relu(channels[-1], max(1, width // 2), kernel=1),
                                        conv_bn_relu(max(1, width // 2), width, stride=2)))
            channels.append(width)
        self.extras = nn.ModuleList(blocks)
        self.out_channels = channels                       # one entry per level
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        images = images.contiguous(memory_format=self.memory_format)
        maps = [self.backbone(images)]                     # (N, C, H / 8, W / 8) for the tiny backbone
        for block in self.extras:
            maps.append(block(maps[-1]))                   # halves H and W
        return OrderedDict((str(level), features) for level, features in enumerate(maps))


def build_features(config: dict) -> MultiScaleFeatures:
    """The multi-level feature extractor of ``det/ssd`` and ``det/torchvision_ssd``."""
    backbone = build_detection_backbone({**config, "fpn": False})
    return MultiScaleFeatures(backbone, config["extra_levels"], config["extra_channels"], config["channels_last"])


# --- default boxes ----------------------------------------------------------------------------------------------

def ratios_per_level(text: str, levels: int) -> list[tuple[float, ...]]:
    """``"1,2,0.5"`` (every level) or ``"1,2,0.5;1,2,0.5,3,0.333"`` (one list per level) -> one tuple per level."""
    parts = [part for part in str(text).split(";") if part.strip()]
    ratios = [number_list("box_ratios", part) for part in parts]
    if len(ratios) == 1:
        return ratios * levels
    if len(ratios) != levels:
        raise ConfigError(f"box_ratios={text}: {len(ratios)} lists for {levels} feature maps (give one, or one "
                          "per map separated by ';')")
    return ratios


def default_box_settings(config: dict) -> tuple[tuple[float, ...], list[tuple[float, ...]]]:
    """``(sizes, ratios per level)`` of a run config, checked against its number of levels."""
    levels = config["extra_levels"] + 1
    sizes = number_list("box_sizes", config["box_sizes"])
    if len(sizes) != levels + 1:
        raise ConfigError(f"box_sizes={config['box_sizes']}: extra_levels={config['extra_levels']} gives {levels} "
                          f"feature maps, which need {levels + 1} sizes (one per map plus the one the last map's "
                          "in-between box is taken towards)")
    return sizes, ratios_per_level(config["box_ratios"], levels)


class DefaultBoxes(AnchorGenerator):
    """SSD's default boxes: at every cell of level ``k``, one box of size ``s_k`` per aspect ratio and one square
    box of size ``sqrt(s_k s_k+1)`` between this level's size and the next.

    ``sizes`` has one entry more than there are levels. They are anchors with other shapes per level, so the grid,
    the centring and the cache are :class:`~detseg.ops.anchors.AnchorGenerator`'s: boxes are centred on the cells,
    laid out ``(level, y, x, box)``, the order of :class:`SSDHead`'s outputs.
    """

    def __init__(self, sizes: Sequence[float], ratios: Sequence[Sequence[float]]):
        if len(sizes) != len(ratios) + 1:
            raise ValueError(f"{len(ratios)} levels need {len(ratios) + 1} sizes, got {len(sizes)}")
        self.sizes, self.ratios = tuple(sizes), [tuple(r) for r in ratios]
        self._set_shapes([torch.cat([anchor_shapes([sizes[k]], ratios[k]),
                                     anchor_shapes([math.sqrt(sizes[k] * sizes[k + 1])], [1.0])])
                          for k in range(len(ratios))])                                     # [(A_k, 4)]

    @property
    def boxes_per_location(self) -> list[int]:
        return self.num_anchors_per_location

    def per_level(self, feature_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int],
                  device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """``[(h_k * w_k * A_k, 4)]`` xyxy in input pixels; level ``k``'s stride is image size / map size."""
        return self.for_sizes(feature_sizes, image_size, device)

    def __call__(self, feature_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int],
                 device: torch.device | str = "cpu") -> torch.Tensor:
        """All levels' boxes, ``(P, 4)``, concatenated once per key (in the same cache as the levels')."""
        key = ("all levels", tuple(map(tuple, feature_sizes)), tuple(image_size), str(device))
        if key not in self._cache:
            self._cache[key] = torch.cat(self.per_level(feature_sizes, image_size, device))
        return self._cache[key]


class SSDOutputs(NamedTuple):
    class_logits: torch.Tensor       # (N, P, K + 1), class 0 background
    deltas: torch.Tensor             # (N, P, 4)
    feature_sizes: tuple             # ((h_k, w_k), ...) of the levels, for the default boxes


class SSDHead(nn.Module):
    """One 3x3 convolution per level: ``A_k (K + 1)`` class scores and ``4 A_k`` offsets at every cell.

    Class scores and offsets come out of the same convolution (one layer per level, the lightest head that sees a
    3x3 neighbourhood); its output is read as ``(N, A_k, K + 5, h, w)``, default-box major.
    """

    def __init__(self, in_channels: Sequence[int], boxes_per_location: Sequence[int], num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.convs = nn.ModuleList(nn.Conv2d(channels, boxes * (num_classes + 4), 3, padding=1)
                                   for channels, boxes in zip(in_channels, boxes_per_location))
        for conv in self.convs:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: "OrderedDict[str, torch.Tensor]") -> SSDOutputs:
        maps = list(features.values())
        outputs = [flatten_head_output(conv(level), self.num_classes + 4)              # (N, h w A, K + 5)
                   for conv, level in zip(self.convs, maps)]
        outputs = torch.cat(outputs, dim=1)                                             # (N, P, K + 5)
        sizes = tuple(tuple(level.shape[-2:]) for level in maps)
        return SSDOutputs(outputs[..., :self.num_classes], outputs[..., self.num_classes:], sizes)


# --- matching and mining ------------------------------------------------------------------------------------------

def batched_box_iou(gt_boxes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of every image's ground truths with the default boxes: ``(N, G, 4), (P, 4) -> (N, G, P)``.
    Padding rows (zero boxes) get IoU 0."""
    return broadcast_box_iou(gt_boxes[:, :, None, :], boxes[None, None])


def match_default_boxes(iou: torch.Tensor, valid: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """SSD's matching: ``iou`` (N, G, P), ``valid`` (N, G) bool (False on padding) -> ``(N, P)`` gt index or -1.

    A default box goes to the ground truth it overlaps most when that IoU is >= ``threshold``. Then every ground
    truth takes its best default box outright - the one rule that guarantees each object a positive however badly
    the default boxes fit it. When two objects have the same best box, the one overlapping it more keeps it and the
    other takes its best box not yet taken (a second pass, rare; ties go to the lower gt index).
    """
    batch, num_gt, num_boxes = iou.shape
    iou = iou.masked_fill(~valid[:, :, None], -1.0)
    if num_gt == 0:
        return torch.full((batch, num_boxes), -1, dtype=torch.long, device=iou.device)
    best_iou, matches = iou.max(dim=1)                                                  # (N, P) each
    matches = torch.where(best_iou >= threshold, matches, torch.full_like(matches, -1))

    image, gt = torch.nonzero(valid, as_tuple=True)                                      # (M,) each
    candidates = iou[image, gt]                                                          # (M, P)
    taken = torch.zeros(batch, num_boxes, dtype=torch.bool, device=iou.device)
    while len(image):
        best = candidates.argmax(dim=1)                                                  # (M,)
        # Who keeps a shared box: sort by IoU (descending), then stably by (image, box): the first of a group wins.
        overlap = candidates.gather(1, best[:, None]).squeeze(1)
        order = overlap.argsort(descending=True, stable=True)
        key = (image * num_boxes + best)[order]
        order = order[key.argsort(stable=True)]
        key = (image * num_boxes + best)[order]
        wins = torch.ones(len(order), dtype=torch.bool, device=iou.device)
        wins[1:] = key[1:] != key[:-1]
        winners, losers = order[wins], order[~wins]
        matches[image[winners], best[winners]] = gt[winners]
        taken[image[winners], best[winners]] = True
        image, gt, candidates = image[losers], gt[losers], candidates[losers]
        candidates = candidates.masked_fill(taken[image], -2.0)
    return matches


def hard_negatives(class_loss: torch.Tensor, positive: torch.Tensor, ratio: float = 3.0,
                   min_negatives: int = 0) -> torch.Tensor:
    """The negatives that train the classifier: ``(N, P)`` losses and positives -> ``(N, P)`` bool.

    Per image, the ``max(ratio * positives, min_negatives)`` background boxes with the highest loss (or all of them
    when there are fewer). One ``topk`` over the batch; the losses are only ranked, never differentiated.
    """
    num_positive = positive.sum(dim=1)                                                   # (N,)
    wanted = torch.clamp((num_positive.to(class_loss.dtype) * ratio).floor().long(), min=min_negatives)
    wanted = torch.minimum(wanted, positive.shape[1] - num_positive)                    # (N,)
    most = int(wanted.max()) if len(wanted) else 0
    selected = torch.zeros_like(positive)
    if most == 0:
        return selected
    ranked = class_loss.detach().masked_fill(positive, -math.inf)
    hardest = ranked.topk(most, dim=1).indices                                           # (N, most)
    keep = torch.arange(most, device=positive.device)[None] < wanted[:, None]            # (N, most)
    return selected.scatter_(1, hardest, keep)


# --- the detector -------------------------------------------------------------------------------------------------

class SSD(SingleShotDetector):
    """Multi-scale features + :class:`SSDHead`; the loss and decoding of the paper (see the module docstring)."""

    def __init__(self, num_classes: int, features: MultiScaleFeatures, default_boxes: DefaultBoxes,
                 postprocess: SingleShotPostprocess | None = None, image_size: int = 128, match_iou: float = 0.5,
                 neg_pos_ratio: float = 3.0, min_negatives: int = 8, box_loss_weight: float = 1.0,
                 box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0), transform: ImageTransform | None = None):
        head = SSDHead(features.out_channels, default_boxes.boxes_per_location, num_classes)
        super().__init__(num_classes, features, head, postprocess, image_size, transform,
                         channels_last=features.memory_format == torch.channels_last)
        self.default_boxes = default_boxes
        self.match_iou, self.neg_pos_ratio, self.min_negatives = match_iou, neg_pos_ratio, min_negatives
        self.box_loss_weight, self.box_weights = box_loss_weight, tuple(box_weights)

    def losses(self, outputs: SSDOutputs, targets: list[dict], image_size) -> dict[str, torch.Tensor]:
        logits, deltas = outputs.class_logits, outputs.deltas                             # (N, P, K+1), (N, P, 4)
        boxes = self.default_boxes(outputs.feature_sizes, image_size, logits.device)     # (P, 4)
        with torch.no_grad():
            gt_boxes = pad_sequence([t["boxes"].to(boxes) for t in targets], batch_first=True)   # (N, G, 4)
            gt_labels = pad_sequence([t["labels"].long().to(logits.device) for t in targets], batch_first=True)
            counts = torch.tensor([len(t["boxes"]) for t in targets], device=logits.device)
            valid = torch.arange(gt_boxes.shape[1], device=logits.device)[None] < counts[:, None]   # (N, G)
            matches = match_default_boxes(batched_box_iou(gt_boxes, boxes), valid, self.match_iou)  # (N, P)
            positive = matches >= 0
            image, box = torch.nonzero(positive, as_tuple=True)                                    # (pos,) each
            matched = matches[image, box]
            labels = torch.zeros_like(matches)                                                  # (N, P), 0 background
            labels[image, box] = gt_labels[image, matched]
            delta_targets = encode_box_deltas(boxes[box], gt_boxes[image, matched], self.box_weights)   # (pos, 4)

            # A negative's classification loss is its background loss; mining only ranks it, so no graph is kept
            # for every default box of the batch, only for the few hundred that are trained on.
            background_loss = logits.logsumexp(dim=-1) - logits[..., 0]                            # (N, P)
            negative = hard_negatives(background_loss, positive, self.neg_pos_ratio, self.min_negatives)
            trained = positive | negative
        normaliser = positive.sum().clamp(min=1).to(logits.dtype)
        class_loss = F.cross_entropy(logits[trained], labels[trained], reduction="sum")
        box_loss = F.smooth_l1_loss(deltas[image, box], delta_targets, beta=1.0, reduction="sum")
        return {"ssd_class": class_loss / normaliser, "ssd_box": self.box_loss_weight * box_loss / normaliser}

    def decode(self, outputs: SSDOutputs, image_size) -> tuple[torch.Tensor, torch.Tensor]:
        logits, deltas = outputs.class_logits, outputs.deltas
        batch, count = deltas.shape[:2]
        boxes = self.default_boxes(outputs.feature_sizes, image_size, deltas.device)     # (P, 4)
        decoded = decode_box_deltas(boxes.repeat(batch, 1), deltas.reshape(-1, 4), self.box_weights)
        scores = logits.softmax(dim=-1)[..., 1:]                                         # (N, P, K): foreground only
        return decoded.view(batch, count, 4), scores


def box_weights_of(config: dict) -> tuple[float, ...]:
    weights = number_list("box_weights", config["box_weights"])
    if len(weights) != 4:
        raise ConfigError(f"box_weights={config['box_weights']}: expected four numbers (x, y, w, h)")
    return weights


def build(config: dict, info: dict) -> SSD:
    """SSD on the detection backbone plus ``extra_levels`` stride-2 blocks, default boxes of ``box_sizes``."""
    sizes, ratios = default_box_settings(config)
    return SSD(info["num_classes"], build_features(config), DefaultBoxes(sizes, ratios),
               SingleShotPostprocess.from_config(config), transform=detector_transform(config, info, size_divisible=64),
               match_iou=config["match_iou"], neg_pos_ratio=config["neg_pos_ratio"],
               min_negatives=config["min_negatives"], box_loss_weight=config["box_loss_weight"],
               box_weights=box_weights_of(config))
