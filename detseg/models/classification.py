"""Image / vector classifiers with the knobs HyperQuest turns: width, depth and dropout.

:class:`Classifier` puts either network behind the model contract (standardisation, loss, per-input outputs).
Both networks are plain stacks of blocks so that a block can be widened or a new one inserted later (Net2Net in
:mod:`detseg.growth`) without changing what the network computes. A block is ``Linear|Conv -> BatchNorm -> ReLU``;
dropout sits before the classifier, where the lecture's regularisation discussion puts it.
"""
from __future__ import annotations

from math import prod

import torch
import torch.nn.functional as F
from torch import nn

from .base import DetsegModel, as_float_image


def dense_block(in_features: int, out_features: int, batchnorm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_features, out_features, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(out_features))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def conv_block(in_channels: int, out_channels: int, batchnorm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units on the flattened input; works for vectors and images alike."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 256, depth: int = 2,
                 dropout: float = 0.0, batchnorm: bool = True):
        super().__init__()
        self.input_shape = tuple(input_shape)
        in_features = prod(input_shape)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(dense_block(in_features, width, batchnorm))
            in_features = width
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)                      # (N, *input_shape) -> (N, D)
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.dropout(x))  # (N, num_classes)


class ConvNet(nn.Module):
    """``depth`` stages of ``convs_per_stage`` 3×3 conv blocks, each stage ending in 2×2 max-pooling, widths
    doubling per stage (capped at 8×). Two convolutions per stage (VGG's recipe) see a 5×5 neighbourhood before
    each pooling, which on the scenes images beats one wider convolution at the same cost.

    Global average pooling before the classifier keeps the head independent of the input size, so the same network
    classifies 32 px HyperQuest images and 64 px scenes.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 16, depth: int = 3,
                 dropout: float = 0.0, batchnorm: bool = True, convs_per_stage: int = 2):
        super().__init__()
        self.input_shape = tuple(input_shape)
        in_channels = input_shape[0]
        # One flat list of blocks, each paired with a pool (MaxPool2d at the end of a stage, else Identity), so
        # that Net2Net can widen any block or insert one anywhere (detseg.growth).
        self.blocks = nn.ModuleList()
        self.pools = nn.ModuleList()
        for stage in range(depth):
            out_channels = width * min(2 ** stage, 8)
            for index in range(convs_per_stage):
                self.blocks.append(conv_block(in_channels, out_channels, batchnorm))
                # Pool only while the map is larger than 2×2, so deep nets on small inputs stay valid.
                last = index == convs_per_stage - 1
                self.pools.append(nn.MaxPool2d(2) if last and input_shape[1] >> stage >= 4 else nn.Identity())
                in_channels = out_channels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, pool in zip(self.blocks, self.pools):
            x = pool(block(x))                # (N, C, H, W) -> (N, C', H/2, W/2)
        x = x.mean(dim=(2, 3))                # (N, C) global average pooling
        return self.classifier(self.dropout(x))


class Classifier(DetsegModel):
    """An :class:`MLP` or :class:`ConvNet` behind the model contract: standardise, classify, cross-entropy.

    Inputs are images (3, H, W) - uint8, or float in the data set's own units - resized to ``input_shape`` when
    they differ, or vectors (D,). ``mean`` / ``std`` are the training data's statistics per channel (images) or per
    feature (vectors), kept as buffers: the network sees standardised inputs, and a checkpoint carries the numbers.
    Training mode: ``targets[i]["labels"]`` (0-d class index) -> ``{"cls": cross-entropy}``. Eval mode: per input
    ``{"logits": (K,), "probabilities": (K,), "labels": 0-d, "scores": 0-d}``.
    """

    def __init__(self, network: nn.Module, mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        self.network = network
        self.input_shape = tuple(network.input_shape)
        self.is_image = len(self.input_shape) == 3
        channels = self.input_shape[0] if self.is_image else prod(self.input_shape)
        self.register_buffer("mean", torch.tensor(mean if mean is not None else [0.0] * channels).float())
        self.register_buffer("std", torch.tensor(std if std is not None else [1.0] * channels).float())

    def _image_batch(self, inputs) -> torch.Tensor:
        """Images (a list, or an (N, 3, H, W) batch) -> (N, 3, h, w) float at the network's input size."""
        size = tuple(self.input_shape[1:])

        def resized(x: torch.Tensor) -> torch.Tensor:
            if tuple(x.shape[-2:]) == size:
                return x
            return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)

        if torch.is_tensor(inputs) and inputs.dim() == 4:
            return resized(as_float_image(inputs))
        return torch.cat([resized(as_float_image(image)[None]) for image in inputs])

    def standardized(self, inputs) -> torch.Tensor:
        """Inputs -> the network's (N, *input_shape) batch, standardised with the buffers."""
        if self.is_image:
            return (self._image_batch(inputs) - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        x = inputs if torch.is_tensor(inputs) else torch.stack(list(inputs))
        return (x.float().reshape(len(x), -1) - self.mean) / self.std

    def training_losses(self, inputs, targets: list[dict]) -> dict[str, torch.Tensor]:
        labels = torch.stack([torch.as_tensor(target["labels"]) for target in targets]).reshape(-1)
        return {"cls": F.cross_entropy(self.network(self.standardized(inputs)), labels.to(self.mean.device))}

    def inference(self, inputs) -> list[dict]:
        logits = self.network(self.standardized(inputs))                       # (N, K)
        probabilities = logits.softmax(dim=1)
        scores, labels = probabilities.max(dim=1)
        return [{"logits": logits[i], "probabilities": probabilities[i], "labels": labels[i], "scores": scores[i]}
                for i in range(len(logits))]
