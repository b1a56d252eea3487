"""Single-shot detection: the skeleton YOLO and SSD share - no proposals, no per-region network.

The lecture's second family treats detection "like a regression problem". Instead of proposing regions and running
a head on each, one convolutional network looks at the image once and, at every cell of a coarse grid, predicts
for a fixed set of reference boxes (YOLO's base boxes, SSD's default boxes) an offset, a confidence and class
scores. The whole output is one tensor; what is left after it is decoding and non-maximum suppression:

    images ─► [transform] ─► [backbone] ─► [dense head: one tensor of predictions per image]
           ─► loss against targets encoded on the grid (training)  or  decode ─► per-class NMS (inference)

=============  ==========================================  ===================================================
method         reference boxes                              loss
=============  ==========================================  ===================================================
det/yolo       B base boxes per cell of one S x S grid      squared errors (YOLO v1), confidence target = IoU
det/ssd        default boxes on several feature maps        cross-entropy with hard negatives + smooth L1
=============  ==========================================  ===================================================

A method fills in three things: the ``head`` (features -> raw outputs), ``losses(outputs, targets, image_size)``
and ``decode(outputs, image_size) -> (boxes (N, P, 4), class scores (N, P, K - 1))``, the score of every
foreground class of every predictor, in input pixels. Thresholding, per-class NMS, the cap of detections per image
and mapping boxes back to each image's pixels are the same for both and live here, once.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ...config import Option
from ...data.transforms import AUGMENT_OPTIONS
from ...ops.boxes import clip_and_filter
from ..base import DetsegModel, Images, ImageTransform
from .generalized import Postprocess

# A single-shot detector sees every image many times in a budget - about 40 passes over the 3,000 scenes in 600 s,
# against Faster R-CNN's 11 - and without geometric augmentation it learns them by heart: after 600 s det/yolo's
# training loss was 0.54 against a validation loss of 8.1 (det/ssd: 0.34 against 3.4), and twice the throughput
# bought no AP. Both papers train with it: YOLO scales and shifts images by up to 20%, SSD crops and zooms out.
# Here: a zoom drawn from 0.75..1.25 with a random crop or placement back to the input size (on top of the flips).
SINGLE_SHOT_AUGMENTATION = {"scale_jitter": replace(AUGMENT_OPTIONS["scale_jitter"], default="0.75,1.25")}
SINGLE_SHOT_OPTIONS = {
    "score_thresh": Option(0.05, "detections below this score are dropped", min=0, max=1),
    "nms_thresh": Option(0.5, "per-class non-maximum suppression IoU", min=0, max=1),
    "pre_nms": Option(400, "best-scoring (box, class) candidates per image kept before NMS", min=1),
    "detections_per_image": Option(100, "detections kept per image after NMS (COCO counts 100)", min=1),
    **SINGLE_SHOT_AUGMENTATION,
}


@dataclass
class SingleShotPostprocess(Postprocess):
    """The region-based detectors' post-processing (threshold, per-class NMS, best 100) with a cap before NMS: a
    dense head scores every (predictor, class) pair, and only the best ``pre_nms`` above the threshold reach NMS."""

    pre_nms: int = 400

    @classmethod
    def from_config(cls, config: dict) -> "SingleShotPostprocess":
        return cls(score_thresh=config["score_thresh"], nms_thresh=config["nms_thresh"],
                   detections_per_image=config["detections_per_image"], pre_nms=config["pre_nms"])


class SingleShotDetector(DetsegModel):
    """Preprocessing + backbone + dense head; subclasses give the losses and the decoding (see the module docstring).

    The model contract (:mod:`detseg.models`): training mode ``model(images, targets)`` with ``targets`` dicts of
    ``boxes`` (G, 4) XYXY pixels, ``labels`` (G,) in 1..K and optionally ``iscrowd`` -> named losses; eval mode
    ``model(images)`` -> per image ``{"boxes" (D, 4), "scores" (D,), "labels" (D,)}`` in that image's pixels.
    """

    def __init__(self, num_classes: int, backbone: nn.Module, head: nn.Module,
                 postprocess: SingleShotPostprocess | None = None, image_size: int = 128,
                 transform: ImageTransform | None = None, channels_last: bool = False):
        super().__init__()
        self.num_classes = num_classes          # K + 1 as every detector counts them; there is no background output
        self.transform = transform or ImageTransform(image_size)
        self.backbone, self.head = backbone, head
        self.postprocess = postprocess or SingleShotPostprocess()
        # Channels-last weights and activations (shapes unchanged): the layout CPU convolution kernels work in, which
        # spares a layout conversion around every layer - the whole network is convolutions here. False leaves the
        # modules' layout as given.
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
            self.head.to(memory_format=torch.channels_last)

    def outputs(self, images: Images, targets: list[dict] | None = None):
        """The one forward pass: preprocessing, backbone, head -> (batch, targets in input pixels, head outputs)."""
        batch = self.transform.batch(images)
        if targets is not None:
            targets = [without_crowds(target) for target in self.transform.targets_to_input(targets, batch)]
        inputs = batch.normalized
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return batch, targets, self.head(self.backbone(inputs))

    def training_losses(self, images: Images, targets: list[dict]) -> dict[str, torch.Tensor]:
        batch, targets, outputs = self.outputs(images, targets)
        return self.losses(outputs, targets, batch.input_size)

    def inference(self, images: Images) -> list[dict]:
        batch, _, outputs = self.outputs(images)
        boxes, scores = self.decode(outputs, batch.input_size)           # (N, P, 4), (N, P, K - 1)
        detections = []
        for index, (image_boxes, image_scores) in enumerate(zip(boxes, scores)):
            found = self.select(image_boxes, image_scores, batch.image_sizes[index])
            if batch.resized(index):
                found["boxes"] = self.transform.boxes_to_original(found["boxes"], batch.original_sizes[index],
                                                                  batch.image_sizes[index])
            detections.append(found)
        return detections

    def select(self, boxes: torch.Tensor, scores: torch.Tensor, image_size: tuple[int, int]) -> dict:
        """One image: ``(P, 4)`` boxes and ``(P, K - 1)`` class scores -> the detections of the contract.

        Every (predictor, class) pair is a candidate; only the best ``pre_nms`` above the threshold reach NMS, so
        the cost does not grow with the thousands of near-zero scores a dense head produces.
        """
        settings = self.postprocess
        flat = scores.flatten()                                          # (P * (K - 1),), predictor-major
        candidates = torch.nonzero(flat >= settings.score_thresh).squeeze(1)
        if len(candidates) > settings.pre_nms:
            candidates = candidates[flat[candidates].topk(settings.pre_nms).indices]
        predictor = torch.div(candidates, scores.shape[1], rounding_mode="floor")
        labels = candidates % scores.shape[1] + 1                        # class 0 is background in every detector
        kept = clip_and_filter(boxes[predictor], flat[candidates], image_size, min_size=settings.min_size,
                               nms_thresh=settings.nms_thresh, top_k=settings.detections_per_image, labels=labels)
        return {"boxes": kept.boxes, "scores": kept.scores, "labels": kept.labels}

    # ---- what a method fills in -----------------------------------------------------------------------------------
    def losses(self, outputs, targets: list[dict], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, outputs, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def without_crowds(target: dict) -> dict:
    """The boxes a single-shot loss trains on: crowd regions (COCO ``iscrowd=1``) and boxes without area dropped.

    A crowd box covers many objects with one outline; neither an object nor background, it is left out (its
    predictors count as background, a small error that YOLO and SSD make too)."""
    boxes, labels = target["boxes"].float(), target["labels"]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    crowd = target.get("iscrowd")
    if crowd is not None:
        keep &= ~crowd.bool().to(keep.device)
    return {**target, "boxes": boxes[keep], "labels": labels[keep]}
