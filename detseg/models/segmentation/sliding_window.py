"""Sliding-window segmentation: classify the centre pixel of a crop, once per pixel.

The lecture calls it a terrible idea, and it is built here honestly so the benchmark can say how terrible: a small
CNN looks at a ``crop x crop`` patch and predicts the class of its centre pixel. Training samples random crops
(:func:`sample_crops`); inference (:meth:`SlidingWindowSegmenter.segment`) cuts one crop around *every* pixel - an
H x W image costs H x W forward passes of the CNN, and overlapping crops share no computation. Image borders are
padded (reflect or zeros) so border pixels get a full crop too.

For even crop sizes the "centre" is the pixel at index ``crop // 2`` of the crop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Option
from ...errors import ConfigError
from .. import build_with_options, check_knobs, defaults_of
from ..backbones import TinyConvNet

PADDINGS = ("reflect", "zeros")

OPTIONS: dict[str, Option] = {
    "crop": Option(32, "side of the square crop around each pixel (its context)", min=3, max=512),
    "width": Option(8, "channels of the crop classifier's first stage", min=4, max=512),
    "depth": Option(3, "stride-2 stages of the crop classifier", min=1, max=6),
    "padding": Option("reflect", "how crops at the image border are filled: reflect|zeros", choices=PADDINGS),
}
DEFAULTS = defaults_of(OPTIONS)


def _windows(images: torch.Tensor, crop: int, padding: str) -> torch.Tensor:
    """Every crop of ``images`` as a strided view, no copy: (N, C, H, W) -> (N, C, H, W, crop, crop).

    Window [n, :, y, x] is the crop whose centre (index ``crop // 2``) is pixel (y, x) of image n.
    """
    before, after = crop // 2, crop - 1 - crop // 2
    height, width = images.shape[-2:]
    if padding == "reflect" and max(before, after) >= min(height, width):
        raise ConfigError(f"crop={crop}: reflect padding needs crops smaller than twice the image side "
                          f"({height}x{width}); use padding=zeros or a smaller crop")
    mode = "reflect" if padding == "reflect" else "constant"
    padded = F.pad(images, (before, after, before, after), mode=mode)    # (N, C, H + crop - 1, W + crop - 1)
    return padded.unfold(2, crop, 1).unfold(3, crop, 1)


def sample_crops(images: torch.Tensor, semantic: torch.Tensor, crops_per_image: int,
                 generator: torch.Generator | None = None, crop_size: int = 32,
                 padding: str = "reflect") -> tuple[torch.Tensor, torch.Tensor]:
    """Random training crops and the class of their centre pixels.

    ``images`` (N, 3, H, W), ``semantic`` (N, H, W) class ids (an ignore value such as 255 passes through, for the
    loss to skip). Returns crops (N * crops_per_image, 3, crop, crop) and labels (N * crops_per_image,), grouped by
    image. Centres are uniform over the image, so classes are seen as often as they cover pixels.
    """
    n, _, height, width = images.shape
    windows = _windows(images, crop_size, padding)
    image_index = torch.arange(n).repeat_interleave(crops_per_image)
    ys = torch.randint(height, (n * crops_per_image,), generator=generator)
    xs = torch.randint(width, (n * crops_per_image,), generator=generator)
    image_index, ys, xs = (t.to(images.device) for t in (image_index, ys, xs))
    crops = windows[image_index, :, ys, xs]      # advanced indices first: (M, 3, crop, crop), a copy
    labels = semantic[image_index, ys, xs].long()
    return crops.contiguous(), labels


class SlidingWindowSegmenter(nn.Module):
    """A crop classifier: crops (M, 3, crop, crop) -> centre-pixel class scores (M, num_classes).

    The feature map is flattened rather than averaged: the class asked for is the one *at the centre*, so the
    classifier must know where in the crop each feature is.
    """

    def __init__(self, num_classes: int = 8, crop: int = 32, width: int = 8, depth: int = 3,
                 padding: str = "reflect"):
        super().__init__()
        knobs = check_knobs(OPTIONS, crop=crop, width=width, depth=depth, padding=padding)
        crop, width, depth, padding = knobs["crop"], knobs["width"], knobs["depth"], knobs["padding"]
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes}: segmentation needs at least 2 classes (with background)")
        self.num_classes, self.crop, self.padding = num_classes, crop, padding
        self.backbone = TinyConvNet(width=width, depth=depth)
        side = crop
        for _ in range(depth):
            side = (side + 1) // 2                          # a stride-2, padding-1 3x3 conv: ceil(side / 2)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(self.backbone.out_channels * side * side, num_classes)
        )

    @classmethod
    def build(cls, num_classes: int, **knobs) -> "SlidingWindowSegmenter":
        return build_with_options(cls, OPTIONS, num_classes, knobs)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(crops))       # (M, 3, k, k) -> (M, C', k/s, k/s) -> (M, num_classes)

    def sample_crops(self, images: torch.Tensor, semantic: torch.Tensor, crops_per_image: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`sample_crops` with this model's crop size and border padding."""
        return sample_crops(images, semantic, crops_per_image, generator, self.crop, self.padding)

    @torch.no_grad()
    def segment(self, images: torch.Tensor, batch_size: int = 2048, stride: int = 1) -> torch.Tensor:
        """Dense scores by brute force: one crop per pixel, about ``batch_size`` crops per forward pass.

        (N, 3, H, W) -> (N, num_classes, H, W). Call in eval mode (batch norm must use its running statistics).
        ``stride`` > 1 is a cheaper approximation for quick evaluations: classify every ``stride``-th pixel in each
        direction (``stride**2`` times fewer crops) and spread each score over its cell by nearest upsampling.
        """
        n, _, height, width = images.shape
        windows = _windows(images, self.crop, self.padding)                # (N, 3, H, W, k, k) view
        offset = stride // 2                                              # sample the middle of each cell
        windows = windows[:, :, offset::stride, offset::stride]           # (N, 3, H', W', k, k)
        rows, columns = windows.shape[2:4]
        scores = images.new_empty(n, rows, columns, self.num_classes)
        rows_per_chunk = max(1, batch_size // (n * columns))
        for start in range(0, rows, rows_per_chunk):
            chunk = windows[:, :, start:start + rows_per_chunk]                          # (N, 3, r, W', k, k)
            crops = chunk.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, self.crop, self.crop)  # (N*r*W', 3, k, k)
            scores[:, start:start + rows_per_chunk] = self(crops).view(n, -1, columns, self.num_classes)
        scores = scores.permute(0, 3, 1, 2).contiguous()                   # (N, H', W', C) -> (N, C, H', W')
        if stride > 1:
            scores = F.interpolate(scores, size=(height, width), mode="nearest")
        return scores

    def crops_per_image(self, height: int, width: int, stride: int = 1) -> int:
        """Crops the CNN classifies to segment one H x W image (the cost the lecture objects to: one per pixel)."""
        offset = stride // 2
        return len(range(offset, height, stride)) * len(range(offset, width, stride))
