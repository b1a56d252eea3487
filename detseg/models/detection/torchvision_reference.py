"""torchvision's own Faster R-CNN on our backbone: the reference our detectors are measured against.

``det/faster_rcnn`` builds Faster R-CNN from this package's stages. To know whether those stages cost or gain
anything, the benchmarks also train ``torchvision.models.detection.FasterRCNN`` - the implementation most people
would reach for - with everything that is not the detector's design held equal: the same tiny backbone, the same
input size (torchvision's transform neither shrinks nor grows a scenes image), the same normalisation statistics and
the same anchors (sizes and aspect ratios, one feature map). Everything else - the RPN's 2000 training proposals,
512 sampled RoIs per image, the 1024-wide two-layer box head, the loss normalisations - is torchvision's default,
as a user would get it.

The wrapper, :class:`TorchvisionDetector`, only adapts the calling conventions, and is shared with every other
torchvision reference (``det/torchvision_ssd``): our detectors take uint8 or [0, 1] float images and read crowd
flags and precomputed proposals from the targets; torchvision takes [0, 1] float images, knows no crowd regions and
computes losses in train mode only, so :meth:`TorchvisionDetector.training_losses` in eval mode returns ``{}``
(the engine then reports a NaN validation loss). torchvision's own ``GeneralizedRCNNTransform`` is this model's
preprocessing stage.
"""
from __future__ import annotations

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from ...config import Option, number_list
from ..base import SCENES_MEAN, SCENES_STD, DetsegModel, as_float_image
from .backbone import BACKBONE_OPTIONS, FPN_RPN_LEVELS, build_detection_backbone, fpn_levels
from .faster_rcnn import TRAINING as FASTER_RCNN_TRAINING
from .rpn import RPN_OPTIONS, fpn_anchor_levels

# The anchors are the one part of the RPN set to ours (torchvision's default sizes 32-512 suit 800 px images, not
# 128 px scenes); the other RPN knobs are deliberately left at torchvision's defaults.
OPTIONS = {**BACKBONE_OPTIONS, **{key: RPN_OPTIONS[key] for key in ("anchor_scales", "anchor_ratios")},
           # torchvision's own test-time defaults, as knobs so that `detseg predict --conf / --max-det` reach them
           "score_thresh": Option(0.05, "detections below this class probability are dropped (box_score_thresh)",
                                  min=0, max=1),
           "detections_per_image": Option(100, "detections kept per image (box_detections_per_img)", min=1)}
# The same optimiser settings as det/faster_rcnn, so that a benchmark's difference is the implementation's.
TRAINING = dict(FASTER_RCNN_TRAINING)


def _anchor_generator(config: dict) -> AnchorGenerator:
    """torchvision's anchors with our sizes and ratios: one feature map, or one size per FPN level."""
    scales = number_list("anchor_scales", config["anchor_scales"])
    ratios = number_list("anchor_ratios", config["anchor_ratios"])
    levels = fpn_levels(config)
    if levels is None:
        return AnchorGenerator((scales,), (ratios,))
    # torchvision's BackboneWithFPN returns the four levels plus a pooled one ("pool"): five maps, one size each.
    sizes = fpn_anchor_levels(scales, len(FPN_RPN_LEVELS))
    return AnchorGenerator(tuple(sizes), (ratios,) * len(sizes))


class TorchvisionDetector(DetsegModel):
    """A ``torchvision.models.detection`` detector (FasterRCNN, SSD, ...) behind the model contract of this
    package's detectors.

    Training mode: ``model(images, targets)`` -> torchvision's named losses (``proposals`` in the targets are
    ignored: torchvision's detectors make their own). Eval mode: ``model(images)`` -> per image
    ``{"boxes", "scores", "labels"}`` in that image's pixels.
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    @staticmethod
    def _torchvision_targets(targets: list[dict]) -> list[dict]:
        """Only what torchvision reads. It has no notion of crowd regions - it would train them as objects - so they
        are dropped, as torchvision's own COCO recipe does; so are boxes without area, which it rejects."""
        converted = []
        for target in targets:
            boxes = target["boxes"].float()
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            crowd = target.get("iscrowd")
            if crowd is not None:
                keep &= ~crowd.bool().to(keep.device)
            converted.append({"boxes": boxes[keep], "labels": target["labels"][keep]})
        return converted

    def training_losses(self, images, targets: list[dict]) -> dict:
        if not self.training:
            return {}                                                  # torchvision computes losses in train mode only
        return self.detector([as_float_image(image) for image in images], self._torchvision_targets(targets))

    def inference(self, images) -> list[dict]:
        return self.detector([as_float_image(image) for image in images])


TorchvisionFasterRCNN = TorchvisionDetector      # the name this wrapper had when Faster R-CNN was its only user


def build(config: dict, info: dict) -> TorchvisionDetector:
    """torchvision's FasterRCNN with our backbone, input size, normalisation and anchors; its defaults elsewhere."""
    backbone = build_detection_backbone(config)          # has ``out_channels``, which FasterRCNN requires
    levels = fpn_levels(config)
    side = info["image_size"]
    # Square scenes: torchvision's resize to min_size = max_size = the side is the identity. With min_size > 0 the
    # reference resizes as our aspect-preserving detectors do (torchvision's own convention).
    min_size = config.get("min_size", 0) or side
    max_size = config.get("max_size", 0) or (side if not config.get("min_size", 0) else 100 * min_size)
    detector = FasterRCNN(
        backbone, num_classes=info["num_classes"], min_size=min_size, max_size=max_size,
        box_score_thresh=config.get("score_thresh", 0.05),
        box_detections_per_img=config.get("detections_per_image", 100),
        image_mean=list(SCENES_MEAN), image_std=list(SCENES_STD),
        rpn_anchor_generator=_anchor_generator(config),
        box_roi_pool=MultiScaleRoIAlign(list(levels or ["0"]), output_size=7, sampling_ratio=2),
    )
    return TorchvisionDetector(detector)

