"""Region proposals: Selective Search (the R-CNN / Fast R-CNN input), a disk cache for it, and proposal recall.

Classifying every sliding window at every scale is hopeless, so R-CNN asks a cheap, class-agnostic algorithm for
~2000 "blobby" regions likely to hold *some* object. Selective Search (Uijlings et al., 2013) over-segments the image
with Felzenszwalb's graph segmentation, then greedily merges the most similar neighbouring regions (colour, texture,
size, fill); every region along the way, at every level of the hierarchy, yields a box. The *fast* mode uses fewer
colour spaces and similarity strategies than the *quality* mode: fewer boxes, lower recall, a fraction of the time.

Selective Search runs on the CPU and costs far more than the detector's forward pass on small images (see the timing
in the report), so :class:`ProposalCache` computes it once per image and mode and reuses it every epoch. Its quality
is measured by recall - the share of ground-truth objects some proposal covers - since a missed object can never be
detected by the R-CNN stage behind it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torchvision.ops import box_iou

from ..errors import ConfigError, DataError
from ..io import atomic_write_bytes

SELECTIVE_SEARCH_MODES = ("fast", "quality")


def _as_rgb_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W, 3) uint8 RGB from an (H, W, 3) / (H, W) array or a (3, H, W) uint8 tensor (a dataset's image)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.transpose(1, 2, 0)                     # (C, H, W) -> (H, W, C)
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)          # grey -> RGB
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise DataError("image", "selective search needs an (H, W, 3) uint8 RGB image",
                        value=f"{image.dtype} array of shape {image.shape}")
    return image


def selective_search(image: np.ndarray | torch.Tensor, mode: str = "fast", max_proposals: int = 2000,
                     max_side: int | None = 500, min_size: float = 4.0, num_threads: int | None = 1) -> np.ndarray:
    """Selective Search boxes for one RGB image: ``(H, W, 3) uint8 -> (K, 4)`` float32 xyxy, ``K <= max_proposals``.

    Images whose longer side exceeds ``max_side`` are shrunk first (Selective Search time grows with pixel count)
    and the boxes scaled back. Duplicate boxes (the same region found by several strategies) are dropped, as are
    boxes with a side below ``min_size`` pixels; the rest keep OpenCV's ranking, best first. That ranking follows
    the paper's *pseudo-random* ordering (hierarchy level times a random number), so the order - and therefore which
    boxes survive ``max_proposals`` - varies between calls; the set of boxes does not. Cache them
    (:class:`ProposalCache`) for a fixed proposal set per image.

    ``num_threads`` sets OpenCV's thread count during the call (restored afterwards): one thread per image lets
    data-loader workers run images in parallel without oversubscribing the cores; ``None`` leaves OpenCV's setting.
    """
    if mode not in SELECTIVE_SEARCH_MODES:
        raise ConfigError(f"selective search mode must be one of {', '.join(SELECTIVE_SEARCH_MODES)} (got {mode!r})")
    image = _as_rgb_uint8(image)
    height, width = image.shape[:2]
    shrink = 1.0 if max_side is None else min(1.0, max_side / max(height, width))
    small = image
    if shrink < 1.0:
        small_size = (max(1, round(width * shrink)), max(1, round(height * shrink)))    # cv2 sizes are (w, h)
        small = cv2.resize(image, small_size, interpolation=cv2.INTER_AREA)

    previous_threads = cv2.getNumThreads()
    if num_threads is not None:
        cv2.setNumThreads(num_threads)
    try:
        search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        search.setBaseImage(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))                   # OpenCV expects BGR
        if mode == "fast":
            search.switchToSelectiveSearchFast()
        else:
            search.switchToSelectiveSearchQuality()
        rects = np.asarray(search.process(), dtype=np.int64).reshape(-1, 4)           # (K, 4) x, y, w, h
    finally:
        if num_threads is not None:
            cv2.setNumThreads(previous_threads)

    _, first = np.unique(rects, axis=0, return_index=True)
    rects = rects[np.sort(first)]                                                       # deduplicated, rank order kept
    scale_x, scale_y = width / small.shape[1], height / small.shape[0]
    boxes = np.stack([rects[:, 0] * scale_x, rects[:, 1] * scale_y,
                      (rects[:, 0] + rects[:, 2]) * scale_x, (rects[:, 1] + rects[:, 3]) * scale_y], axis=1)
    boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)      # (K, 4) xyxy, original pixels
    large_enough = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    return boxes[large_enough][:max_proposals]


class ProposalCache:
    """Selective Search results on disk, one ``.npy`` per (image content, mode, parameters).

    The key is the SHA-1 of the image's pixels, shape and dtype plus the mode and parameters, so the same picture
    under another file name or index still hits, and an edited image or another mode misses. Files are written
    atomically (:func:`detseg.io.atomic_write_bytes`: temporary file, then ``os.replace``), so parallel data-loader
    workers and interrupted runs never leave a half-written file behind. ``hits`` and ``misses`` count this
    process's look-ups.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(image: np.ndarray, mode: str, **params) -> str:
        """Hex digest naming the cache entry of ``image`` (already (H, W, 3) uint8) under ``mode`` and ``params``."""
        digest = hashlib.sha1()
        digest.update(np.ascontiguousarray(image).tobytes())
        digest.update(json.dumps({"shape": image.shape, "dtype": str(image.dtype), "mode": mode, **params},
                                 sort_keys=True).encode())
        return digest.hexdigest()

    def path(self, image: np.ndarray | torch.Tensor, mode: str = "fast", **params) -> Path:
        """Where the proposals of ``image`` under ``mode`` and ``params`` are (or would be) stored."""
        return self.directory / f"ss-{mode}-{self.key(_as_rgb_uint8(image), mode, **params)}.npy"

    def get(self, image: np.ndarray | torch.Tensor, mode: str = "fast", max_proposals: int = 2000,
            max_side: int | None = 500, min_size: float = 4.0) -> np.ndarray:
        """Proposals ``(K, 4)`` float32 for ``image``: from disk if cached, else by :func:`selective_search`."""
        image = _as_rgb_uint8(image)
        params = {"max_proposals": max_proposals, "max_side": max_side, "min_size": min_size}
        path = self.path(image, mode, **params)
        if path.exists():
            try:
                boxes = np.load(path)
            except (OSError, ValueError):     # unreadable (e.g. a foreign or damaged file): compute it again
                boxes = None
            if boxes is not None and boxes.ndim == 2 and boxes.shape[1] == 4:
                self.hits += 1
                return boxes
        self.misses += 1
        boxes = selective_search(image, mode, **params)
        self._write_atomically(path, boxes)
        return boxes

    @staticmethod
    def _write_atomically(path: Path, boxes: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, boxes)
        atomic_write_bytes(path, buffer.getvalue())


