"""Fully convolutional encoder-decoder: downsample to afford depth, upsample back to one score per pixel.

The lecture's fix for the full-resolution network's cost: convolutions at full resolution are expensive, so the
encoder halves the resolution ``depth`` times (max-pool or strided convolution) while widening the channels, and
the decoder mirrors it with ``depth`` in-network upsamplings (see :mod:`detseg.ops.upsample`) back to H x W. Each
level of the decoder pairs with one level of the encoder:

* with ``up=max_unpool`` the decoder reuses the argmax indices of its paired max-pool (SegNet), which is why that
  choice requires ``down=maxpool``;
* with ``skips=k`` the k coarsest decoder levels add the encoder's feature map of the same resolution (FCN-16s is
  one skip, FCN-8s two; ``skips=depth`` fuses every level down to full resolution), bringing back the fine detail
  the bottleneck lost.

Shapes for 128 px input, width 8, depth 4: (N,3,128,128) -> 8@128 -> 16@64 -> 32@32 -> 64@16 -> 64@8 (the
bottleneck) -> back up to 8@128 -> (N, num_classes, 128, 128) with ``stem_stride=1``. Inputs whose sides are not
multiples of ``stem_stride * 2**depth`` are zero-padded on the bottom/right and the scores cropped back.

``stem_stride=2``, the default, starts the encoder at half resolution (8@64 ... 64@4) and ends with FCN's bilinear
upsampling of the scores: a quarter of the cost for slightly softer edges. On the 128 px scenes, class maps
rebuilt bilinearly from perfect half-resolution class shares still score 0.98 mIoU, while the quarter cost buys
four times the training steps in a time budget - and recognising *which* shape a region is, not where its edge
lies, is what limits a short run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Option
from ...errors import ConfigError
from ...ops.upsample import TRANSPOSED_KERNELS, UPSAMPLE_KINDS, make_upsample
from .. import build_with_options, check_knobs, defaults_of
from ..backbones import conv_bn_relu, stage_widths

DOWN_KINDS = ("maxpool", "strided")

OPTIONS: dict[str, Option] = {
    "width": Option(8, "channels at full resolution; doubled per level, capped at 8x", min=4, max=512),
    "depth": Option(4, "number of 2x downsamplings (and of upsamplings)", min=1, max=6),
    "down": Option("maxpool", "downsampling: maxpool|strided (strided = 3x3 convolution, stride 2)",
                   choices=DOWN_KINDS),
    "up": Option("transposed", "upsampling: " + "|".join(UPSAMPLE_KINDS) + " (max_unpool needs down=maxpool)",
                 choices=UPSAMPLE_KINDS),
    "kernel": Option(4, "kernel of the stride-2 transposed convolution (up=transposed)", choices=TRANSPOSED_KERNELS),
    "skips": Option(2, "skip connections from the encoder, coarsest first (0 = none, 1 = FCN-16s, 2 = FCN-8s, "
                       "depth = every level)", min=0),
    "stem_stride": Option(2, "stride of the first convolution; 2 runs the whole network at half resolution and "
                             "upsamples the scores bilinearly (4x cheaper); 1 = full resolution", choices=(1, 2)),
}
DEFAULTS = defaults_of(OPTIONS)


class DecoderLevel(nn.Module):
    """One step up: narrow to the finer level's channels (cheap, at low resolution), upsample 2x, fuse, refine."""

    def __init__(self, in_channels: int, out_channels: int, up: str, kernel: int, skip: bool):
        super().__init__()
        self.narrow = conv_bn_relu(in_channels, out_channels)
        self.up = make_upsample(up, out_channels, kernel=kernel)
        self.skip = skip
        self.refine = conv_bn_relu(out_channels, out_channels)

    def forward(self, x: torch.Tensor, encoder_features: torch.Tensor,
                pool_indices: torch.Tensor | None) -> torch.Tensor:
        x = self.up(self.narrow(x), pool_indices)         # (N, C_l, h, w) -> (N, C_{l-1}, 2h, 2w)
        if self.skip:
            x = x + encoder_features                      # FCN-style fusion with the same-resolution encoder map
        return self.refine(x)


