"""In-network upsampling: the lecture's ways to go from a small feature map back to a large one.

A segmentation network that downsamples (to afford depth and a large receptive field) must upsample again to give
one label per pixel. The lecture lists, from fixed to learned:

* **nearest neighbour** - copy each value into its whole 2x2 cell;
* **bed of nails** - put each value in the top-left corner of its cell, zeros elsewhere;
* **max unpooling** - put each value back where the paired max-pool found its maximum (remembered indices), zeros
  elsewhere, so fine spatial detail lost by pooling comes back in the right place;
* **transposed convolution** - a learnable upsampling: each input value scales the filter and the scaled copies are
  summed where they overlap in the output. It equals the gradient of a strided convolution with respect to its input
  (hence "backward strided convolution"), see ``tests/test_upsample.py``;
* **resize-convolution** - nearest resize followed by an ordinary 3x3 convolution; learnable like the transposed
  convolution but free of its uneven-overlap checkerboard artefacts (Odena et al., 2016).

Every layer here doubles (``scale``) height and width and shares one call signature, ``layer(x, pool_indices=None)``,
so the encoder-decoder can swap them by name; only max unpooling reads ``pool_indices``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

UPSAMPLE_KINDS = ("nearest", "bed_of_nails", "max_unpool", "transposed", "resize_conv")
TRANSPOSED_KERNELS = (2, 3, 4)


def bed_of_nails(x: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """Each value to the top-left of its ``scale x scale`` cell, zeros elsewhere: (N, C, H, W) -> (N, C, sH, sW)."""
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, h * scale, w * scale)
    out[:, :, ::scale, ::scale] = x
    return out


def transposed_conv_padding(kernel: int, stride: int = 2) -> tuple[int, int]:
    """``(padding, output_padding)`` that make a transposed convolution output exactly ``stride`` times its input.

    The output size is ``(H - 1) * stride - 2 * padding + kernel + output_padding``; setting it to ``stride * H``
    gives ``kernel + output_padding - 2 * padding = stride``. For stride 2: kernel 2 -> (0, 0), kernel 3 -> (1, 1),
    kernel 4 -> (1, 0).
    """
    padding = max(0, -(-(kernel - stride) // 2))   # ceil((kernel - stride) / 2), never negative
    output_padding = stride - kernel + 2 * padding
    return padding, output_padding


class NearestUpsample(nn.Module):
    """Copy every value into its whole cell (no parameters)."""

    needs_indices = False

    def __init__(self, scale: int = 2):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor, pool_indices: torch.Tensor | None = None) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")   # (N, C, H, W) -> (N, C, sH, sW)


class BedOfNailsUpsample(nn.Module):
    """Value in the top-left corner of its cell, zeros elsewhere (no parameters)."""

    needs_indices = False

    def __init__(self, scale: int = 2):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor, pool_indices: torch.Tensor | None = None) -> torch.Tensor:
        return bed_of_nails(x, self.scale)


class MaxUnpool(nn.Module):
    """Values back at the positions the paired 2x2 max-pool took them from (``MaxPool2d(return_indices=True)``).

    The pairing is the point: the decoder layer that mirrors a pooling layer of the encoder reuses that layer's
    argmax positions, so edges land where they were rather than at a fixed corner of each cell.
    """

    needs_indices = True

    def __init__(self, scale: int = 2):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor, pool_indices: torch.Tensor | None = None) -> torch.Tensor:
        if pool_indices is None:
            raise ValueError("max unpooling needs the indices of its paired max-pool")
        if pool_indices.shape != x.shape:
            raise ValueError(f"pool indices of shape {tuple(pool_indices.shape)} do not pair with input "
                             f"{tuple(x.shape)}")
        n, c, h, w = x.shape
        return F.max_unpool2d(x, pool_indices, kernel_size=self.scale, stride=self.scale,
                              output_size=(h * self.scale, w * self.scale))


class TransposedConvUpsample(nn.Module):
    """Learnable upsampling by a stride-``scale`` transposed convolution.

    Kernel 2 tiles the output without overlap; kernel 4 overlaps every output pixel evenly (two taps per axis);
    kernel 3 overlaps unevenly - odd output rows and columns receive two contributions, even ones one - which is the
    classic source of checkerboard artefacts. The knob lets the benchmark show it.
    """

    needs_indices = False

    def __init__(self, in_channels: int, out_channels: int | None = None, kernel: int = 4, scale: int = 2):
        super().__init__()
        padding, output_padding = transposed_conv_padding(kernel, scale)
        self.conv = nn.ConvTranspose2d(in_channels, out_channels or in_channels, kernel, stride=scale,
                                       padding=padding, output_padding=output_padding)

    def forward(self, x: torch.Tensor, pool_indices: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)   # (N, C_in, H, W) -> (N, C_out, sH, sW)


class ResizeConvUpsample(nn.Module):
    """Nearest-neighbour resize, then a 3x3 convolution: learnable, every output pixel sees the same taps."""

    needs_indices = False

    def __init__(self, in_channels: int, out_channels: int | None = None, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(in_channels, out_channels or in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, pool_indices: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


def make_upsample(kind: str, channels: int, kernel: int = 4, scale: int = 2) -> nn.Module:
    """The upsampling layer called ``kind`` (one of :data:`UPSAMPLE_KINDS`); channels in = channels out."""
    if kind == "nearest":
        return NearestUpsample(scale)
    if kind == "bed_of_nails":
        return BedOfNailsUpsample(scale)
    if kind == "max_unpool":
        return MaxUnpool(scale)
    if kind == "transposed":
        if kernel not in TRANSPOSED_KERNELS:
            raise ConfigError(f"kernel={kernel}: transposed convolution kernel must be one of "
                              f"{', '.join(map(str, TRANSPOSED_KERNELS))}")
        return TransposedConvUpsample(channels, channels, kernel, scale)
    if kind == "resize_conv":
        return ResizeConvUpsample(channels, channels, scale)
    raise ConfigError(f"up={kind}: unknown upsampling; choose one of {', '.join(UPSAMPLE_KINDS)}")
