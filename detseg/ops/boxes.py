"""Box pieces every region-based detector shares: delta coding, IoU matching, balanced sampling, filtering, windows.

The R-CNN family never regresses box corners directly. A detector starts from a *reference* box (a sliding window, a
Selective Search proposal, an anchor) and predicts a small correction - the *deltas* - relative to that box's centre
and size. Learning the correction rather than the box makes the targets scale-invariant (a 10 px shift of a 20 px box
and a 100 px shift of a 200 px box are the same delta) and keeps them near zero, where regression is easy.

To train that regression (and the classifier next to it) every reference box needs a target: the ground-truth box it
overlaps most, if it overlaps enough (positive), background if it overlaps too little (negative), and "don't care" in
between, because a half-covered object is neither a good example of the object nor of background. Since
backgrounds vastly outnumber objects, each step then samples a fixed-size mini-batch with a bounded positive share.

Conventions (shared with ``torchvision.ops``): boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates, so
the width of a box is ``x2 - x1`` (no "+1"), and a box covering pixel columns 0..15 is ``(0, 16)``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torchvision.ops import batched_nms, box_area, box_iou, clip_boxes_to_image, nms, remove_small_boxes

from ..errors import ConfigError
from .anchors import anchor_shapes

# Largest log-ratio a decoded width/height may take: a box may grow at most 1000/16 times its reference in one step.
# Without it one bad prediction early in training gives exp(large) = inf boxes and NaN losses.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)

# Values of a match vector (see Matcher.match) that are not ground-truth indices.
NEGATIVE = -1   # background: IoU below the low threshold with every ground-truth box
IGNORED = -2    # between the thresholds (or on a crowd region): takes no part in the losses


# --- delta coding -------------------------------------------------------------------------------------------------

def _centre_size(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(N, 4)`` xyxy -> centre x, centre y, width, height, each ``(N,)``."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights, widths, heights


def encode_box_deltas(reference: torch.Tensor, target: torch.Tensor,
                      weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """Deltas that turn each reference box into its target box, R-CNN parametrisation: ``(N, 4), (N, 4) -> (N, 4)``.

    ``tx = wx * (gx - px) / pw``, ``ty = wy * (gy - py) / ph`` (centre shift in units of the reference size),
    ``tw = ww * log(gw / pw)``, ``th = wh * log(gh / ph)`` (log size ratio, so growing and shrinking are symmetric).
    The ``weights`` rescale the four targets to comparable magnitudes (Fast R-CNN heads commonly use (10, 10, 5, 5)).
    Reference and target boxes must have positive width and height.
    """
    wx, wy, ww, wh = weights
    ref_x, ref_y, ref_w, ref_h = _centre_size(reference)
    gt_x, gt_y, gt_w, gt_h = _centre_size(target)
    deltas = (
        wx * (gt_x - ref_x) / ref_w,
        wy * (gt_y - ref_y) / ref_h,
        ww * torch.log(gt_w / ref_w),
        wh * torch.log(gt_h / ref_h),
    )
    return torch.stack(deltas, dim=1)


def decode_box_deltas(reference: torch.Tensor, deltas: torch.Tensor,
                      weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                      scale_clamp: float = DEFAULT_SCALE_CLAMP) -> torch.Tensor:
    """Apply deltas to reference boxes (inverse of :func:`encode_box_deltas`): ``(N, 4), (N, 4) -> (N, 4)`` xyxy.

    ``deltas`` may also be ``(N, 4 * K)`` - one delta per class, as class-specific regression heads predict - which
    gives ``(N, 4 * K)`` boxes. The log size ratios are clamped at ``scale_clamp`` before ``exp``.
    """
    wx, wy, ww, wh = weights
    ref_x, ref_y, ref_w, ref_h = (v[:, None] for v in _centre_size(reference.to(deltas.dtype)))   # (N, 1) each
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy                                          # (N, K) each
    dw = (deltas[:, 2::4] / ww).clamp(max=scale_clamp)
    dh = (deltas[:, 3::4] / wh).clamp(max=scale_clamp)
    centre_x, centre_y = ref_x + dx * ref_w, ref_y + dy * ref_h
    half_w, half_h = 0.5 * ref_w * torch.exp(dw), 0.5 * ref_h * torch.exp(dh)
    boxes = torch.stack((centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h), dim=2)
    return boxes.reshape(deltas.shape)                                                           # (N, K, 4) -> (N, 4K)


# --- matching -----------------------------------------------------------------------------------------------------

class Matcher:
    """Assign each proposal (or anchor) the ground-truth box it overlaps most, by IoU thresholds.

    For a proposal whose best IoU is ``v`` (over all ground-truth boxes):

    * ``v >= high``        -> positive: the index of that ground-truth box (inclusive at ``high``);
    * ``v < low``          -> :data:`NEGATIVE` (-1), background (exclusive at ``low``: ``v == low`` is not negative);
    * ``low <= v < high``  -> :data:`IGNORED` (-2). With ``low == high`` there is no ignored band.

    ``allow_low_quality`` adds Faster R-CNN's second rule: for every ground-truth box, the proposals with its highest
    IoU (ties included, IoU > 0) become positive for it even below ``high``, so that no object - an oddly shaped one
    no anchor fits well - is left without a positive example. Such a proposal already positive for another box keeps
    that match; one that is best for several boxes goes to the box it overlaps most.

    Fast R-CNN uses (high=0.5, low=0.1) for its RoI heads; Faster R-CNN's RPN (0.7, 0.3, allow_low_quality=True).
    """

    def __init__(self, high: float, low: float, allow_low_quality: bool = False):
        if not 0.0 <= low <= high <= 1.0:
            raise ConfigError(f"matcher thresholds need 0 <= low <= high <= 1 (got low={low}, high={high})")
        self.high, self.low, self.allow_low_quality = high, low, allow_low_quality

    def match(self, iou: torch.Tensor) -> torch.Tensor:
        """``iou`` (G ground truths, P proposals) -> ``(P,)`` long: gt index >= 0, -1 negative, -2 ignored."""
        num_gt, num_proposals = iou.shape
        if num_gt == 0:   # an image without objects: everything is background
            return torch.full((num_proposals,), NEGATIVE, dtype=torch.long, device=iou.device)
        if num_proposals == 0:
            return torch.empty((0,), dtype=torch.long, device=iou.device)

        best_iou, matches = iou.max(dim=0)                                   # (G, P) -> (P,), (P,)
        matches = matches.clone()
        matches[best_iou < self.high] = IGNORED
        matches[best_iou < self.low] = NEGATIVE
        if self.allow_low_quality:
            self._add_low_quality_matches(matches, iou)
        return matches

    @staticmethod
    def _add_low_quality_matches(matches: torch.Tensor, iou: torch.Tensor) -> None:
        best_per_gt = iou.max(dim=1, keepdim=True).values                    # (G, 1)
        is_best_for_gt = (iou == best_per_gt) & (best_per_gt > 0)            # (G, P)
        # Among the boxes a proposal is best for, keep the one it overlaps most; -1 where it is best for none.
        best_for_iou, best_for_gt = torch.where(is_best_for_gt, iou, iou.new_tensor(-1.0)).max(dim=0)   # (P,)
        promote = (best_for_iou >= 0) & (matches < 0)
        matches[promote] = best_for_gt[promote]


def broadcast_box_iou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """IoU of corresponding xyxy boxes, broadcasting: ``(..., 4), (..., 4) -> (...)``. ``box_iou`` pairs every box
    with every box of two flat lists; this pairs box ``i`` with box ``i`` (a prediction with its ground truth) and,
    with added axes, batches of lists (``(N, G, 1, 4), (1, 1, P, 4) -> (N, G, P)``). Degenerate boxes count as
    area 0, so a zero padding box has IoU 0 with everything."""
    width = (torch.min(first[..., 2], second[..., 2]) - torch.max(first[..., 0], second[..., 0])).clamp(min=0)
    height = (torch.min(first[..., 3], second[..., 3]) - torch.max(first[..., 1], second[..., 1])).clamp(min=0)
    intersection = width * height
    return intersection / (_area(first) + _area(second) - intersection).clamp(min=1e-9)


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_intersection_over_area(proposals: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Fraction of each proposal's area inside each region: ``(P, 4), (R, 4) -> (P, R)`` in [0, 1]."""
    top_left = torch.max(proposals[:, None, :2], regions[None, :, :2])                 # (P, R, 2)
    bottom_right = torch.min(proposals[:, None, 2:], regions[None, :, 2:])             # (P, R, 2)
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=2)                  # (P, R)
    return intersection / box_area(proposals).clamp(min=1e-6)[:, None]


