"""YOLO (Redmon et al., 2016): "You Only Look Once" - detection as one regression over a grid.

The lecture's single-shot detector. Divide the image into an ``S x S`` grid; within each cell imagine ``B`` *base
boxes* of fixed shapes (tall, wide, square, small, large) centred on the cell. For each base box the network
regresses four numbers that move and resize it and a confidence that an object sits there; for each cell it
predicts a score per class. The whole image is one forward pass, so the output is one tensor::

    (N, S, S, 5B + C)      per cell: B x (t_x, t_y, t_w, t_h, confidence), then C class scores (YOLO v1)
    (N, S, S, 5B + BC)     per_box_classes: the same 5B numbers, then one C-vector per base box, box-major
                           (channels 5B + b C ... 5B + (b + 1) C are base box b's) - YOLO v2's layout of classes

where ``S = image size / backbone stride`` (128 px scenes, tiny backbone at stride 8: ``S = 16``) and ``C = K``,
the foreground classes: there is no background class, the confidence says "object or not".

Decoding a base box ``(p_w, p_h)`` of cell ``(cell_x, cell_y)`` of a stride-``s`` grid (YOLO v2's parametrisation)::

    x = (cell_x + sigmoid(t_x)) s      y = (cell_y + sigmoid(t_y)) s      the centre cannot leave its cell
    w = p_w exp(t_w)                   h = p_h exp(t_h)                    t_w, t_h clamped before exp

The test-time score of class ``c`` is ``confidence x P(c | object)``, with a softmax over the K classes; every
(predictor, class) pair then goes through the per-class NMS of :mod:`.single_shot`.

**Training** (YOLO v1's sum of squared errors). Each ground-truth box is owned by one predictor, the
*responsible* one: the cell that holds the box's centre, and in it the base box whose *shape* fits it best (IoU
of the two shapes centred together, ``responsible=shape``, v2's anchor rule) or whose *predicted* box overlaps
the ground truth most (``responsible=predicted``, v1: the predictors specialise as training goes). Then, summed
over the batch and divided by the batch size::

    lambda_coord  sum_resp (x_off - x_off')^2 + (y_off - y_off')^2 + (sqrt w - sqrt w')^2 + (sqrt h - sqrt h')^2
  +               sum_resp (conf - IoU(predicted box, ground truth))^2        the IoU detached: a target
  + lambda_noobj  sum_other conf^2                                            every predictor owning no object
  +               sum_cells with an object  class error

Offsets are in cell units, sizes in units of the image side, so all four coordinates are in [0, 1]; the square
roots make a 2 px error count more on a small box than on a large one. ``lambda_coord = 5`` and
``lambda_noobj = 0.5`` are the paper's: most predictors see no object, and without the down-weighting their
"confidence 0" would push every confidence to zero. The class error is v1's squared error on the probabilities
(``class_loss=mse``) or cross-entropy on the logits (``class_loss=ce``). An image without objects has only the
no-object term. Targets for the whole batch are encoded at once, with no loop over objects.

Two objects in one cell: ground truths are placed largest first, each taking the best still-free base box of its
cell, so every object gets its own predictor while the cell has free ones (a cell's ``B + 1``-th object is not
trained on). With per-cell classes (v1) the cell's one class vector learns the largest object's class - the v1
limitation that ``per_box_classes`` lifts. Under the predicted-box rule the shape fit breaks ties (early in
training, when no prediction of the cell overlaps the object at all).

Initialisation: the confidence biases start at ``logit(0.05)`` - with ~1500 predictors per image and a handful
of objects, starting at 0.5 would make the first steps nothing but the no-object term. Class logits start at 0.

**Defaults, measured** on the 128 px scenes (3,000 training images, 2 epochs = 750 steps each, one thread, AP on
the 300 validation images; one run each, so differences of ~0.02 are noise):

=====================================================  ======  =====
variant                                                AP      AP50
=====================================================  ======  =====
responsible=predicted, class_loss=ce, lr 2e-3          0.058   0.127
responsible=predicted, class_loss=mse, lr 2e-3         0.040   0.094
responsible=shape, class_loss=ce, lr 2e-3              0.137   0.256
responsible=shape, class_loss=mse, lr 2e-3             0.101   0.196
responsible=shape, per_box_classes, lr 2e-3            0.054   0.101
responsible=shape, base boxes of a 6-means of the      0.076   0.158
  scenes' box sizes (12x11 ... 67x70), lr 2e-3
responsible=predicted, class_loss=ce, lr 1e-3          0.102   0.201
responsible=shape, class_loss=ce, lr 5e-4              0.013   0.020   (confidences still below 0.05)
responsible=shape, class_loss=ce, lr 1e-3 (2 seeds)    0.182   0.310   (0.163 / 0.283 with seed 1)
  + score_thresh 0.01 (the default)                    0.197   0.350
  + noobj_ignore_iou=0.6                               0.191   0.341
=====================================================  ======  =====

The shape rule trains much faster: which predictor owns an object is fixed from the first step, while the
predicted-box rule reshuffles owners as long as predictions are poor. Cross-entropy beats the squared error on
probabilities, whose gradient vanishes once a softmax saturates on the wrong class. With these defaults,
``detseg train det/yolo --time-budget 600 threads=1`` reached AP 0.497 and 0.500, AP50 0.762 and 0.758 in two runs
(13-16 epochs at 65-75 images/s, other work sharing the CPU; ``det/faster_rcnn`` is quoted at AP 0.45 after 600 s),
at 3.5-5.0 ms per image at test time (Faster R-CNN timed alongside on the same thread: ~10.8 ms).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Option
from ...errors import ConfigError
from ...ops.boxes import broadcast_box_iou
from ..backbones import conv_bn_relu
from ..base import ImageTransform
from .backbone import BACKBONE_OPTIONS, build_detection_backbone, uses_fpn
from .generalized import detector_transform
from .single_shot import SINGLE_SHOT_OPTIONS, SingleShotDetector, SingleShotPostprocess

YOLO_OPTIONS = {
    "base_boxes": Option("12x12,20x20,32x32,24x48,48x24,60x60",
                         "base boxes per cell, WxH in input pixels, comma-separated (B = how many)"),
    "per_box_classes": Option(False, "one class vector per base box (v2) instead of one per cell (v1)"),
    "responsible": Option("shape", "which base box of the centre's cell owns an object: the one whose shape "
                                   "fits it best (v2) or whose prediction overlaps it most (v1)",
                          choices=("predicted", "shape")),
    "class_loss": Option("ce", "class term: mse on probabilities (v1) or cross-entropy on logits",
                         choices=("mse", "ce")),
    "lambda_coord": Option(5.0, "weight of the box-coordinate errors", min=0),
    "lambda_noobj": Option(0.5, "weight of the confidence error of predictors that own no object", min=0),
    "noobj_ignore_iou": Option(1.0, "predictors whose box overlaps an object by more than this IoU are left out "
                                     "of the no-object term (YOLO v2 uses 0.6; 1 = never, v1)", min=0, max=1),
    "head_channels": Option(128, "channels of the head's 3x3 convolution", min=1, max=4096),
    "channels_last": Option(True, "run the convolutions on channels-last tensors (oneDNN's own layout: faster on "
                                  "CPUs, the same numbers up to rounding)"),
}
# The score is confidence x class probability, and the confidence learns the IoU, not 1: YOLO's scores run lower
# than a softmax's, and the single-shot default of 0.05 drops correct detections (AP 0.182 -> 0.197, AR100 0.39 ->
# 0.49 for the same 2-epoch checkpoint at 0.01).
OPTIONS = {**BACKBONE_OPTIONS, **YOLO_OPTIONS, **SINGLE_SHOT_OPTIONS,
           "score_thresh": Option(0.01, "detections scoring below this (confidence x class probability) are dropped",
                                  min=0, max=1)}
TRAINING = {
    "lr": Option(1e-3, "peak learning rate", min=0),
    "batch_size": Option(8, "images per step", min=1),
    "epochs": Option(20, "passes over the training set", min=0),
}

# log-size ratios are clamped to +-log(1000 / 16) before exp, as in box delta decoding: one wild prediction early in
# training must not give an infinite box (and a NaN loss).
SIZE_CLAMP = math.log(1000.0 / 16)
CONFIDENCE_PRIOR = 0.05
VALUES_PER_BOX = 5                         # t_x, t_y, t_w, t_h, confidence


def parse_base_boxes(text: str) -> torch.Tensor:
    """``"12x12,24x48"`` -> ``(B, 2)`` (width, height) in pixels; a ConfigError naming the knob when malformed."""
    shapes = []
    for item in str(text).split(","):
        width, sep, height = item.strip().lower().partition("x")
        try:
            shape = (float(width), float(height))
        except ValueError:
            shape = None
        if not sep or shape is None or not all(math.isfinite(v) and v > 0 for v in shape):
            raise ConfigError(f"base_boxes={text}: expected comma-separated WxH sizes in pixels, e.g. 16x16,24x48")
        shapes.append(shape)
    return torch.tensor(shapes, dtype=torch.float32)


class YoloHead(nn.Module):
    """A 3x3 conv-BN-ReLU and a 1x1 convolution to the output channels: ``(N, C_in, S, S) -> (N, S, S, 5B + C')``."""

    def __init__(self, in_channels: int, hidden: int, num_base_boxes: int, class_channels: int):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, hidden)
        self.predict = nn.Conv2d(hidden, VALUES_PER_BOX * num_base_boxes + class_channels, 1)
        nn.init.normal_(self.predict.weight, std=0.01)
        nn.init.zeros_(self.predict.bias)
        with torch.no_grad():
            confidence = self.predict.bias[:VALUES_PER_BOX * num_base_boxes].view(num_base_boxes, VALUES_PER_BOX)
            confidence[:, 4] = math.log(CONFIDENCE_PRIOR / (1 - CONFIDENCE_PRIOR))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.predict(self.conv(features)).permute(0, 2, 3, 1)          # channels last: the lecture's S x S x D


