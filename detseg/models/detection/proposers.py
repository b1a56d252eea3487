"""Proposers that are not learned: every sliding window, or Selective Search's "blobby" regions.

Both are fixed algorithms outside the network (the RPN, the learned one, lives in :mod:`.rpn`). Selective Search is
what R-CNN, SPP-net and Fast R-CNN start from; it costs far more than the detector's forward pass on small images,
so data sets compute it once per image and cache it (:class:`detseg.ops.proposals.ProposalCache`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...config import Option
from ...ops.boxes import sliding_windows
from ...ops.proposals import SELECTIVE_SEARCH_MODES, ProposalCache, selective_search
from .generalized import GivenProposals


def default_cache_dir() -> Path:
    """Where Selective Search results are kept between runs: ``$DETSEG_CACHE/proposals`` (default ~/.cache/detseg)."""
    root = os.environ.get("DETSEG_CACHE") or Path.home() / ".cache" / "detseg"
    return Path(root) / "proposals"


def pixels_to_rgb(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) 0-255 tensor -> (H, W, 3) uint8 array, the form OpenCV wants."""
    return image.detach().round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class SelectiveSearch:
    """Selective Search on a batch of 0-255 images: ``(N, 3, H, W) -> list of (P_i, 4)`` float32 arrays.

    ``cache_dir`` (``None``: no cache) keeps results on disk keyed by image content and mode, so an image seen once
    - by any run - is never searched again.
    """

    def __init__(self, mode: str = "fast", max_proposals: int = 2000, cache_dir: str | Path | None = None):
        self.mode, self.max_proposals = mode, max_proposals
        # "" would make a cache in the working directory, which nobody asks for: it means no cache, as None does.
        self.cache = ProposalCache(cache_dir) if cache_dir not in (None, "") else None

    def one(self, image: np.ndarray) -> np.ndarray:
        if self.cache is not None:
            return self.cache.get(image, self.mode, max_proposals=self.max_proposals)
        return selective_search(image, self.mode, max_proposals=self.max_proposals)

    def __call__(self, images: torch.Tensor) -> list[np.ndarray]:
        return [self.one(pixels_to_rgb(image)) for image in images]

    @contextmanager
    def without_cache(self):
        """Compute every image afresh inside the block (the cache is neither read nor written)."""
        cache, self.cache = self.cache, None
        try:
            yield
        finally:
            self.cache = cache


def selective_search_proposer(config: dict) -> GivenProposals:
    """The proposer of R-CNN, SPP-net and Fast R-CNN from a run config (``ss_mode``, ``proposals_per_image``)."""
    search = SelectiveSearch(config["ss_mode"], config["proposals_per_image"],
                             config.get("proposal_cache") or default_cache_dir())
    return GivenProposals(search, config["proposals_per_image"])


SELECTIVE_SEARCH_OPTIONS = {
    "ss_mode": Option("fast", "Selective Search mode: fast|quality", choices=SELECTIVE_SEARCH_MODES),
    "proposals_per_image": Option(2000, "Selective Search boxes kept per image (R-CNN used ~2000)", min=1),
    "proposal_cache": Option("", "directory of the Selective Search cache ('' = $DETSEG_CACHE/proposals or "
                                 "~/.cache/detseg/proposals)"),
}


class SlidingWindowProposer(nn.Module):
    """Every window of every shape that fits the image: the brute force the lecture starts detection with.

    The windows depend only on the image size, so they are made once per size and reused.
    """

    def __init__(self, scales=(12, 24, 48, 96), aspect_ratios=(0.5, 1.0, 2.0), stride_frac: float = 0.5):
        super().__init__()
        self.scales, self.aspect_ratios, self.stride_frac = tuple(scales), tuple(aspect_ratios), stride_frac
        self._windows: dict[tuple, torch.Tensor] = {}

    def windows(self, image_size: tuple[int, int], device) -> torch.Tensor:
        key = (tuple(image_size), str(device))
        if key not in self._windows:
            self._windows[key] = sliding_windows(image_size, self.scales, self.aspect_ratios,
                                                 self.stride_frac).to(device)
        return self._windows[key]

    def forward(self, images, features, image_size, targets):
        windows = self.windows(image_size, images.device)
        return [windows] * len(images), {}