class EncoderDecoder(nn.Module):
    """Segmentation network: images (N, 3, H, W) -> class scores (N, num_classes, H, W).

    ``num_classes`` counts background (8 for the scenes: 7 object classes + background).
    """

    def __init__(self, num_classes: int = 8, width: int = 8, depth: int = 4, down: str = "maxpool",
                 up: str = "transposed", kernel: int = 4, skips: int = 2, stem_stride: int = 2):
        super().__init__()
        knobs = check_knobs(OPTIONS, width=width, depth=depth, down=down, up=up, kernel=kernel, skips=skips,
                            stem_stride=stem_stride)
        width, depth, down, up, kernel, skips, stem_stride = (
            knobs[k] for k in ("width", "depth", "down", "up", "kernel", "skips", "stem_stride"))
        if up == "max_unpool" and down != "maxpool":
            raise ConfigError(f"up=max_unpool needs down=maxpool (it reuses the max-pool's indices); got down={down}")
        if skips > depth:
            raise ConfigError(f"skips={skips}: at most depth={depth} levels can have a skip connection")
        if num_classes < 2:
            raise ConfigError(f"num_classes={num_classes}: segmentation needs at least 2 classes (with background)")
        self.num_classes, self.depth, self.down_kind, self.up_kind = num_classes, depth, down, up
        self.skips, self.stem_stride = skips, stem_stride
        widths = stage_widths(width, depth)

        # Encoder: level 0 at full resolution (or half, with stem_stride=2), then `depth` levels of (downsample, two
        # convolutions).
        self.encoder_stem = nn.Sequential(conv_bn_relu(3, widths[0], stride=stem_stride),
                                          conv_bn_relu(widths[0], widths[0]))
        self.downs = nn.ModuleList(
            nn.MaxPool2d(2, return_indices=True) if down == "maxpool"
            else conv_bn_relu(widths[level - 1], widths[level - 1], stride=2)
            for level in range(1, depth + 1)
        )
        self.encoder_levels = nn.ModuleList(
            nn.Sequential(conv_bn_relu(widths[level - 1], widths[level]), conv_bn_relu(widths[level], widths[level]))
            for level in range(1, depth + 1)
        )
        # Decoder: decoder_levels[l - 1] goes from level l to level l - 1; skips on the `skips` coarsest targets.
        self.decoder_levels = nn.ModuleList(
            DecoderLevel(widths[level], widths[level - 1], up, kernel, skip=(level - 1) >= depth - skips)
            for level in range(1, depth + 1)
        )
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)   # per-pixel linear classifier

    @classmethod
    def build(cls, num_classes: int, **knobs) -> "EncoderDecoder":
        return build_with_options(cls, OPTIONS, num_classes, knobs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        multiple = self.stem_stride * 2 ** self.depth
        pad_h, pad_w = -height % multiple, -width % multiple
        x = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images

        features = [self.encoder_stem(x)]                 # level 0: (N, w, H, W), or H/2 x W/2 with stem_stride=2
        pool_indices = []
        for down, level in zip(self.downs, self.encoder_levels):
            if self.down_kind == "maxpool":
                pooled, indices = down(features[-1])     # remember where each maximum came from
            else:
                pooled, indices = down(features[-1]), None
            pool_indices.append(indices)
            features.append(level(pooled))               # (N, C_{l-1}, h, w) -> (N, C_l, h/2, w/2)

        x = features[-1]                                  # the bottleneck, stride 2**depth
        for level in range(self.depth, 0, -1):
            x = self.decoder_levels[level - 1](x, features[level - 1], pool_indices[level - 1])
        scores = self.classifier(x)                       # (N, w, H, W) -> (N, num_classes, H, W)
        if self.stem_stride > 1:                          # FCN's last step: bilinear upsampling of the scores
            scores = F.interpolate(scores, scale_factor=self.stem_stride, mode="bilinear", align_corners=False)
        return scores[..., :height, :width]