class GridTargets(NamedTuple):
    """The ground truth on the grid, one row per object that got a predictor (``G'`` rows)."""

    image: torch.Tensor        # (G',) which image, row, column and base box is responsible
    row: torch.Tensor
    col: torch.Tensor
    base: torch.Tensor
    boxes: torch.Tensor        # (G', 4) the ground-truth box, xyxy input pixels
    offsets: torch.Tensor      # (G', 2) centre within its cell, in cell units, [0, 1)
    sqrt_sizes: torch.Tensor   # (G', 2) sqrt of width / image width, sqrt of height / image height
    classes: torch.Tensor      # (G',) class index 0..K-1 (label - 1)
    owns_cell: torch.Tensor    # (G',) bool: the largest object of its cell, whose class the cell vector learns


def centred_shape_iou(sizes: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
    """IoU of boxes put on a common centre: ``(G, 2), (B, 2) -> (G, B)`` - how well each shape fits each size."""
    inter = torch.min(sizes[:, None, 0], shapes[None, :, 0]) * torch.min(sizes[:, None, 1], shapes[None, :, 1])
    return inter / (sizes.prod(1)[:, None] + shapes.prod(1)[None] - inter)


def best_overlap(predicted: torch.Tensor, targets: list[dict]) -> torch.Tensor:
    """Each predicted box's highest IoU with its image's ground truth: ``(N, ..., 4) -> (N, ...)`` (0 without any)."""
    most = max(1, max(len(t["boxes"]) for t in targets))
    padded = predicted.new_zeros(len(targets), most, 4)           # zero-size boxes overlap nothing
    for index, target in enumerate(targets):
        padded[index, :len(target["boxes"])] = target["boxes"].to(padded)
    flat = predicted.reshape(len(targets), -1, 1, 4)
    overlap = broadcast_box_iou(flat, padded[:, None]).amax(dim=2)                # (N, P, G_max) -> (N, P)
    return overlap.reshape(predicted.shape[:-1])


def assign_base_boxes(cell: torch.Tensor, priority: torch.Tensor, preference: torch.Tensor,
                      num_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each object a base box of its cell, in order of ``priority`` (higher first), the best free one by
    ``preference`` ``(G, B)``. Returns the base box per object (``-1``: its cell had none left) and whether it was
    its cell's first (highest-priority) object.

    Exactly the greedy one-at-a-time assignment, but batched: every round, each cell's best unplaced object
    chooses, so the rounds number the most objects any one cell holds (one or two), not the objects.
    """
    count, num_base = preference.shape
    rank = torch.empty_like(cell)
    rank[torch.argsort(priority, descending=True, stable=True)] = torch.arange(count, device=cell.device)
    taken = torch.zeros(num_cells, num_base, dtype=torch.bool, device=cell.device)
    base = torch.full_like(cell, -1)
    pending = torch.ones(count, dtype=torch.bool, device=cell.device)
    first = None
    while bool(pending.any()):
        best = torch.full((num_cells,), count, dtype=rank.dtype, device=cell.device)
        best = best.scatter_reduce(0, cell[pending], rank[pending], reduce="amin")
        winners = torch.nonzero(pending & (rank == best[cell])).squeeze(1)           # one object per cell
        choice = preference[winners].masked_fill(taken[cell[winners]], -math.inf).argmax(1)
        base[winners] = choice
        taken[cell[winners], choice] = True
        if first is None:
            first = torch.zeros_like(pending).index_fill_(0, winners, True)
        pending.index_fill_(0, winners, False)
        pending &= ~taken[cell].all(1)                                                # cells with no box left
    return base, first if first is not None else torch.zeros_like(pending)


class Yolo(SingleShotDetector):
    """Backbone -> one ``S x S`` grid of ``B`` base boxes -> offsets, confidences and class scores (see module)."""

    def __init__(self, num_classes: int, backbone: nn.Module, base_boxes: torch.Tensor, head_channels: int = 128,
                 per_box_classes: bool = False, responsible: str = "shape", class_loss: str = "ce",
                 lambda_coord: float = 5.0, lambda_noobj: float = 0.5, noobj_ignore_iou: float = 1.0,
                 postprocess: SingleShotPostprocess | None = None, image_size: int = 128,
                 transform: ImageTransform | None = None, channels_last: bool = False):
        num_base = len(base_boxes)
        self.num_foreground = num_classes - 1
        class_channels = self.num_foreground * (num_base if per_box_classes else 1)
        super().__init__(num_classes, backbone, YoloHead(backbone.out_channels, head_channels, num_base,
                                                         class_channels), postprocess, image_size, transform,
                         channels_last)
        self.register_buffer("base_boxes", base_boxes.float().reshape(-1, 2))      # (B, 2) width, height in pixels
        self.per_box_classes, self.responsible, self.class_loss = per_box_classes, responsible, class_loss
        self.lambda_coord, self.lambda_noobj, self.noobj_ignore_iou = lambda_coord, lambda_noobj, noobj_ignore_iou

    # ---- the output tensor ------------------------------------------------------------------------------------
    def split(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, S, S, 5B + C')`` -> box values ``(N, S, S, B, 5)`` and class logits ``(N, S, S, C)`` (per cell)
        or ``(N, S, S, B, C)`` (``per_box_classes``)."""
        batch, rows, cols, _ = outputs.shape
        num_base = len(self.base_boxes)
        boxes = outputs[..., :VALUES_PER_BOX * num_base].reshape(batch, rows, cols, num_base, VALUES_PER_BOX)
        classes = outputs[..., VALUES_PER_BOX * num_base:]
        if self.per_box_classes:
            classes = classes.reshape(batch, rows, cols, num_base, self.num_foreground)
        return boxes, classes

    def grid_boxes(self, box_values: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """``(N, S_h, S_w, B, 5)`` raw values -> predicted boxes ``(N, S_h, S_w, B, 4)`` xyxy in input pixels."""
        _, rows, cols, _, _ = box_values.shape
        stride_y, stride_x = image_size[0] / rows, image_size[1] / cols
        col = torch.arange(cols, dtype=box_values.dtype, device=box_values.device).view(1, 1, cols, 1)
        row = torch.arange(rows, dtype=box_values.dtype, device=box_values.device).view(1, rows, 1, 1)
        centre_x = (col + torch.sigmoid(box_values[..., 0])) * stride_x
        centre_y = (row + torch.sigmoid(box_values[..., 1])) * stride_y
        sizes = self.base_boxes * torch.exp(box_values[..., 2:4].clamp(-SIZE_CLAMP, SIZE_CLAMP))   # (N, S, S, B, 2)
        half_w, half_h = 0.5 * sizes[..., 0], 0.5 * sizes[..., 1]
        return torch.stack((centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h), dim=-1)

    def decode(self, outputs: torch.Tensor, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes ``(N, S S B, 4)`` and scores ``confidence x P(class | object)`` ``(N, S S B, K)``, order (y, x, b)."""
        box_values, class_logits = self.split(outputs)
        boxes = self.grid_boxes(box_values, image_size)
        probabilities = class_logits.softmax(dim=-1)
        if not self.per_box_classes:
            probabilities = probabilities.unsqueeze(3)                               # (N, S, S, 1, K): shared
        scores = torch.sigmoid(box_values[..., 4:5]) * probabilities                 # (N, S, S, B, K)
        batch = outputs.shape[0]
        return boxes.reshape(batch, -1, 4), scores.reshape(batch, -1, self.num_foreground)

    # ---- training ---------------------------------------------------------------------------------------------
    def encode_targets(self, targets: list[dict], predicted: torch.Tensor,
                       image_size: tuple[int, int]) -> GridTargets:
        """Ground truth of the whole batch on the grid at once; ``predicted`` are the (detached) predicted boxes
        ``(N, S_h, S_w, B, 4)``, which the ``responsible=predicted`` rule ranks base boxes by."""
        batch, rows, cols, num_base, _ = predicted.shape
        device = predicted.device
        boxes = torch.cat([t["boxes"].to(device, torch.float32).reshape(-1, 4) for t in targets])    # (G, 4)
        labels = torch.cat([t["labels"].to(device).reshape(-1) for t in targets])
        image = torch.cat([torch.full((len(t["boxes"]),), i, dtype=torch.long, device=device)
                           for i, t in enumerate(targets)])
        height, width = image_size
        stride_y, stride_x = height / rows, width / cols
        sizes = boxes[:, 2:] - boxes[:, :2]                                                          # (G, 2)
        centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        col = (centre_x / stride_x).floor().long().clamp(0, cols - 1)
        row = (centre_y / stride_y).floor().long().clamp(0, rows - 1)

        preference = centred_shape_iou(sizes, self.base_boxes)                                        # (G, B)
        if self.responsible == "predicted":
            overlap = broadcast_box_iou(predicted[image, row, col], boxes[:, None])                      # (G, B)
            preference = overlap + 1e-3 * preference          # shape only breaks ties (no overlap at all)
        cell = (image * rows + row) * cols + col
        base, first = assign_base_boxes(cell, sizes.prod(1), preference, batch * rows * cols)

        placed = base >= 0
        image, row, col, base, boxes, sizes = image[placed], row[placed], col[placed], base[placed], \
            boxes[placed], sizes[placed]
        offsets = torch.stack((((boxes[:, 0] + boxes[:, 2]) / 2) / stride_x - col,
                               ((boxes[:, 1] + boxes[:, 3]) / 2) / stride_y - row), dim=1)
        sqrt_sizes = (sizes / sizes.new_tensor([width, height])).sqrt()
        return GridTargets(image, row, col, base, boxes, offsets, sqrt_sizes, labels[placed] - 1, first[placed])

    def losses(self, outputs: torch.Tensor, targets: list[dict], image_size: tuple[int, int]) -> dict:
        box_values, class_logits = self.split(outputs)
        predicted = self.grid_boxes(box_values, image_size)                          # (N, S, S, B, 4)
        confidence = torch.sigmoid(box_values[..., 4])                               # (N, S, S, B)
        grid = self.encode_targets(targets, predicted.detach(), image_size)
        owner = (grid.image, grid.row, grid.col, grid.base)

        left_out = torch.zeros_like(confidence, dtype=torch.bool)
        if self.noobj_ignore_iou < 1:
            left_out = best_overlap(predicted.detach(), targets) > self.noobj_ignore_iou
        left_out[owner] = True
        no_object = self.lambda_noobj * confidence.pow(2).masked_fill(left_out, 0.0).sum()

        values = box_values[owner]                                                   # (G', 5)
        offsets = torch.sigmoid(values[:, :2])
        image_wh = values.new_tensor([image_size[1], image_size[0]])
        sqrt_sizes = (self.base_boxes[grid.base] / image_wh).sqrt() * \
            torch.exp(0.5 * values[:, 2:4].clamp(-SIZE_CLAMP, SIZE_CLAMP))           # sqrt(p e^t / image side)
        coord = self.lambda_coord * ((offsets - grid.offsets).pow(2).sum() +
                                     (sqrt_sizes - grid.sqrt_sizes).pow(2).sum())
        iou = broadcast_box_iou(predicted[owner].detach(), grid.boxes)
        objectness = (confidence[owner] - iou).pow(2).sum()

        if self.per_box_classes:
            logits, classes = class_logits[owner], grid.classes
        else:
            cells = grid.owns_cell
            logits = class_logits[grid.image[cells], grid.row[cells], grid.col[cells]]
            classes = grid.classes[cells]
        if self.class_loss == "ce":
            class_error = F.cross_entropy(logits, classes, reduction="sum")
        else:
            one_hot = F.one_hot(classes, self.num_foreground).to(logits.dtype)
            class_error = (logits.softmax(dim=-1) - one_hot).pow(2).sum()

        batch = outputs.shape[0]
        # An image without objects has only the no-object term; the others are empty sums, kept in the graph.
        return {"coord": coord / batch, "object": objectness / batch, "no_object": no_object / batch,
                "class": class_error / batch}


def build(config: dict, info: dict) -> Yolo:
    """YOLO: backbone + a 3x3 / 1x1 head onto the S x S x (5B + C) grid."""
    if uses_fpn(config):
        raise ConfigError("fpn=true: YOLO predicts from one grid; use fpn=false")
    backbone = build_detection_backbone(config)
    return Yolo(info["num_classes"], backbone, parse_base_boxes(config["base_boxes"]),
                head_channels=config["head_channels"], per_box_classes=config["per_box_classes"],
                responsible=config["responsible"], class_loss=config["class_loss"],
                lambda_coord=config["lambda_coord"], lambda_noobj=config["lambda_noobj"],
                noobj_ignore_iou=config["noobj_ignore_iou"],
                postprocess=SingleShotPostprocess.from_config(config), transform=detector_transform(config, info),
                channels_last=config["channels_last"])
