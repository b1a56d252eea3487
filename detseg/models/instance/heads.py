"""The two per-region networks Mask R-CNN adds to Faster R-CNN, their targets, and how their outputs reach the image.

He et al. (2017) keep Faster R-CNN whole and add branches that run on the same RoI features:

* the **mask head** - a small fully-convolutional network per region: RoIAlign to 14 x 14, a few 3 x 3 convolutions,
  a 2 x 2 transposed convolution to 28 x 28, and a 1 x 1 convolution giving one mask logit map *per class*. Only the
  ground-truth class's map is trained (binary cross-entropy per pixel), so classes do not compete for pixels - the
  box head already decided the class. The target is the object's mask cut out of the image at the region and
  resized to 28 x 28.
* the **keypoint head** - per person region one heat map per joint: eight 3 x 3 convolutions, a 4 x 4 stride-2
  transposed convolution and a bilinear x2, giving 56 x 56 maps. Each visible joint is *one* position of its map,
  and the loss is a softmax cross-entropy over the 56 x 56 positions (a joint is in exactly one place).

At test time both heads run on the post-NMS detections. A 28 x 28 mask is pasted back into the image at its box, a
heat map's arg-max becomes the joint. Both conventions (the 1 px border around a pasted mask, the bicubic
upsampling of a heat map to its box's size before the arg-max) follow torchvision's, so a torchvision checkpoint
converted to this package gives the same masks and joints; the work is done for all detections at once with
separable interpolation matrices instead of one interpolation per detection.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align, roi_pool

from ...ops.pooling import ThreadedMultiScaleRoIAlign

from ..detection.fast_rcnn import pool_regions


def conv_stack(in_channels: int, channels: Sequence[int]) -> nn.Sequential:
    """3 x 3 convolution + ReLU per entry of ``channels``; the resolution is kept (``(R, C, s, s) -> (R, c, s, s)``).

    Plain convolutions with biases and no normalisation: the per-region batches mix regions of all sizes, and these
    layers are laid out exactly as torchvision's heads (weights at indices 0, 2, 4, ...) so its checkpoints load."""
    layers: list[nn.Module] = []
    for width in channels:
        conv = nn.Conv2d(in_channels, width, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers)


