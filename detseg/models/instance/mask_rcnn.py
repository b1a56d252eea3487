"""Mask R-CNN (He et al., 2017): Faster R-CNN plus a mask per region and, for people, a heat map per joint.

The lecture ends here, with the model that "unifies everything we talked about today into one jointly end-to-end
trainable model". Nothing of :mod:`detseg.models.detection.faster_rcnn` changes - the backbone, the region proposal
network, the box head and its post-processing are the same objects - and two branches are added on the same RoI
features (:mod:`.heads`):

    images -> backbone -> RPN -> proposals -> RoIAlign -> box head -> classes + box deltas -> NMS -> detections
                                                  |-----> mask head (per-class 28 x 28 masks)      (detections)
                                                  '-----> keypoint head (56 x 56 map per joint)    (people)

Training samples RoIs exactly as Faster R-CNN does; the mask head learns from the positive RoIs (their ground-truth
object's mask cut out at the RoI), the keypoint head from the positive RoIs of the class with joints. The loss is
the sum of six named terms - RPN objectness and box, RoI class and box, mask, keypoint - each with its weight. At
test time the box branch runs first, and the two new heads run on its post-NMS detections only (at most 100 per
image, not the hundreds of proposals), as in the paper.

RoIAlign matters more here than for boxes: a box tolerates the half-cell shifts of RoIPool's rounding, a 28 x 28
mask of a 20 px object does not. ``pool=roi_pool`` builds the same model with quantised pooling in every head, for
``detseg bench roialign``.
"""
from __future__ import annotations

import torch

from ...config import Option, number_list
from ..base import Images
from ..detection import faster_rcnn
from ..detection.backbone import build_detection_backbone, fpn_levels
from ..detection.fast_rcnn import build_roi_pool_head
from ..detection.generalized import RegionDetector, detector_transform
from ..detection.heads import roi_head_settings
from ..detection.rpn import build_rpn
from .heads import KeypointHead, MaskHead, decode_keypoints, keypoint_loss, mask_loss, mask_targets, paste_masks

INSTANCE_OPTIONS = {
    "masks": Option(True, "a mask head: one 28 x 28 mask per detection"),
    "keypoints": Option(True, "a keypoint head for the category with joints (people), when the data has joints"),
    "mask_channels": Option("32,32", "mask head: channels of its 3 x 3 convolutions, one entry per layer "
                                     "(He et al.: 256,256,256,256)"),
    "mask_pixels": Option(True, "mask head: a last 3 x 3 convolution that also reads the region's pixels at the "
                                 "mask's resolution (a hypercolumn down to the image; thin parts such as limbs)",
                          before=False),
    "mask_pool_size": Option(14, "mask head: RoIAlign grid; the masks are twice this size", min=2, max=64),
    "keypoint_channels": Option("64,64,64,64", "keypoint head: channels of its 3 x 3 convolutions, one entry per "
                                               "layer (He et al.: eight of 512)"),
    "keypoint_pool_size": Option(14, "keypoint head: RoIAlign grid; the heat maps are four times this size",
                                 min=2, max=64),
    "class_loss_weight": Option(1.0, "weight of the RoI classification loss", min=0),
    "mask_loss_weight": Option(1.0, "weight of the mask loss (per-pixel binary cross-entropy)", min=0),
    "keypoint_loss_weight": Option(1.0, "weight of the keypoint loss (cross-entropy over heat-map positions)",
                                   min=0),
    "mask_thresh": Option(0.5, "a pasted mask's pixel belongs to the object at this probability", min=0, max=1),
}
OPTIONS = {**faster_rcnn.OPTIONS, **INSTANCE_OPTIONS}
TRAINING = dict(faster_rcnn.TRAINING)


def channel_list(key: str, text) -> tuple[int, ...]:
    return tuple(int(width) for width in number_list(key, text))


