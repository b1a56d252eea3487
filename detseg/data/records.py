"""The one shape every data source speaks: COCO-style records, one :class:`Sample` per image.

The scenes generator, the COCO reader and the VOC reader are all *sources*: they know their categories and their
image list up front and produce a :class:`Sample` per index on demand. :class:`detseg.data.dataset.InstanceDataset`
turns samples into tensors (tv_tensors) for training, and :func:`detseg.data.dataset.coco_ground_truth` turns any
source into the ground-truth dict pycocotools evaluates against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# The 14 joints of the Leeds Sports Pose (LSP) convention, in LSP's own order: right leg ankle to hip, left leg hip
# to ankle, right arm wrist to shoulder, left arm shoulder to wrist, then neck and head top.
LSP_JOINTS = (
    "r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle",
    "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow", "l_wrist",
    "neck", "head_top",
)
# Bones between joints (0-based indices into LSP_JOINTS); COCO's "skeleton" field stores them 1-based.
LSP_SKELETON = (
    (0, 1), (1, 2), (3, 4), (4, 5),          # legs
    (6, 7), (7, 8), (9, 10), (10, 11),       # arms
    (2, 12), (3, 12), (8, 12), (9, 12),      # hips and shoulders to the neck
    (12, 13),                                # neck to head top
)
# Horizontal flip swaps left and right: joint i becomes joint LSP_FLIP[i].
LSP_FLIP = (5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6, 12, 13)


@dataclass
class Sample:
    """One image and everything annotated on it.

    ``annotations`` are COCO annotation dicts (already validated by the source): ``id``, ``image_id``,
    ``category_id``, ``bbox`` [x, y, w, h], ``area``, ``iscrowd`` and, where present, ``segmentation``
    (polygons or RLE), ``keypoints`` (flat [x1, y1, v1, ...]), ``num_keypoints``, ``caption``.
    """

    image: np.ndarray                  # (H, W, 3) uint8 RGB
    image_id: int
    annotations: list[dict]
    masks: np.ndarray | None = None    # (N, H, W) uint8 visible masks in annotation order; None: decode segmentation
    semantic: np.ndarray | None = None  # (H, W) uint8 category id per pixel, 0 = background; None: paint from masks
    file_name: str = ""


class Source(Protocol):
    """What every data source provides."""

    categories: list[dict]   # COCO categories: id, name, supercategory; person also keypoints + skeleton
    images: list[dict]       # COCO image entries: id, file_name, width, height (cheap, known up front)

    def __len__(self) -> int: ...

    def sample(self, index: int) -> Sample: ...
