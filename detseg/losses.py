"""Losses the methods share: per-pixel cross-entropy and coordinate regression.

Localization, pose and every detector are multi-task: a classification loss plus a regression loss, added with a
weight that is one more hyperparameter (the lecture's point: the weight changes what "the loss" means, so compare
runs by the metric you care about, not by the total loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError

REGRESSION_KINDS = ("l2", "l1", "smooth_l1")


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of every labeled pixel, averaged over the pixels of each image, then over the images.

    ``logits`` (N, C, H, W), ``target`` (N, H, W) integer class ids; pixels equal to ``ignore_index`` (unlabeled,
    e.g. VOC's object borders) contribute nothing.

    Why not ``F.cross_entropy(..., reduction="mean")``: that averages over all labeled pixels of the whole batch, so
    an image weighs in proportion to how many of its pixels are labeled, and a mostly-unlabeled image barely counts.
    Averaging per image first makes every image count the same, whatever its labeled area. An image without any
    labeled pixel is left out of the batch mean (it has no loss to average); if no image has one, the loss is 0 and
    still connected to the graph.

    ``weight`` (C,), optional: a loss weight per class (rare classes heavier). Each pixel's loss is multiplied by its
    true class's weight and the per-image mean still divides by the pixel count, so weights that average 1 over the
    data keep the loss on its usual scale.
    """
    per_pixel = F.cross_entropy(logits, target.long(), weight=weight, ignore_index=ignore_index,
                                reduction="none")                                                      # (N, H, W)
    labeled = (target != ignore_index).flatten(1).to(per_pixel.dtype)                                  # (N, H*W)
    pixels_per_image = labeled.sum(dim=1)                                                              # (N,)
    per_image = per_pixel.flatten(1).sum(dim=1) / pixels_per_image.clamp(min=1)                        # (N,)
    has_labels = pixels_per_image > 0
    if not bool(has_labels.any()):
        return logits.sum() * 0.0
    return per_image[has_labels].mean()


def coordinate_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", beta: float = 1.0 / 9,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Regression loss summed over the last axis (the coordinates), averaged over everything else.

    ``pred`` and ``target`` (..., D): D = 4 for a box, 2 for a joint. ``kind``: ``l2`` (squared error), ``l1``, or
    ``smooth_l1`` (quadratic below ``beta``, linear above: L2's smooth optimum without its outlier-driven gradients).
    ``weight`` (...), optional: 0/1 (or soft) weight per item, e.g. the visibility of a joint; the mean is over the
    weight's sum so unlabeled items neither count nor dilute the loss.
    """
    if kind == "l2":
        per_coordinate = (pred - target) ** 2
    elif kind == "l1":
        per_coordinate = (pred - target).abs()
    elif kind == "smooth_l1":
        per_coordinate = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    else:
        raise ConfigError(f"loss kind '{kind}': choose one of {', '.join(REGRESSION_KINDS)}")
    per_item = per_coordinate.sum(dim=-1)                                  # (..., D) -> (...)
    if weight is None:
        return per_item.mean() if per_item.numel() else pred.sum() * 0.0
    weight = weight.to(per_item.dtype)
    return (per_item * weight).sum() / weight.sum().clamp(min=1e-12)


def box_regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", beta: float = 1.0 / 9,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`coordinate_loss` for boxes: ``pred`` and ``target`` (..., 4) in the same encoding."""
    if pred.shape[-1] != 4 or pred.shape != target.shape:
        raise ValueError(f"boxes must be (..., 4) and alike, got {tuple(pred.shape)} and {tuple(target.shape)}")
    return coordinate_loss(pred, target, kind, beta, weight)