def ignore_crowd_overlaps(matches: torch.Tensor, proposals: torch.Tensor, crowd_boxes: torch.Tensor,
                          threshold: float = 0.5, use_ioa: bool = True) -> torch.Tensor:
    """Turn negatives lying on a crowd region into :data:`IGNORED`: ``(P,) -> (P,)`` (a new tensor).

    A crowd box (COCO ``iscrowd=1``) covers many objects without separate boxes, so a proposal inside it may well
    frame one of them: calling it background would teach the detector to reject real objects. With ``use_ioa`` the
    test is the share of the proposal inside the crowd box (a small proposal deep inside a big crowd has low IoU but
    IoA 1); otherwise IoU. Overlap ``>= threshold`` counts. Positives are left alone.
    """
    matches = matches.clone()
    if len(crowd_boxes) == 0 or len(proposals) == 0:
        return matches
    overlap = box_intersection_over_area(proposals, crowd_boxes) if use_ioa else box_iou(proposals, crowd_boxes)
    on_crowd = overlap.max(dim=1).values >= threshold                                  # (P, R) -> (P,)
    matches[on_crowd & (matches == NEGATIVE)] = IGNORED
    return matches


class Targets(NamedTuple):
    """What :func:`assign_targets` gives each proposal."""

    labels: torch.Tensor    # (P,) long: class of the matched box, 0 background, -1 ignored
    boxes: torch.Tensor     # (P, 4): matched ground-truth box; the proposal itself where not positive (zero delta)
    matches: torch.Tensor   # (P,) long: Matcher output, indices into the *given* gt_boxes (crowd ones included)