class MaskRCNN(RegionDetector):
    """Faster R-CNN's stages + ``mask_head`` and ``keypoint_head`` (either may be None).

    Targets (training) add ``masks`` (G, H, W) and, for the keypoint head, ``keypoints`` (G, J, 3) to Faster R-CNN's.
    Eval mode returns per image Faster R-CNN's ``boxes``, ``scores``, ``labels`` plus ``masks`` (D, H, W) bool in the
    image's own pixels and ``keypoints`` (D, J, 3) as (x, y, score) - rows of other classes than
    ``keypoint_class`` are zero.
    """

    def __init__(self, *args, mask_head: MaskHead | None = None, keypoint_head: KeypointHead | None = None,
                 keypoint_class: int = 0, mask_thresh: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_head, self.keypoint_head = mask_head, keypoint_head
        self.keypoint_class, self.mask_thresh = keypoint_class, mask_thresh

    def region_losses(self, features, batch, targets, rois, labels, matches) -> dict[str, torch.Tensor]:
        """The mask and keypoint losses, on the positive RoIs of every image and the object each one matched."""
        positive_rois, positive_labels, positive_objects = [], [], []
        for image_rois, image_labels, image_matches in zip(rois, labels.split([len(r) for r in rois]), matches):
            positive = image_labels > 0
            positive_rois.append(image_rois[positive])
            positive_labels.append(image_labels[positive])
            positive_objects.append(image_matches[positive])
        losses = {}
        if self.mask_head is not None:
            losses["mask"] = self._mask_loss(features, batch, targets, positive_rois, positive_labels,
                                             positive_objects)
        if self.keypoint_head is not None:
            losses["keypoint"] = self._keypoint_loss(features, batch.input_size, targets, positive_rois,
                                                     positive_labels, positive_objects)
        return losses

    def _mask_loss(self, features, batch, targets, rois, labels, objects) -> torch.Tensor:
        mask_logits = self.mask_head(features, rois, batch.input_size, batch.normalized)     # (P, K+1, M, M)
        size = mask_logits.shape[-1]
        wanted = torch.cat([mask_targets(target["masks"], image_rois, image_objects, size)
                            for target, image_rois, image_objects in zip(targets, rois, objects)])
        return mask_loss(mask_logits, torch.cat(labels), wanted)

    def _keypoint_loss(self, features, input_size, targets, rois, labels, objects) -> torch.Tensor:
        people = [image_labels == self.keypoint_class for image_labels in labels]
        person_rois = [image_rois[keep] for image_rois, keep in zip(rois, people)]
        joints = torch.cat([target["keypoints"][image_objects[keep]].to(image_rois)
                            for target, image_rois, image_objects, keep in zip(targets, rois, objects, people)])
        heatmaps = self.keypoint_head(features, person_rois, input_size)                     # (P, J, S, S)
        return keypoint_loss(heatmaps, joints, torch.cat(person_rois))

    def region_outputs(self, features, batch, detections: list[dict]) -> None:
        """28 x 28 mask probabilities of each detection's class (pasted by :meth:`inference`) and the joints of
        each detection of the keypoint class, in input pixels."""
        boxes, input_size = [found["boxes"] for found in detections], batch.input_size
        if self.mask_head is not None:
            mask_logits = self.mask_head(features, boxes, input_size, batch.normalized)      # (D, K+1, M, M)
            chosen = torch.cat([found["labels"] for found in detections])
            probabilities = mask_logits[torch.arange(len(chosen), device=chosen.device), chosen].sigmoid()
            for found, image_probabilities in zip(detections, probabilities.split([len(b) for b in boxes])):
                found["_mask_probabilities"] = image_probabilities                           # (D_i, M, M)
        if self.keypoint_head is not None:
            people = [found["labels"] == self.keypoint_class for found in detections]
            person_boxes = [image_boxes[keep] for image_boxes, keep in zip(boxes, people)]
            for found in detections:
                found["keypoints"] = found["boxes"].new_zeros((len(found["boxes"]), self.keypoint_head.num_keypoints,
                                                               3))
            if sum(len(b) for b in person_boxes):
                heatmaps = self.keypoint_head(features, person_boxes, input_size)            # (P, J, S, S)
                joints = decode_keypoints(heatmaps, torch.cat(person_boxes))                # (P, J, 3)
                for found, keep, image_joints in zip(detections, people, joints.split([len(b) for b in person_boxes])):
                    found["keypoints"][keep] = image_joints

    def inference(self, images: Images) -> list[dict]:
        detections = super().inference(images)
        # Masks are pasted at each image's own resolution, at the boxes in its pixels (finer than pasting at the
        # network's input size and resizing the binary masks).
        for image, found in zip(images, detections):
            if "_mask_probabilities" in found:
                found["masks"] = paste_masks(found.pop("_mask_probabilities"), found["boxes"],
                                             tuple(image.shape[-2:]), self.mask_thresh)
        return detections


def build(config: dict, info: dict) -> MaskRCNN:
    """Faster R-CNN's stages from the same knobs, plus the mask and keypoint heads."""
    num_classes = info["num_classes"]
    backbone = build_detection_backbone(config)
    sampling, postprocess, weights = roi_head_settings(config)
    weights.update(roi_class=config["class_loss_weight"], mask=config["mask_loss_weight"],
                   keypoint=config["keypoint_loss_weight"])
    roi_head = build_roi_pool_head(config, backbone, num_classes)
    # The new heads read what the box head reads: the narrowed map (roi_channels) or the pyramid.
    channels = config["roi_channels"] if roi_head.narrow is not None else backbone.out_channels
    levels = fpn_levels(config)
    mask_head = None
    if config["masks"]:
        mask_head = MaskHead(channels, num_classes, channel_list("mask_channels", config["mask_channels"]),
                             config["mask_pool_size"], config["pool"], levels, pixels=config["mask_pixels"])
    num_keypoints = int(info.get("num_keypoints", 0))
    keypoint_head = None
    if config["keypoints"] and num_keypoints and info.get("keypoint_class"):
        keypoint_head = KeypointHead(channels, num_keypoints,
                                     channel_list("keypoint_channels", config["keypoint_channels"]),
                                     config["keypoint_pool_size"], config["pool"], levels)
    return MaskRCNN(num_classes, build_rpn(config, backbone.out_channels), roi_head, backbone, sampling, postprocess,
                    weights, transform=detector_transform(config, info), mask_head=mask_head,
                    keypoint_head=keypoint_head, keypoint_class=int(info.get("keypoint_class") or 0),
                    mask_thresh=config["mask_thresh"])
