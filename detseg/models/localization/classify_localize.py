"""Classification + localization: one object per image, its class and its box, from one network.

The lecture treats localization as regression: one backbone feeds two heads, K class scores (softmax loss) and 4
box numbers (an L2, L1 or smooth-L1 loss against the true box). The class head reads globally averaged features
(what an object is does not depend on where it is); the box head reads a fully-connected vector of features pooled
on a coarse grid, which still knows where the evidence lies. Training minimises the weighted
sum ``cls + box_weight * box`` - a multi-task loss whose weight is a hyperparameter that changes the loss itself, so
runs with different weights are compared by their metrics (top-1, box IoU, loc accuracy), never by the loss.

The box head is either class-agnostic (one box) or per class (K boxes, R-CNN style): then only the ground-truth
class's box is trained, and at test time the predicted class's box is reported.

Boxes are normalised ``(cx, cy, w, h)`` in [0, 1], relative to the image width and height (a sigmoid output), so
the same numbers serve any image size; :func:`boxes_to_pixels` converts them to pixel ``(x1, y1, x2, y2)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes

from ...config import Option
from ...errors import ConfigError
from ...losses import REGRESSION_KINDS, box_regression_loss
from .. import build_with_options, check_knobs, defaults_of
from ..backbones import FEATURE_OPTIONS, FeatureVector
from ..base import DetsegModel, Images, ImageTransform, stack_targets

BOX_HEADS = ("agnostic", "per_class")

OPTIONS: dict[str, Option] = {
    **FEATURE_OPTIONS,
    "box_head": Option("agnostic", "one class-agnostic box, or one box per class (loss on the true class's box): "
                                   "agnostic|per_class", choices=BOX_HEADS),
    "box_loss": Option("smooth_l1", "box regression loss: l2|l1|smooth_l1", choices=REGRESSION_KINDS),
    "box_weight": Option(5.0, "weight of the box loss in cls + box_weight * box", min=0.0),
    "beta": Option(0.05, "smooth_l1: error (in image fractions) below which the loss is quadratic", min=1e-6),
    "freeze_epochs": Option(0, "epochs training only the heads on a frozen backbone before joint fine-tuning", min=0),
}
DEFAULTS = defaults_of(OPTIONS)


class ClassifyLocalize(DetsegModel):
    """One object per image: its class and its box.

    Training mode: ``model(images, targets)`` with ``targets[i] = {"labels": (1,) class index in [0, K),
    "boxes": (1, 4) xyxy pixels}`` -> ``{"cls", "box"}`` (the box loss already times ``box_weight``). Eval mode:
    ``model(images)`` -> per image ``{"labels": (1,), "scores": (1,) softmax probability, "boxes": (1, 4) xyxy}`` in
    that image's pixels. :meth:`outputs` is the bare network: normalised (N, 3, S, S) -> ``{"logits": (N, K),
    "boxes": (N, 4) or (N, K, 4)}``, boxes normalised cx, cy, w, h.

    ``num_classes`` K counts object classes only (7 for the scenes): every image holds exactly one object.
    """

    def __init__(self, num_classes: int = 7, backbone: str = "tiny", width: int = 16, depth: int = 4,
                 stem_stride: int = 2, grid: int = 4, hidden: int = 256, box_head: str = "agnostic",
                 box_loss: str = "smooth_l1", box_weight: float = 5.0, beta: float = 0.05, freeze_epochs: int = 0,
                 image_size: int = 128):
        super().__init__()
        self.transform = ImageTransform(image_size)
        knobs = check_knobs(OPTIONS, backbone=backbone, width=width, depth=depth, stem_stride=stem_stride,
                            grid=grid, hidden=hidden, box_head=box_head, box_loss=box_loss, box_weight=box_weight,
                            beta=beta, freeze_epochs=freeze_epochs)
        if num_classes < 1:
            raise ConfigError(f"num_classes={num_classes}: need at least one object class")
        self.num_classes = num_classes
        self.per_class_boxes = knobs["box_head"] == "per_class"
        self.box_loss, self.box_weight, self.beta = knobs["box_loss"], knobs["box_weight"], knobs["beta"]
        self.freeze_epochs = knobs["freeze_epochs"]      # read by the training schedule, not by forward

        self.features = FeatureVector(knobs["backbone"], knobs["width"], knobs["depth"], knobs["stem_stride"],
                                      knobs["grid"], knobs["hidden"])
        # Classes from globally averaged features: the same weights serve every position, so "what" need not be
        # learned separately for every place the object can be.
        self.class_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                        nn.Linear(self.features.backbone.out_channels, num_classes))
        self.box_head = nn.Linear(self.features.out_features, 4 * (num_classes if self.per_class_boxes else 1))

    @classmethod
    def build(cls, num_classes: int, image_size: int = 128, **knobs) -> "ClassifyLocalize":
        return build_with_options(cls, OPTIONS, num_classes, knobs, image_size=image_size)

    def freeze_backbone(self, flag: bool = True) -> None:
        """Stop (``True``) or resume (``False``) training the convolutional backbone; heads always train."""
        self.features.freeze_backbone(flag)

    def outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feature_map = self.features.backbone(images)                     # (N, 3, H, W) -> (N, C, h, w)
        vector = self.features.pooled(feature_map)                       # (N, C, h, w) -> (N, hidden)
        boxes = torch.sigmoid(self.box_head(vector))                     # (N, 4) or (N, 4K), in [0, 1]
        if self.per_class_boxes:
            boxes = boxes.view(-1, self.num_classes, 4)                  # (N, 4K) -> (N, K, 4)
        return {"logits": self.class_head(feature_map), "boxes": boxes}  # logits (N, K)

    def training_losses(self, images: Images, targets: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.transform.batch(images)
        targets = self.transform.targets_to_input(targets, batch)
        height, width = batch.input_size
        labels = torch.cat([target["labels"] for target in targets])                        # (N,)
        boxes = boxes_to_normalized(stack_targets(targets, "boxes")[:, 0].float(), height, width)  # (N, 4)
        return self.loss(self.outputs(batch.normalized), labels, boxes)

    def inference(self, images: Images) -> list[dict]:
        batch = self.transform.batch(images)
        outputs = self.outputs(batch.normalized)
        scores, labels = outputs["logits"].softmax(dim=1).max(dim=1)
        boxes = boxes_to_pixels(self.box_of_class(outputs["boxes"], labels), *batch.input_size)   # (N, 4) input px
        return [{"labels": labels[i:i + 1], "scores": scores[i:i + 1],
                 "boxes": self.transform.boxes_to_original(boxes[i:i + 1], batch.original_sizes[i])}
                for i in range(len(labels))]

    def loss(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor,
             boxes_gt: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"cls": cross-entropy, "box": box_weight * box loss}``; their sum is the training loss.

        ``labels`` (N,) class indices in [0, K); ``boxes_gt`` (N, 4) normalised (cx, cy, w, h).
        """
        boxes = self.box_of_class(outputs["boxes"], labels)   # per-class head: only the true class's box is trained
        return {
            "cls": F.cross_entropy(outputs["logits"], labels),
            "box": self.box_weight * box_regression_loss(boxes, boxes_gt, self.box_loss, self.beta),
        }

    def box_of_class(self, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, K, 4) -> (N, 4): each image's box for class ``labels[n]``; agnostic boxes (N, 4) pass through."""
        if boxes.dim() == 2:
            return boxes
        return boxes[torch.arange(len(labels), device=boxes.device), labels]



