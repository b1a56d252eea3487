"""A region-based detector as a composition of stages: the skeleton every method of the R-CNN family fills in.

The lecture walks from R-CNN to Faster R-CNN by replacing one stage at a time, so the code does the same:

    images ─► [backbone: shared convolutional features, once per image]       (R-CNN and sliding window: none)
           ─► [proposer: boxes that may hold an object]                        (windows / Selective Search / RPN)
           ─► [RoI head: per-region class scores (K+1) and class-specific box deltas]
           ─► losses (training)  or  decoded, NMS-ed detections (inference)

=====================  ====================  ===========================  =====================================
method                 backbone              proposer                     RoI head
=====================  ====================  ===========================  =====================================
det/sliding_window     none                  every window, every scale    warp crop -> CNN (per region)
det/rcnn               none                  Selective Search             warp crop -> CNN (per region)
det/spp                tiny CNN, once        Selective Search             spatial pyramid pooling -> FC
det/fast_rcnn          tiny CNN, once        Selective Search             RoI pooling -> FC
det/faster_rcnn        tiny CNN, once        region proposal network      RoI pooling -> FC
det/rfcn               tiny CNN, once        region proposal network      position-sensitive score maps + vote
=====================  ====================  ===========================  =====================================

Stage contracts (all boxes ``(x1, y1, x2, y2)`` in input pixels):

* ``backbone(normalised images (N, 3, H, W)) -> features`` (a tensor, or an ordered dict of maps for FPN).
* ``proposer(images, features, image_size, targets, given) -> (list of (P_i, 4) proposals, dict of losses)``.
  ``images`` are the raw 0-255 pixels (Selective Search works on those), ``given`` is a list of precomputed
  proposals or ``None``. A learned proposer (the RPN) returns its own losses while training.
* ``roi_head(features_or_images, rois: list of (R_i, 4), image_size) -> (logits (R, K+1), deltas (R, 4 (K+1)))``,
  rows in image order. Heads without a backbone receive the normalised images themselves.

Everything else - which proposals train the head, the multi-task loss, turning scores and deltas into
detections - is the same for all six methods and lives here, once.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.boxes import Matcher, assign_targets, clip_and_filter, decode_box_deltas, encode_box_deltas, \
    sample_balanced
from ...tasks.dense import normalize

# Fast R-CNN's scaling of the four delta targets: centre shifts are small numbers, so they are blown up 10x (and
# log-size ratios 5x) to give the regression loss comparable magnitudes on all four.
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


@dataclass
class RoISampling:
    """Which proposals train the RoI head, per image (Fast R-CNN: 25% positives at IoU >= 0.5)."""

    batch_per_image: int = 128
    positive_fraction: float = 0.25
    positive_iou: float = 0.5       # IoU >= this with a ground-truth box: an example of that box's class
    negative_iou: float = 0.5       # IoU < this with every box: background; in between: ignored
    add_ground_truth: bool = True   # the true boxes are the best "proposals" early in training


@dataclass
class Postprocess:
    """How per-region scores become detections: COCO counts at most 100 per image."""

    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_image: int = 100
    min_size: float = 1.0


class BoxPredictor(nn.Module):
    """The last layer of a Fast R-CNN style head: a vector per region -> K+1 class scores and 4 (K+1) deltas.

    The deltas are class-specific: each class refines the proposal its own way (a person's box grows differently
    from a circle's), and only the ground-truth class's four numbers are trained for a positive region.
    """

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.classify = nn.Linear(in_features, num_classes)
        self.regress = nn.Linear(in_features, 4 * num_classes)
        nn.init.normal_(self.classify.weight, std=0.01)
        nn.init.normal_(self.regress.weight, std=0.001)
        nn.init.zeros_(self.classify.bias)
        nn.init.zeros_(self.regress.bias)

    def forward(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classify(vectors), self.regress(vectors)        # (R, D) -> (R, K+1), (R, 4 (K+1))


def fast_rcnn_loss(logits: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor,
                   delta_targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The multi-task loss of a region head: cross-entropy over K+1 classes + smooth L1 on the true class's deltas.

    ``logits`` (R, K+1), ``deltas`` (R, 4 (K+1)), ``labels`` (R,) with 0 = background, ``delta_targets`` (R, 4).
    The box loss is summed over positive regions and divided by *all* sampled regions (as Fast R-CNN does), so its
    weight relative to classification does not swing with the number of positives; no positive gives exactly 0.
    """
    if len(labels) == 0:     # every proposal ignored (e.g. all on a crowd region): nothing to learn, still a graph
        return {"roi_class": logits.sum() * 0.0, "roi_box": deltas.sum() * 0.0}
    classification = F.cross_entropy(logits, labels)
    positive = torch.nonzero(labels > 0).squeeze(1)
    chosen = deltas.view(len(deltas), deltas.shape[1] // 4, 4)[positive, labels[positive]]   # (R_pos, 4)
    box = F.smooth_l1_loss(chosen, delta_targets[positive], beta=1.0 / 9, reduction="sum") / max(1, len(labels))
    return {"roi_class": classification, "roi_box": box}


class RegionDetector(nn.Module):
    """Backbone (optional) + proposer + RoI head, trained with the Fast R-CNN multi-task loss.

    ``forward(images, targets=None, proposals=None)``: ``images`` (N, 3, H, W) 0-255 pixels; ``targets`` a list of
    dicts with ``boxes`` (G, 4), ``labels`` (G,) in 1..K and optionally ``iscrowd`` (G,); ``proposals`` an optional
    list of precomputed boxes per image (Selective Search from the data set's cache). With targets it returns the
    named losses, without them a list of ``{"boxes" (D, 4), "scores" (D,), "labels" (D,)}`` per image.

    ``time_stages = True`` makes every call add its seconds to ``stage_seconds`` under ``shared_conv``, ``proposals``
    and ``per_region``: the split of the lecture's speed table.
    """

    def __init__(self, num_classes: int, proposer: nn.Module, roi_head: nn.Module, backbone: nn.Module | None = None,
                 sampling: RoISampling | None = None, postprocess: Postprocess | None = None,
                 loss_weights: dict[str, float] | None = None):
        super().__init__()
        self.num_classes = num_classes        # K + 1, background included
        self.backbone, self.proposer, self.roi_head = backbone, proposer, roi_head
        self.sampling = sampling or RoISampling()
        self.postprocess = postprocess or Postprocess()
        self.loss_weights = dict(loss_weights or {})
        self.matcher = Matcher(self.sampling.positive_iou, self.sampling.negative_iou)
        self.time_stages = False
        self.stage_seconds = {"shared_conv": 0.0, "proposals": 0.0, "per_region": 0.0}

    @contextmanager
    def _stage(self, name: str):
        if not self.time_stages:
            yield
            return
        start = time.perf_counter()
        yield
        self.stage_seconds[name] += time.perf_counter() - start

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None,
                proposals: list[torch.Tensor] | None = None):
        image_size = tuple(images.shape[-2:])
        pixels = normalize(images)                   # the dense tasks' fixed statistics
        with self._stage("shared_conv"):
            features = self.backbone(pixels) if self.backbone is not None else pixels
            head_input = self.roi_head.per_image(features) if hasattr(self.roi_head, "per_image") else features
        with self._stage("proposals"):
            proposals, proposal_losses = self.proposer(images, features, image_size, targets, proposals)
        if targets is not None:
            rois, labels, delta_targets = self.sample_rois(proposals, targets)
            logits, deltas = self.roi_head(head_input, rois, image_size)
            losses = {**proposal_losses, **fast_rcnn_loss(logits, deltas, labels, delta_targets)}
            return {name: value * self.loss_weights.get(name, 1.0) for name, value in losses.items()}
        with self._stage("per_region"):
            logits, deltas = self.roi_head(head_input, proposals, image_size)
            return self.detections(logits, deltas, proposals, image_size)

    @torch.no_grad()
    def sample_rois(self, proposals: list[torch.Tensor], targets: list[dict]):
        """Per image: match proposals to ground truth, sample a balanced mini-batch, encode its box targets.

        Returns the sampled RoIs per image, their labels (R,) and delta targets (R, 4), rows in image order.
        """
        rois, labels, delta_targets = [], [], []
        for image_proposals, target in zip(proposals, targets):
            gt_boxes = target["boxes"].to(image_proposals)
            crowd = target.get("iscrowd")
            crowd = crowd.bool().to(image_proposals.device) if crowd is not None else None
            if self.sampling.add_ground_truth and len(gt_boxes):
                keep = ~crowd if crowd is not None else slice(None)
                image_proposals = torch.cat([image_proposals, gt_boxes[keep]])
            assigned = assign_targets(image_proposals, gt_boxes, target["labels"].to(image_proposals.device),
                                      self.matcher, crowd)
            positives, negatives = sample_balanced(assigned.matches, self.sampling.batch_per_image,
                                                   self.sampling.positive_fraction)
            chosen = torch.cat([positives, negatives])
            rois.append(image_proposals[chosen])
            labels.append(assigned.labels[chosen])
            delta_targets.append(encode_box_deltas(image_proposals[chosen], assigned.boxes[chosen], ROI_BOX_WEIGHTS))
        return rois, torch.cat(labels), torch.cat(delta_targets)

    def detections(self, logits: torch.Tensor, deltas: torch.Tensor, proposals: list[torch.Tensor],
                   image_size: tuple[int, int]) -> list[dict]:
        """Scores and deltas of every proposal -> per class boxes -> threshold, NMS per class, best 100."""
        settings, num_classes = self.postprocess, self.num_classes
        probabilities = F.softmax(logits, dim=1)                                             # (R, K+1)
        results = []
        for image_proposals, image_probabilities, image_deltas in zip(
                proposals, probabilities.split([len(p) for p in proposals]), deltas.split([len(p) for p in proposals])):
            boxes = decode_box_deltas(image_proposals, image_deltas, ROI_BOX_WEIGHTS)         # (P, 4 (K+1))
            boxes = boxes.view(-1, num_classes, 4)[:, 1:].reshape(-1, 4)                     # drop background
            scores = image_probabilities[:, 1:].reshape(-1)                                  # (P * K,)
            labels = torch.arange(1, num_classes, device=logits.device).repeat(len(image_proposals))
            kept = clip_and_filter(boxes, scores, image_size, min_size=settings.min_size,
                                   score_thresh=settings.score_thresh, nms_thresh=settings.nms_thresh,
                                   top_k=settings.detections_per_image, labels=labels)
            results.append({"boxes": kept.boxes, "scores": kept.scores, "labels": kept.labels})
        return results


class GivenProposals(nn.Module):
    """A proposer for boxes computed outside the network (Selective Search): use the given ones, else compute.

    ``compute(images) -> list of (P_i, 4)`` runs when a batch arrives without proposals (new images at prediction
    time); data sets precompute and cache them, so training epochs never pay for them again.
    """

    def __init__(self, compute, max_proposals: int | None = None):
        super().__init__()
        self.compute, self.max_proposals = compute, max_proposals

    def forward(self, images, features, image_size, targets, given):
        if given is None:
            given = self.compute(images)
        device = images.device
        proposals = [torch.as_tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4)[:self.max_proposals]
                     for boxes in given]
        return proposals, {}
