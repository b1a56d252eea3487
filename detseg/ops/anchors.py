"""Anchors: a fixed set of reference boxes at every position of a feature map.

Faster R-CNN replaces Selective Search by a Region Proposal Network that looks at each cell of the backbone's feature
map and, for each of ``A`` reference boxes ("anchors") of different sizes and shapes centred there, predicts an
objectness score and box deltas (:func:`detseg.ops.boxes.encode_box_deltas`). The anchors are never learned: they
are the grid of boxes the head's outputs refer to, so anchors and head outputs must be laid out in the same order.

Conventions:

* **Shape**: an anchor of ``scale`` s and ``aspect_ratio`` r has area ``s**2`` and ``r = height / width``, so
  ``w = s / sqrt(r)`` and ``h = s * sqrt(r)``: ratio 2 is tall, 0.5 is wide. Sizes are not rounded.
* **Centring**: feature cell ``(y, x)`` of a stride-``s`` map covers image pixels ``[x*s, (x+1)*s)``, so its anchors
  are centred on that cell's centre ``((x + 0.5) * s, (y + 0.5) * s)``: the first anchor of a stride-16 map is
  centred at (8, 8), not (0, 0). (torchvision centres at (0, 0); both work as long as training and inference
  agree, and the cell centre keeps the anchor grid symmetric within the image.)
* **Order**: ``(y, x, anchor)``, anchor fastest - the order of a head output ``(N, A * k, h, w)`` whose channels are
  anchor-major (channel ``a * k + j`` is value ``j`` of anchor ``a``) once :func:`flatten_head_output` turns it into
  ``(N, h * w * A, k)``. Within one location, anchors go scale-major: index ``scale_i * len(ratios) + ratio_j``.

``grid="torchvision"`` reproduces torchvision's ``AnchorGenerator`` exactly instead, for its converted checkpoints
(:mod:`detseg.convert`): shapes rounded to whole pixels, anchors of cell ``(y, x)`` centred at ``(x * s, y * s)``,
and the stride the whole number ``image size // map size``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import ConfigError


def anchor_shapes(scales: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """Zero-centred boxes for every (scale, aspect ratio) pair, scale-major: ``-> (len(scales) * len(ratios), 4)``.

    Each box is ``(-w/2, -h/2, w/2, h/2)`` with ``w * h = scale**2`` and ``h / w = aspect_ratio``.
    """
    shapes = []
    for scale in scales:
        for ratio in aspect_ratios:
            half_w, half_h = 0.5 * scale / math.sqrt(ratio), 0.5 * scale * math.sqrt(ratio)
            shapes.append((-half_w, -half_h, half_w, half_h))
    return torch.tensor(shapes, dtype=torch.float32).reshape(-1, 4)


def _pair(value: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    first, second = value
    return float(first), float(second)


GRIDS = ("centred", "torchvision")


def grid_anchors(feature_size: tuple[int, int], stride: float | Sequence[float], shapes: torch.Tensor,
                 offset: float = 0.5) -> torch.Tensor:
    """Anchors at every cell of an ``(h, w)`` feature map: ``(A, 4) shapes -> (h * w * A, 4)`` xyxy in image pixels.

    ``stride`` is image pixels per feature cell, one number or ``(stride_y, stride_x)`` (not necessarily whole when
    the image size is not a multiple of the network's stride). Order ``(y, x, anchor)``, see the module docstring.
    Cell ``x``'s anchors are centred at ``(x + offset) * stride`` (torchvision: offset 0).
    """
    height, width = feature_size
    stride_y, stride_x = _pair(stride)
    centres_y = (torch.arange(height, dtype=torch.float32, device=shapes.device) + offset) * stride_y
    centres_x = (torch.arange(width, dtype=torch.float32, device=shapes.device) + offset) * stride_x
    grid_y, grid_x = torch.meshgrid(centres_y, centres_x, indexing="ij")                       # (h, w) each
    shifts = torch.stack((grid_x, grid_y, grid_x, grid_y), dim=-1).reshape(-1, 1, 4)           # (h*w, 1, 4)
    return (shifts + shapes.to(torch.float32)[None]).reshape(-1, 4)                          # (h*w, A, 4) -> (h*w*A, 4)


def flatten_head_output(output: torch.Tensor, values_per_anchor: int) -> torch.Tensor:
    """``(N, A * k, h, w)`` head output -> ``(N, h * w * A, k)``, row ``i`` belonging to anchor ``i`` of the grid.

    The head's channels must be anchor-major (channel ``a * k + j``), which is what a plain ``Conv2d(C, A * k)``
    gives when its output is read that way. Use ``k = 1`` for objectness scores and ``k = 4`` for box deltas.
    """
    batch, channels, height, width = output.shape
    num_anchors = channels // values_per_anchor
    output = output.view(batch, num_anchors, values_per_anchor, height, width)                # (N, A, k, h, w)
    return output.permute(0, 3, 4, 1, 2).reshape(batch, height * width * num_anchors, values_per_anchor)


class AnchorGenerator:
    """Anchors for one feature map or several (a feature pyramid), cached per (level, size, stride, device).

    ``scales`` is either one sequence of sizes (a single feature map, e.g. ``(32, 64, 128)``) or one sequence per
    level (FPN, e.g. ``((32,), (64,), (128,))``); ``aspect_ratios`` is one sequence shared by all levels or one per
    level. Not an ``nn.Module``: anchors hold no parameters and need no state dict, only the cache.
    """

    max_cached = 64
    grid = "centred"        # or "torchvision" (see the module docstring); subclasses keep the centred grid

    def __init__(self, scales: Sequence[float] | Sequence[Sequence[float]],
                 aspect_ratios: Sequence[float] | Sequence[Sequence[float]] = (0.5, 1.0, 2.0),
                 grid: str = "centred"):
        if grid not in GRIDS:
            raise ConfigError(f"anchor grid {grid!r}: choose one of {', '.join(GRIDS)}")
        self.grid = grid
        scales_per_level = [scales] if isinstance(scales[0], (int, float)) else list(scales)
        if isinstance(aspect_ratios[0], (int, float)):
            ratios_per_level = [aspect_ratios] * len(scales_per_level)
        else:
            ratios_per_level = list(aspect_ratios)
        if len(ratios_per_level) != len(scales_per_level):
            raise ConfigError(f"anchor generator: {len(scales_per_level)} levels of scales but "
                              f"{len(ratios_per_level)} levels of aspect ratios")
        shapes = [anchor_shapes(s, r) for s, r in zip(scales_per_level, ratios_per_level)]
        self._set_shapes([level.round() for level in shapes] if grid == "torchvision" else shapes)

    def _set_shapes(self, shapes: list[torch.Tensor]) -> None:
        """The zero-centred boxes ``[(A_l, 4)]`` of every level, and an empty cache."""
        self.shapes = shapes
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def num_anchors_per_location(self) -> list[int]:
        """``A`` of each level: the head of level ``l`` needs ``A_l * k`` output channels."""
        return [len(shapes) for shapes in self.shapes]

    def level_anchors(self, level: int, feature_size: tuple[int, int], stride: float | Sequence[float],
                      device: torch.device | str = "cpu") -> torch.Tensor:
        """``(h * w * A, 4)`` anchors of one level (cached: repeated calls return the same tensor)."""
        key = (level, tuple(feature_size), _pair(stride), str(device))
        if key not in self._cache:
            if len(self._cache) >= self.max_cached:   # many image sizes (multi-scale training): start afresh
                self._cache.clear()
            self._cache[key] = grid_anchors(feature_size, stride, self.shapes[level].to(device),
                                            offset=0.0 if self.grid == "torchvision" else 0.5)
        return self._cache[key]

    def __call__(self, feature_maps: Sequence[torch.Tensor], image_size: tuple[int, int]) -> list[torch.Tensor]:
        """Anchors per feature map ``(N, C, h_l, w_l)`` of an ``(H, W)`` (padded) batch: ``[(h_l * w_l * A_l, 4)]``.

        Each level's stride is ``(H / h_l, W / w_l)``; the anchors are the same for every image of the batch.
        """
        sizes = [tuple(features.shape[-2:]) for features in feature_maps]
        return self.for_sizes(sizes, image_size, feature_maps[0].device if len(feature_maps) else "cpu")

    def for_sizes(self, feature_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int],
                  device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Anchors per level from the maps' ``(h_l, w_l)`` alone; level ``l``'s stride is ``(H / h_l, W / w_l)``."""
        if len(feature_sizes) != len(self.shapes):
            raise ValueError(f"{len(feature_sizes)} feature maps for an anchor generator of {len(self.shapes)} "
                             f"levels")
        def stride(side: int, cells: int) -> float:
            return float(side // cells) if self.grid == "torchvision" else side / cells
        return [self.level_anchors(level, (height, width), (stride(image_size[0], height), stride(image_size[1], width)),
                                   device)
                for level, (height, width) in enumerate(feature_sizes)]