def _as_boxes(boxes) -> torch.Tensor:
    """(K, 4) float32 tensor from an array, tensor or list of boxes (an empty one included)."""
    if isinstance(boxes, torch.Tensor):
        return boxes.detach().cpu().float().reshape(-1, 4)
    return torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)


def proposal_recall(proposals: Sequence, gt_boxes: Sequence,
                    thresholds: Sequence[float] = (0.5, 0.7)) -> dict[str, float]:
    """How well proposals cover the objects, over a list of images (numpy arrays or tensors, xyxy).

    Returns ``recall_50``, ``recall_70`` (one key per threshold, ``recall_{round(100 t)}``): the fraction of
    ground-truth boxes with at least one proposal at IoU ``>= t``; ``mean_best_iou``: the best proposal IoU averaged
    over ground-truth boxes; ``proposals_per_image``; and ``num_gt``. With no ground-truth boxes at all the recall
    and mean IoU are NaN (undefined, not 0).
    """
    if len(proposals) != len(gt_boxes):
        raise ValueError(f"{len(proposals)} proposal sets for {len(gt_boxes)} images")
    best_ious, counts = [], []
    for image_proposals, image_gt in zip(proposals, gt_boxes):
        image_proposals, image_gt = _as_boxes(image_proposals), _as_boxes(image_gt)
        counts.append(len(image_proposals))
        if len(image_gt) == 0:
            continue
        if len(image_proposals) == 0:
            best_ious.append(torch.zeros(len(image_gt)))
        else:
            best_ious.append(box_iou(image_gt, image_proposals).max(dim=1).values)      # (G, K) -> (G,)
    best = torch.cat(best_ious) if best_ious else torch.empty(0)
    result = {f"recall_{round(100 * t)}": float((best >= t).float().mean()) if len(best) else float("nan")
              for t in thresholds}
    result["mean_best_iou"] = float(best.mean()) if len(best) else float("nan")
    result["proposals_per_image"] = float(np.mean(counts)) if counts else 0.0
    result["num_gt"] = float(len(best))
    return result
