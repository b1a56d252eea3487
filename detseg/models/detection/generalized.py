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

* ``transform``: the preprocessing stage every model has (:class:`~detseg.models.base.ImageTransform`): images
  of any size -> a normalised ``image_size`` square batch; detections are mapped back to each image's pixels.
* ``backbone(normalised images (N, 3, H, W)) -> features`` (a tensor, or an ordered dict of maps for FPN).
* ``proposer(pixels, features, image_size, targets) -> (list of (P_i, 4) proposals, dict of losses)``.
  ``pixels`` are the resized 0-255 images (Selective Search works on those); ``targets`` (training) may carry
  precomputed ``proposals`` per image. A learned proposer (the RPN) returns its own losses when given targets.
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
from ..base import Batch, DetsegModel, Images, ImageTransform

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


def detector_transform(config: dict, info: dict, size_divisible: int = 32) -> ImageTransform:
    """A detector's preprocessing from its run config: square ``image_size`` (the scenes' and the lecture's setup),
    or aspect-preserving when ``min_size > 0`` (short side ``min_size``, long side at most ``max_size``, the batch
    padded to multiples of ``size_divisible``, the largest stride of the network)."""
    return ImageTransform(info["image_size"], min_size=config.get("min_size", 0), max_size=config.get("max_size", 0),
                          size_divisible=size_divisible, resize=config.get("resize", "detseg"))


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