def boxes_to_pixels(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised (cx, cy, w, h) -> pixel (x1, y1, x2, y2): (..., 4) -> (..., 4)."""
    scale = boxes.new_tensor([width, height, width, height])
    return box_convert(boxes * scale, in_fmt="cxcywh", out_fmt="xyxy")


def boxes_to_normalized(boxes_xyxy: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel (x1, y1, x2, y2) -> normalised (cx, cy, w, h), the regression target: (..., 4) -> (..., 4)."""
    scale = boxes_xyxy.new_tensor([width, height, width, height])
    return box_convert(boxes_xyxy, in_fmt="xyxy", out_fmt="cxcywh") / scale


def draw_localization(image: torch.Tensor, box_xyxy: torch.Tensor, caption: str,
                      gt_box_xyxy: torch.Tensor | None = None, colors: Sequence[str] = ("yellow", "lime")
                      ) -> torch.Tensor:
    """Image (3, H, W) uint8 with the predicted box (and caption) drawn, and the true box if given."""
    boxes, labels, box_colors = [box_xyxy], [caption], [colors[0]]
    if gt_box_xyxy is not None:
        boxes.append(gt_box_xyxy)
        labels.append("")
        box_colors.append(colors[1])
    return draw_bounding_boxes(image, torch.stack(boxes).float(), labels=labels, colors=box_colors, width=1)
