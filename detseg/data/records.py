"""The one shape every data source speaks: COCO-style records, one :class:`Sample` per image.

The scenes generator, the COCO reader and the VOC reader are all *sources*: they know their categories and their
image list up front and produce a :class:`Sample` per index on demand. :class:`detseg.data.dataset.InstanceDataset`
turns samples into tensors (tv_tensors) for training, and :func:`detseg.data.dataset.coco_ground_truth` turns any
source into the ground-truth dict pycocotools evaluates against.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from detseg.data.images import load_rgb
from detseg.errors import DataError

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


def contiguous_labels(categories: list[dict]) -> tuple[dict[int, int], list[int]]:
    """COCO category ids -> model labels 1..K (list order), and back.

    Returns ``(label_of, category_of)``: ``label_of[category_id] = label`` and ``category_of[label] =
    category_id`` with ``category_of[0] = 0`` standing for background.
    """
    label_of = {category["id"]: label for label, category in enumerate(categories, start=1)}
    category_of = [0] + [category["id"] for category in categories]
    return label_of, category_of


class RecordSource:
    """Validated COCO records held in memory plus the file of each image: what CocoSource and VocSource share.

    Implements the :class:`detseg.data.records.Source` protocol; ``label_of`` / ``category_of`` map COCO
    category ids to contiguous labels and back; :meth:`ground_truth` gives the pycocotools ground truth without
    decoding any image.
    """

    def __init__(self, origin: Path, categories: list[dict], images: list[dict], annotations: list[dict],
                 image_paths: list[Path]):
        self.origin = origin  # the file errors found later (while sampling) are reported against
        self.categories, self.images, self.annotations = categories, images, annotations
        self.label_of, self.category_of = contiguous_labels(categories)
        self._image_paths = image_paths
        position_of_image = {image["id"]: position for position, image in enumerate(images)}
        self._annotations_of: list[list[dict]] = [[] for _ in images]
        for annotation in annotations:
            self._annotations_of[position_of_image[annotation["image_id"]]].append(annotation)

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        """Where image ``index`` lives on disk."""
        return self._image_paths[index]

    def check_size(self, index: int, width: int, height: int) -> None:
        """A DataError unless image ``index``'s file (``width`` x ``height`` pixels) has the annotations' size."""
        entry = self.images[index]
        if (width, height) != (entry["width"], entry["height"]):
            raise DataError(self.origin, f"image file {self._image_paths[index]} is {width}x{height} pixels but the "
                            f"annotations say {entry['width']}x{entry['height']}", image_id=entry["id"],
                            field="width/height")

    def sample(self, index: int) -> Sample:
        """Decode image ``index`` and hand out (copies of) its annotations; masks are left to the Dataset."""
        entry, path = self.images[index], self._image_paths[index]
        pixels = load_rgb(path, image_id=entry["id"])  # (H, W, 3) uint8
        self.check_size(index, width=pixels.shape[1], height=pixels.shape[0])
        return Sample(image=pixels, image_id=entry["id"],
                      annotations=[dict(annotation) for annotation in self._annotations_of[index]],
                      file_name=entry["file_name"])

    def ground_truth(self) -> dict:
        """The whole source as a COCO dict for pycocotools (shallow copies: COCOeval writes into its records)."""
        return {"info": {"description": f"detseg ground truth from {self.origin}"},
                "images": [dict(image) for image in self.images],
                "annotations": [dict(annotation) for annotation in self.annotations],
                "categories": [dict(category) for category in self.categories]}