class RegionDetector(DetsegModel):
    """Preprocessing + backbone (optional) + proposer + RoI head, trained with the Fast R-CNN multi-task loss.

    The model contract (:mod:`detseg.models`): ``images`` a list of (3, H_i, W_i) uint8 / [0, 1] float images or an
    (N, 3, H, W) batch. Training mode: ``model(images, targets)`` with ``targets`` a list of dicts with ``boxes``
    (G, 4) XYXY pixels, ``labels`` (G,) in 1..K, optionally ``iscrowd`` (G,) and ``proposals`` (P, 4) precomputed
    boxes (Selective Search from the data set's cache) -> the named losses. Eval mode: ``model(images)`` -> per image
    ``{"boxes" (D, 4), "scores" (D,), "labels" (D,)}`` in that image's pixels.

    ``time_stages = True`` makes every call add its seconds to ``stage_seconds`` under ``shared_conv``, ``proposals``
    and ``per_region``: the split of the lecture's speed table.
    """

    def __init__(self, num_classes: int, proposer: nn.Module, roi_head: nn.Module, backbone: nn.Module | None = None,
                 sampling: RoISampling | None = None, postprocess: Postprocess | None = None,
                 loss_weights: dict[str, float] | None = None, image_size: int = 128,
                 transform: ImageTransform | None = None):
        super().__init__()
        self.num_classes = num_classes        # K + 1, background included
        self.transform = transform or ImageTransform(image_size)
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

    @contextmanager
    def without_caches(self):
        compute = getattr(self.proposer, "compute", None)
        if not hasattr(compute, "without_cache"):
            yield
            return
        with compute.without_cache():
            yield

    def _propose(self, images: Images, targets: list[dict] | None):
        """The stages every call shares: preprocess, shared features, proposals."""
        batch = self.transform.batch(images)
        if targets is not None:
            targets = self.transform.targets_to_input(targets, batch)
        image_size = batch.input_size
        with self._stage("shared_conv"):
            features = self.backbone(batch.normalized) if self.backbone is not None else batch.normalized
            head_input = self.roi_head.per_image(features) if hasattr(self.roi_head, "per_image") else features
        with self._stage("proposals"):
            sizes = {"image_sizes": batch.image_sizes} if getattr(self.proposer, "takes_image_sizes", False) else {}
            proposals, proposal_losses = self.proposer(batch.pixels * 255.0, features, image_size, targets, **sizes)
        return batch, targets, head_input, proposals, proposal_losses

    def training_losses(self, images: Images, targets: list[dict]) -> dict[str, torch.Tensor]:
        batch, targets, head_input, proposals, proposal_losses = self._propose(images, targets)
        rois, labels, delta_targets, matches = self.sample_rois(proposals, targets, with_matches=True)
        logits, deltas = self.roi_head(head_input, rois, batch.input_size)
        losses = {**proposal_losses, **fast_rcnn_loss(logits, deltas, labels, delta_targets),
                  **self.region_losses(head_input, batch, targets, rois, labels, matches)}
        return {name: value * self.loss_weights.get(name, 1.0) for name, value in losses.items()}

    def region_losses(self, features, batch: Batch, targets: list[dict], rois: list[torch.Tensor],
                      labels: torch.Tensor, matches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses of heads that run beside the box head on the same sampled RoIs (Mask R-CNN's masks and joints):
        ``batch`` the preprocessed input (its ``input_size``, the ``normalized`` images), ``labels`` (R,) as the box
        head's, ``matches`` per image the ground-truth index of each RoI. None here."""
        return {}

    def region_outputs(self, features, batch: Batch, detections: list[dict]) -> None:
        """Per-detection outputs of heads behind the box head, added to ``detections`` (boxes still in input
        pixels; a ``keypoints`` entry is mapped back to the image with the boxes). Nothing here."""

    def inference(self, images: Images) -> list[dict]:
        batch, _, head_input, proposals, _ = self._propose(images, None)
        with self._stage("per_region"):
            logits, deltas = self.roi_head(head_input, proposals, batch.input_size)
            detections = self.detections(logits, deltas, proposals, batch.image_sizes)
            self.region_outputs(head_input, batch, detections)
        for index, found in enumerate(detections):
            if batch.resized(index):
                original, resized = batch.original_sizes[index], batch.image_sizes[index]
                found["boxes"] = self.transform.boxes_to_original(found["boxes"], original, resized)
                if "keypoints" in found:
                    found["keypoints"] = self.transform.keypoints_to_original(found["keypoints"], original, resized)
        return detections

    @torch.no_grad()
    def sample_rois(self, proposals: list[torch.Tensor], targets: list[dict], with_matches: bool = False):
        """Per image: match proposals to ground truth, sample a balanced mini-batch, encode its box targets.

        Returns the sampled RoIs per image, their labels (R,) and delta targets (R, 4), rows in image order; with
        ``with_matches`` also, per image, the index of each sampled RoI's ground-truth object (negative for
        background), which heads with per-object targets (Mask R-CNN's masks and joints) need.
        """
        rois, labels, delta_targets, matches = [], [], [], []
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
            matches.append(assigned.matches[chosen])
            delta_targets.append(encode_box_deltas(image_proposals[chosen], assigned.boxes[chosen], ROI_BOX_WEIGHTS))
        if with_matches:
            return rois, torch.cat(labels), torch.cat(delta_targets), matches
        return rois, torch.cat(labels), torch.cat(delta_targets)

    def detections(self, logits: torch.Tensor, deltas: torch.Tensor, proposals: list[torch.Tensor],
                   image_sizes: list[tuple[int, int]]) -> list[dict]:
        """Scores and deltas of every proposal -> per class boxes -> threshold, NMS per class, best 100; boxes are
        clipped to each image's own (resized, unpadded) size."""
        settings, num_classes = self.postprocess, self.num_classes
        probabilities = F.softmax(logits, dim=1)                                             # (R, K+1)
        results = []
        for image_proposals, image_probabilities, image_deltas, image_size in zip(
                proposals, probabilities.split([len(p) for p in proposals]), deltas.split([len(p) for p in proposals]),
                image_sizes):
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
    """A proposer for boxes computed outside the network (Selective Search): the targets' ``proposals``, else compute.

    ``compute(pixels) -> list of (P_i, 4)`` runs on every batch without precomputed proposals - every prediction;
    training data sets precompute and cache them, so training epochs never pay for them again.
    """

    def __init__(self, compute, max_proposals: int | None = None):
        super().__init__()
        self.compute, self.max_proposals = compute, max_proposals

    def forward(self, images, features, image_size, targets):
        given = [target["proposals"] for target in targets] \
            if targets is not None and all("proposals" in target for target in targets) else None
        if given is None:
            given = self.compute(images)
        device = images.device
        proposals = [torch.as_tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4)[:self.max_proposals]
                     for boxes in given]
        return proposals, {}