def assign_targets(proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor | None,
                   matcher: Matcher, crowd: torch.Tensor | None = None, crowd_threshold: float = 0.5) -> Targets:
    """Classification and regression targets for one image's proposals (RoI heads) or anchors (RPN).

    ``gt_labels=None`` gives objectness targets (1 object, 0 background), as an RPN needs. Crowd boxes (``crowd``
    a ``(G,)`` bool mask) are never matched; proposals on them are ignored instead of negative. Non-positive rows of
    ``boxes`` hold the proposal itself, so encoding them gives zero deltas rather than ``log(0)``: an image without
    objects yields finite targets and zero box loss.
    """
    if gt_labels is None:
        gt_labels = torch.ones(len(gt_boxes), dtype=torch.long, device=proposals.device)
    if crowd is None:
        crowd = torch.zeros(len(gt_boxes), dtype=torch.bool, device=proposals.device)
    matchable = torch.nonzero(~crowd).squeeze(1)                                       # (G',) indices into gt
    matched = matcher.match(box_iou(gt_boxes[matchable], proposals))                   # (P,) indices into gt[matchable]
    matched = ignore_crowd_overlaps(matched, proposals, gt_boxes[crowd], crowd_threshold)

    positive = matched >= 0
    matches = matched.clone()
    matches[positive] = matchable[matched[positive]]                                   # back to indices into gt
    labels = torch.zeros(len(proposals), dtype=torch.long, device=proposals.device)
    labels[positive] = gt_labels[matches[positive]].long()
    labels[matches == IGNORED] = -1
    boxes = proposals.clone()
    boxes[positive] = gt_boxes[matches[positive]].to(boxes.dtype)
    return Targets(labels, boxes, matches)


# --- sampling -----------------------------------------------------------------------------------------------------

