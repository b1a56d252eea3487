"""Fully convolutional at full resolution: a stack of 3x3 convolutions that never downsample.

The lecture's second idea: instead of one network run per pixel (the sliding window), run one network on the whole
image and read C class scores at every pixel. All pixels now share the convolutions' work, but two problems stay:
every layer runs at full resolution (cost grows with H x W x width^2 per layer), and the receptive field grows by
only 2 pixels per layer (``2 * depth + 1`` pixels in all), too small to tell a large circle from a large hexagon
from its inside. The encoder-decoder fixes both; this model is the measured baseline.
"""
from __future__ import annotations

import torch
from torch import nn

from ...config import Option
from ...errors import ConfigError
from .. import build_with_options, check_knobs, defaults_of
from ..backbones import conv_bn_relu

OPTIONS: dict[str, Option] = {
    "width": Option(24, "channels of every convolution", min=4, max=512),
    "depth": Option(6, "number of same-resolution 3x3 conv-BN-ReLU layers (receptive field 2*depth+1 px)",
                    min=1, max=64),
}
DEFAULTS = defaults_of(OPTIONS)


class FullResolutionFCN(nn.Module):
    """Images (N, 3, H, W) -> class scores (N, num_classes, H, W); ``num_classes`` counts background."""

    def __init__(self, num_classes: int = 8, width: int = 24, depth: int = 6):
        super().__init__()
        knobs = check_knobs(OPTIONS, width=width, depth=depth)
        width, depth = knobs["width"], knobs["depth"]
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes}: segmentation needs at least 2 classes (with background)")
        self.num_classes = num_classes
        self.receptive_field = 2 * depth + 1
        self.features = nn.Sequential(
            conv_bn_relu(3, width), *(conv_bn_relu(width, width) for _ in range(depth - 1))
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)

    @classmethod
    def build(cls, num_classes: int, **knobs) -> "FullResolutionFCN":
        return build_with_options(cls, OPTIONS, num_classes, knobs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))    # (N, 3, H, W) -> (N, width, H, W) -> (N, C, H, W)
