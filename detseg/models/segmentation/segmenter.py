"""Every segmentation network behind the model contract: preprocessing, per-pixel loss, maps in the image's pixels.

The three designs of the lecture differ only in the network that turns a normalised image into class scores per
pixel; :class:`Segmenter` is what they share around it. Training mode: the per-pixel cross-entropy of those scores
against the ``semantic`` map of each target, with an optional loss weight per class (:func:`class_weights`, kept as
a buffer so a checkpoint carries the weights its run trained with). Eval mode: per image ``{"scores": (C, H, W)
logits, "labels": (H, W) class per pixel}``, upsampled bilinearly to the image's own size when it was resized.

:class:`SlidingWindowSegmentation` swaps the two halves for the sliding window's: it trains on random crops
labelled by their centre pixel and predicts by classifying one crop per (strided) pixel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...losses import pixel_cross_entropy
from ..base import Batch, DetsegModel, Images, ImageTransform, stack_targets

WEIGHTINGS = ("none", "sqrt_inverse", "inverse")


def class_weights(pixel_share: list[float], weighting: str) -> torch.Tensor | None:
    """Loss weight per class from its share of the training pixels; ``None`` for ``weighting="none"``.

    Background covers ~80% of a scene's pixels and each shape ~3%, so the plain per-pixel loss is mostly about
    background and the shapes - what the mean IoU averages over equally - learn slowly. ``inverse`` weighs every
    class equally in total; ``sqrt_inverse`` goes half way (in log terms), which keeps background edges sharp. Weights
    are normalised so that an average training pixel weighs 1 (the loss keeps its scale); a class absent from the
    training pixels gets weight 1 (it has no pixels to weigh).
    """
    if weighting == "none":
        return None
    share = torch.tensor(pixel_share, dtype=torch.float64)
    present = share > 0
    weights = torch.ones_like(share)
    weights[present] = share[present] ** (-0.5 if weighting == "sqrt_inverse" else -1.0)
    weights[present] /= (share[present] * weights[present]).sum()
    return weights.float()


class Segmenter(DetsegModel):
    """``transform`` -> ``network`` (normalised (N, 3, S, S) -> scores (N, C, S, S)) -> loss or per-image maps.

    ``weights`` (C,), optional: the per-class loss weights of :func:`class_weights`.
    """

    def __init__(self, network: nn.Module, image_size: int, weights: torch.Tensor | None = None):
        super().__init__()
        self.transform = ImageTransform(image_size)
        self.network = network
        self.num_classes = network.num_classes
        self.register_buffer("class_weights", weights if weights is not None else torch.ones(self.num_classes))
        self.weighted = weights is not None

    def _weights(self) -> torch.Tensor | None:
        return self.class_weights if self.weighted else None

    def scores(self, batch: Batch) -> torch.Tensor:
        """Class scores of the whole batch at input resolution: (N, 3, S, S) -> (N, C, S, S)."""
        return self.network(batch.normalized)

    def training_losses(self, images: Images, targets: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.transform.batch(images)
        semantic = stack_targets(self.transform.targets_to_input(targets, batch), "semantic").long()   # (N, S, S)
        return {"pixel_ce": pixel_cross_entropy(self.network(batch.normalized), semantic, weight=self._weights())}

    def inference(self, images: Images) -> list[dict]:
        batch = self.transform.batch(images)
        scores = self.scores(batch)
        outputs = []
        for index, image_scores in enumerate(scores):
            image_scores = self.transform.map_to_original(image_scores, batch.original_sizes[index])  # (C, H, W)
            outputs.append({"scores": image_scores, "labels": image_scores.argmax(dim=0)})
        return outputs


class SlidingWindowSegmentation(Segmenter):
    """The sliding window behind the contract: ``network`` is a crop classifier
    (:class:`~detseg.models.segmentation.sliding_window.SlidingWindowSegmenter`).

    Training classifies ``crops_per_image`` random crops of every image by their centre pixel (the lecture's
    baseline trains on crops); inference classifies one crop per ``eval_stride``-th pixel in each direction.
    """

    def __init__(self, network: nn.Module, image_size: int, weights: torch.Tensor | None = None,
                 crops_per_image: int = 64, eval_stride: int = 1):
        super().__init__(network, image_size, weights)
        self.crops_per_image, self.eval_stride = crops_per_image, eval_stride

    def scores(self, batch: Batch) -> torch.Tensor:
        return self.network.segment(batch.normalized, stride=self.eval_stride)

    def training_losses(self, images: Images, targets: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.transform.batch(images)
        semantic = stack_targets(self.transform.targets_to_input(targets, batch), "semantic").long()
        crops, labels = self.network.sample_crops(batch.normalized, semantic, self.crops_per_image)
        return {"pixel_ce": F.cross_entropy(self.network(crops), labels, weight=self._weights(), ignore_index=255)}