def _random_subset(indices: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    order = torch.randperm(len(indices), generator=generator)[:count].to(indices.device)
    return indices[order]


def sample_balanced(matches: torch.Tensor, batch_size: int, positive_fraction: float,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick at most ``batch_size`` proposals, at most ``positive_fraction`` of them positive: ``(P,) -> (pos, neg)``.

    ``matches`` is a :meth:`Matcher.match` vector (>= 0 positive, -1 negative, -2 ignored, never sampled). When an
    image has too few positives, negatives fill the batch; too few of both gives a smaller batch. Returns index
    tensors into ``matches``; ``generator`` (a CPU generator) makes the draw reproducible.
    """
    positives = torch.nonzero(matches >= 0).squeeze(1)
    negatives = torch.nonzero(matches == NEGATIVE).squeeze(1)
    num_positive = min(len(positives), int(batch_size * positive_fraction))
    num_negative = min(len(negatives), batch_size - num_positive)
    return _random_subset(positives, num_positive, generator), _random_subset(negatives, num_negative, generator)


# --- filtering ----------------------------------------------------------------------------------------------------

class Filtered(NamedTuple):
    """Survivors of :func:`clip_and_filter`, best score first; ``keep`` indexes the input (for any extra data)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor | None
    keep: torch.Tensor


def clip_and_filter(boxes: torch.Tensor, scores: torch.Tensor, image_size: tuple[int, int], min_size: float = 0.0,
                    score_thresh: float = 0.0, nms_thresh: float | None = 0.7, top_k: int | None = None,
                    labels: torch.Tensor | None = None) -> Filtered:
    """Turn raw scored boxes into proposals / detections: clip, drop tiny and low-scoring ones, NMS, keep the best.

    In order: clip to ``image_size`` (H, W); drop boxes with a side ``< min_size`` after clipping; drop scores
    ``< score_thresh`` (``> 0`` only: a threshold of 0 keeps everything); sort by score; non-maximum suppression at
    IoU ``nms_thresh`` (``None`` skips it), per class when ``labels`` are given (boxes of different classes never
    suppress each other); keep the ``top_k`` best. (A cap before NMS, like the RPN's ``rpn_pre_nms``, is the caller's:
    it selects the scores it passes in.)
    """
    boxes = clip_boxes_to_image(boxes, image_size)
    keep = remove_small_boxes(boxes, min_size) if min_size > 0 else torch.arange(len(boxes), device=boxes.device)
    if score_thresh > 0:
        keep = keep[scores[keep] >= score_thresh]
    if nms_thresh is None:
        keep = keep[scores[keep].argsort(descending=True)]
    else:   # NMS sorts by score itself; given the candidates in their own order, ties break as in torchvision
        if labels is None:
            survivors = nms(boxes[keep], scores[keep], nms_thresh)
        else:
            survivors = batched_nms(boxes[keep], scores[keep], labels[keep], nms_thresh)
        keep = keep[survivors]                                   # nms returns survivors sorted by score
    if top_k is not None:
        keep = keep[:top_k]
    return Filtered(boxes[keep], scores[keep], None if labels is None else labels[keep], keep)


# --- sliding windows ----------------------------------------------------------------------------------------------

def _window_starts(image_side: int, window_side: float, stride: float) -> torch.Tensor:
    """Start coordinates ``0, stride, 2*stride, ...`` of windows that fit inside ``image_side``."""
    if window_side > image_side + 1e-6:
        return torch.empty(0, dtype=torch.float64)
    count = math.floor((image_side - window_side) / stride + 1e-6) + 1
    return torch.arange(count, dtype=torch.float64) * stride


def sliding_windows(image_size: tuple[int, int], scales: Sequence[float], aspect_ratios: Sequence[float] = (1.0,),
                    stride_frac: float = 0.5) -> torch.Tensor:
    """Every window of every shape that fits in the image: ``(H, W) -> (num_windows, 4)`` xyxy float32.

    The brute-force detector of the lecture: classify a crop at every position and scale. Window shapes are
    :func:`~detseg.ops.anchors.anchor_shapes` (area ``scale**2``, ``aspect_ratio = height / width``); a window steps
    by ``stride_frac`` of its own width across and of its own height down, starting at the top-left corner, and
    only windows entirely inside the image are kept. Per shape that gives ``nx * ny`` windows with
    ``nx = floor((W - w) / (stride_frac * w)) + 1`` (0 if ``w > W``) and likewise ``ny``. Order: shape (as in
    ``anchor_shapes``), then row, then column.
    """
    height, width = image_size
    windows = []
    for shape in anchor_shapes(scales, aspect_ratios).double():
        window_w, window_h = float(shape[2] - shape[0]), float(shape[3] - shape[1])
        xs = _window_starts(width, window_w, stride_frac * window_w)
        ys = _window_starts(height, window_h, stride_frac * window_h)
        top, left = torch.meshgrid(ys, xs, indexing="ij")                                    # (ny, nx) each
        corners = torch.stack((left, top, left + window_w, top + window_h), dim=-1)         # (ny, nx, 4)
        windows.append(corners.reshape(-1, 4))
    return torch.cat(windows).float() if windows else torch.empty((0, 4))