class RegionPooling(nn.Module):
    """RoIAlign (or RoIPool) of each region to ``size x size``, from one map or the fitting level of a pyramid."""

    def __init__(self, size: int, pool: str = "roi_align", fpn_levels: tuple[str, ...] | None = None):
        super().__init__()
        self.size, self.pool = size, pool
        self.multi_scale = ThreadedMultiScaleRoIAlign(list(fpn_levels), size, 2) if fpn_levels else None

    def forward(self, features, rois: list[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        return pool_regions(features, rois, image_size, self.size, self.pool, self.multi_scale)   # (R, C, s, s)


class MaskHead(nn.Module):
    """``(features, [(R_i, 4)]) -> (R, K+1, 2 s, 2 s)`` mask logits, one map per class (s = the pooled size).

    ``pixels=True`` adds a refinement step before the logits: the region's own pixels, RoIAlign'd from the
    normalised image to the mask's 2 s x 2 s grid, are concatenated to the upsampled features and one 3 x 3
    convolution reads both - a hypercolumn (Hariharan et al.) whose finest level is the image itself. A stride-8 map
    sampled at 14 x 14 over a 40 px person holds its limbs as a blur of five cells; the pixels still show them.
    The forward pass then needs ``images`` (the normalised batch the features came from)."""

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (256, 256, 256, 256),
                 pool_size: int = 14, pool: str = "roi_align", fpn_levels: tuple[str, ...] | None = None,
                 pixels: bool = False):
        super().__init__()
        self.pooling = RegionPooling(pool_size, pool, fpn_levels)
        self.convs = conv_stack(in_channels, channels)
        width = channels[-1] if channels else in_channels
        self.upsample = nn.ConvTranspose2d(width, width, 2, stride=2)                 # 14 x 14 -> 28 x 28
        self.refine = conv_stack(width + 3, (width,)) if pixels else None
        self.mask_size = 2 * pool_size                                                 # a plain int: traceable
        self.logits = nn.Conv2d(width, num_classes, 1)
        for layer in (self.upsample, self.logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, features, rois: list[torch.Tensor], image_size: tuple[int, int],
                images: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.convs(self.pooling(features, rois, image_size))                      # (R, c, s, s)
        hidden = F.relu(self.upsample(hidden))                                              # (R, c, 2s, 2s)
        if self.refine is not None:
            if images is None:
                raise ValueError("MaskHead(pixels=True) needs the normalised images")
            # On the grid of the mask targets (:func:`mask_targets`: box corners on pixel centres); quantised like
            # the features when the head pools with RoIPool (bench roialign compares the two samplings whole).
            boxes = [r.to(images.dtype) for r in rois]
            pixels = roi_pool(images, boxes, self.mask_size, 1.0) if self.pooling.pool == "roi_pool" else \
                roi_align(images, boxes, self.mask_size, spatial_scale=1.0, sampling_ratio=2, aligned=False)
            hidden = self.refine(torch.cat([hidden, pixels], dim=1))                       # (R, c, 2s, 2s)
        return self.logits(hidden)                                                          # (R, K+1, 2s, 2s)


class KeypointHead(nn.Module):
    """``(features, [(R_i, 4)]) -> (R, J, 4 s, 4 s)`` heat-map logits, one per joint (56 x 56 from s = 14)."""

    def __init__(self, in_channels: int, num_keypoints: int, channels: Sequence[int] = (512,) * 8,
                 pool_size: int = 14, pool: str = "roi_align", fpn_levels: tuple[str, ...] | None = None):
        super().__init__()
        self.num_keypoints = num_keypoints
        self.pooling = RegionPooling(pool_size, pool, fpn_levels)
        self.convs = conv_stack(in_channels, channels)
        width = channels[-1] if channels else in_channels
        self.upsample = nn.ConvTranspose2d(width, num_keypoints, 4, stride=2, padding=1)    # s -> 2 s
        nn.init.kaiming_normal_(self.upsample.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.upsample.bias)

    def forward(self, features, rois: list[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        maps = self.upsample(self.convs(self.pooling(features, rois, image_size)))          # (R, J, 2s, 2s)
        # A fixed bilinear x2 on top: a finer grid to place the arg-max on, at no parameter cost.
        return F.interpolate(maps, scale_factor=2.0, mode="bilinear", align_corners=False)  # (R, J, 4s, 4s)


# ---- training targets and losses --------------------------------------------------------------------------------

def mask_targets(gt_masks: torch.Tensor, rois: torch.Tensor, matched: torch.Tensor, size: int) -> torch.Tensor:
    """Each positive RoI's ground-truth mask cut out at the RoI and resized: ``(G, H, W), (P, 4), (P,) -> (P, s, s)``.

    RoIAlign on the binary mask at scale 1 (a bilinear average under each target cell), with box corners on pixel
    centres - the same convention :func:`paste_masks` uses to put a predicted mask back."""
    if len(rois) == 0:
        return gt_masks.new_zeros((0, size, size), dtype=torch.float32)
    regions = torch.cat([matched[:, None].to(rois), rois], dim=1)                            # (P, 5)
    return roi_align(gt_masks[:, None].float(), regions, size, spatial_scale=1.0, sampling_ratio=2,
                     aligned=False)[:, 0]


def mask_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pixel binary cross-entropy on the ground-truth class's map only: ``(P, K+1, s, s), (P,), (P, s, s)``."""
    if len(labels) == 0:
        return logits.sum() * 0.0
    chosen = logits[torch.arange(len(labels), device=logits.device), labels]                  # (P, s, s)
    return F.binary_cross_entropy_with_logits(chosen, targets)


def keypoint_targets(keypoints: torch.Tensor, rois: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Joints -> the index of their heat-map cell: ``(P, J, 3), (P, 4) -> (P, J) in [0, size^2), (P, J) bool``.

    A joint is a target when it is visible (flag > 0) and falls inside its RoI; a joint exactly on the right or
    bottom edge belongs to the last cell."""
    x1, y1, x2, y2 = (rois[:, i:i + 1] for i in range(4))                                    # (P, 1) each
    scale_x, scale_y = size / (x2 - x1).clamp(min=1e-6), size / (y2 - y1).clamp(min=1e-6)
    x, y = keypoints[..., 0], keypoints[..., 1]
    column = ((x - x1) * scale_x).floor().long()
    row = ((y - y1) * scale_y).floor().long()
    column = torch.where(x == x2, size - 1, column)
    row = torch.where(y == y2, size - 1, row)
    valid = (column >= 0) & (row >= 0) & (column < size) & (row < size) & (keypoints[..., 2] > 0)
    return (row * size + column) * valid, valid


def keypoint_loss(heatmaps: torch.Tensor, keypoints: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the positions of each visible joint's map: ``(P, J, S, S), (P, J, 3), (P, 4)``.

    Averaged over the valid joints of the batch; no valid joint gives a zero that still belongs to the graph."""
    size = heatmaps.shape[-1]
    cells, valid = keypoint_targets(keypoints.to(heatmaps), rois, size)
    if not bool(valid.any()):
        return heatmaps.sum() * 0.0
    logits = heatmaps.flatten(2)[valid]                                                     # (V, S*S)
    return F.cross_entropy(logits, cells[valid])


# ---- from head outputs to the image -----------------------------------------------------------------------------

def _bilinear_matrix(out_sizes: torch.Tensor, in_size: int, out_max: int) -> torch.Tensor:
    """``F.interpolate(mode="bilinear", align_corners=False)`` along one axis as a matrix per region.

    ``out_sizes`` (D,) target lengths -> (D, out_max, in_size); rows past a region's length are zero. Source
    coordinate of output ``i``: ``(i + 0.5) * in / out - 0.5``, clamped at 0; the upper neighbour is clamped at the
    last input cell - PyTorch's rule, so the product equals the interpolation."""
    positions = torch.arange(out_max, dtype=torch.float32, device=out_sizes.device)          # (O,)
    lengths = out_sizes.to(torch.float32)[:, None]                                          # (D, 1)
    source = ((positions + 0.5) * (in_size / lengths) - 0.5).clamp(min=0)                  # (D, O)
    lower = source.floor().long().clamp(max=in_size - 1)
    upper = (lower + 1).clamp(max=in_size - 1)
    fraction = source - lower
    matrix = torch.zeros(len(out_sizes), out_max, in_size, device=out_sizes.device)
    matrix.scatter_add_(2, lower[..., None], (1 - fraction)[..., None])
    matrix.scatter_add_(2, upper[..., None], fraction[..., None])
    return matrix * (positions[None, :] < lengths)[..., None]


def _chunks(areas: torch.Tensor, budget: int) -> list[slice]:
    """Consecutive slices whose summed ``areas`` stay under ``budget`` (at least one item each)."""
    slices, start, total = [], 0, 0
    for index, area in enumerate(areas.tolist()):
        if index > start and total + area > budget:
            slices.append(slice(start, index))
            start, total = index, 0
        total += area
    if start < len(areas):
        slices.append(slice(start, len(areas)))
    return slices


def paste_masks(probabilities: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int],
                threshold: float = 0.5, padding: int = 1) -> torch.Tensor:
    """28 x 28 mask probabilities into the image at their boxes: ``(D, M, M), (D, 4), (H, W) -> (D, H, W)`` bool.

    torchvision's convention: the mask gets a ``padding``-cell border of zeros and its box grows by the same share
    (so the mask's edge can fall off smoothly instead of being cut at the box); the grown box is truncated to whole
    pixels ``x0..x1`` inclusive, the padded mask is bilinearly resized to that many pixels, and thresholded. Here the
    resize is two small matrix products per mask (``rows @ mask @ columns``), for all detections at once."""
    height, width = image_size
    count = len(probabilities)
    result = torch.zeros((count, height, width), dtype=torch.bool, device=probabilities.device)
    if count == 0:
        return result
    size = probabilities.shape[-1]
    padded = F.pad(probabilities, (padding,) * 4)                                           # (D, M+2p, M+2p)
    scale = (size + 2 * padding) / size
    centres, halves = (boxes[:, :2] + boxes[:, 2:]) * 0.5, (boxes[:, 2:] - boxes[:, :2]) * 0.5 * scale
    grown = torch.cat([centres - halves, centres + halves], dim=1).to(torch.int64)          # (D, 4), toward zero
    sides = (grown[:, 2:] - grown[:, :2] + 1).clamp(min=1)                                   # (D, 2) w, h
    # Only the part of a box inside the image is ever written; chunks bound the (d, h, w) intermediate.
    for part in _chunks(sides[:, 0] * sides[:, 1], budget=4_000_000):
        part_sides = sides[part]
        rows = _bilinear_matrix(part_sides[:, 1], size + 2 * padding, int(part_sides[:, 1].max()))
        columns = _bilinear_matrix(part_sides[:, 0], size + 2 * padding, int(part_sides[:, 0].max()))
        local = rows @ padded[part] @ columns.transpose(1, 2) > threshold                    # (d, h, w)
        for offset, (x0, y0, x1, y1) in enumerate(grown[part].tolist()):
            row = part.start + offset
            left, top, right, bottom = max(x0, 0), max(y0, 0), min(x1 + 1, width), min(y1 + 1, height)
            if right > left and bottom > top:
                result[row, top:bottom, left:right] = local[offset, top - y0:bottom - y0, left - x0:right - x0]
    return result


def decode_keypoints(heatmaps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Heat maps -> joints in the image: ``(D, J, S, S), (D, 4) -> (D, J, 3)`` as (x, y, score).

    Each map is upsampled (bicubic) to its box's size in whole pixels before the arg-max - torchvision's rule, which
    places a joint to a pixel rather than to a 56th of the box - and the cell's centre is mapped back to the box;
    the score is the upsampled logit there. One interpolation per box: PyTorch's bicubic kernel does 16
    multiply-adds per output value, which batched matrix products over padded boxes did not beat (measured)."""
    count, joints = heatmaps.shape[:2]
    result = heatmaps.new_zeros((count, joints, 3))
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
    map_widths, map_heights = widths.ceil().long().tolist(), heights.ceil().long().tolist()
    for row in range(count):
        upsampled = F.interpolate(heatmaps[row][None], size=(map_heights[row], map_widths[row]), mode="bicubic",
                                  align_corners=False)[0]                                  # (J, h, w)
        scores, cells = upsampled.flatten(1).max(dim=1)                                    # (J,) each
        column, line = cells % map_widths[row], cells // map_widths[row]
        result[row, :, 0] = (column.float() + 0.5) * (widths[row] / map_widths[row]) + boxes[row, 0]
        result[row, :, 1] = (line.float() + 0.5) * (heights[row] / map_heights[row]) + boxes[row, 1]
        result[row, :, 2] = scores
    return result


__all__ = ["MaskHead", "KeypointHead", "RegionPooling", "conv_stack", "mask_targets", "mask_loss",
           "keypoint_targets", "keypoint_loss", "paste_masks", "decode_keypoints"]
