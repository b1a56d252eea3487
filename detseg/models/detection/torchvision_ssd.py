"""torchvision's own SSD on det/ssd's feature maps: the reference det/ssd is measured against.

Like ``det/torchvision_faster_rcnn`` for Faster R-CNN, this trains ``torchvision.models.detection.SSD`` - what most
people would reach for - with everything that is not the implementation held equal: the same multi-level feature
extractor (:class:`~detseg.models.detection.ssd.MultiScaleFeatures`: the tiny backbone plus the extra stride-2
blocks, returning the ordered dict of maps torchvision's SSD expects), the same input size, the same normalisation
statistics, the same optimiser settings, and default boxes as close to det/ssd's as torchvision's
``DefaultBoxGenerator`` can express. Everything else is torchvision's default, as a user gets it: its ``SSDHead``
(separate class and box convolutions per level, Xavier initialisation), its matcher and loss (IoU 0.5 plus each
object's best box, 3:1 hard negatives, no negatives for an image without objects, offsets weighted (10, 10, 5, 5)
as det/ssd's), its postprocessing (score 0.01, NMS 0.45, 400 candidates per class, 200 detections per image; COCO
scores the best 100), its ``GeneralizedRCNNTransform`` as the preprocessing stage, and PyTorch's default memory
layout (det/ssd runs the same feature extractor channels-last; ``channels_last=true`` gives torchvision that too).

The default boxes. torchvision's generator has, at level ``k`` (sizes relative to the image), a square box of
``s_k``, a square box of ``sqrt(s_k s_k+1)`` and, for every ratio ``r`` it is given, the two boxes of ratio ``r``
and ``1 / r``. det/ssd has the in-between square box too and one box of ``s_k`` per ratio in ``box_ratios``. So
with ratios that include 1 and come in reciprocal pairs - the default ``1,2,0.5`` - the two sets are the same boxes
(in another order within a cell: torchvision's head and ours each read their own order): same sizes, same ratios,
same cell-centred positions (``steps`` left to torchvision, which then takes the stride as image / map size, as
det/ssd does), and unclipped (``clip=False``; torchvision clips the boxes' sizes to the image by default, which
would shrink det/ssd's largest boxes, 158 px long at ratio 2 on the last map). Ratios without their reciprocal
(``1,3``) get it added here, and a ratio list without 1 still gets torchvision's square ``s_k`` box: those settings
give torchvision more default boxes than det/ssd.
"""
from __future__ import annotations

from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

from ...config import Option
from ..base import SCENES_MEAN, SCENES_STD
from .ssd import DEFAULT_BOX_OPTIONS, FEATURE_OPTIONS, TRAINING as SSD_TRAINING, build_features, \
    default_box_settings
from .single_shot import SINGLE_SHOT_AUGMENTATION
from .torchvision_reference import TorchvisionDetector

OPTIONS = {
    **FEATURE_OPTIONS, **DEFAULT_BOX_OPTIONS,
    **SINGLE_SHOT_AUGMENTATION,      # the same training data as det/ssd
    # A user of torchvision gets the default (N, C, H, W) layout; det/ssd's choice of channels-last is its own.
    "channels_last": Option(False, "run the convolutions on channels-last tensors (det/ssd's default)"),
    # torchvision's own test-time defaults, as knobs so that `detseg predict --conf / --max-det` reach them
    "score_thresh": Option(0.01, "detections below this score are dropped (torchvision SSD's default)", min=0, max=1),
    "detections_per_image": Option(200, "detections kept per image (torchvision SSD's default)", min=1),
}
# The same optimiser settings as det/ssd, so that a benchmark's difference is the implementation's.
TRAINING = dict(SSD_TRAINING)


def torchvision_ratios(ratios: tuple[float, ...]) -> list[float]:
    """det/ssd's ratios of one level as torchvision's generator takes them: each ``r`` stands for ``r`` and
    ``1 / r``, and ratio 1 is always there, so only one of each reciprocal pair (the one >= 1) is given."""
    kept = []
    for ratio in ratios:
        ratio = max(ratio, 1.0 / ratio)
        if abs(ratio - 1.0) > 1e-6 and all(abs(ratio - seen) > 1e-6 for seen in kept):
            kept.append(ratio)
    return kept


def default_box_generator(config: dict, image_size: int) -> DefaultBoxGenerator:
    """torchvision's default boxes set to det/ssd's sizes (as fractions of the image) and ratios, unclipped."""
    sizes, ratios = default_box_settings(config)
    return DefaultBoxGenerator([torchvision_ratios(level) for level in ratios],
                               scales=[size / image_size for size in sizes], clip=False)


def build(config: dict, info: dict) -> TorchvisionDetector:
    """torchvision's SSD on det/ssd's feature maps, input size, normalisation and default boxes."""
    side = info["image_size"]
    detector = SSD(build_features(config), default_box_generator(config, side), (side, side), info["num_classes"],
                   image_mean=list(SCENES_MEAN), image_std=list(SCENES_STD),
                   score_thresh=config.get("score_thresh", 0.01),
                   detections_per_img=config.get("detections_per_image", 200))
    return TorchvisionDetector(detector)
