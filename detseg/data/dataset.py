"""From COCO-style samples to the tensors every model trains on.

A source (scenes, COCO, VOC) speaks COCO records: category ids, ``[x, y, w, h]`` boxes, polygons or RLE. Models
want contiguous labels, XYXY boxes and dense masks, wrapped as ``tv_tensors`` so that one
``torchvision.transforms.v2`` pipeline moves image, boxes, masks and keypoints together. :class:`InstanceDataset`
does that translation for every task: detection reads ``boxes``/``labels``, segmentation ``semantic``,
instance segmentation ``masks``, pose ``keypoints``, dense captioning ``captions``.

:func:`coco_ground_truth` goes the other way — any source back to a COCO dict for pycocotools evaluation.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2

from detseg.data.coco import rle_for_json, segmentation_to_rle
from detseg.data.records import Sample, contiguous_labels
from detseg.data.transforms import join_keypoints, split_keypoints
from detseg.errors import DataError


def label_maps(source) -> tuple[dict[int, int], list[int]]:
    """``(label_of, category_of)`` of a source: its own when it has them, else contiguous in category order."""
    if hasattr(source, "label_of") and hasattr(source, "category_of"):
        return source.label_of, source.category_of
    return contiguous_labels(source.categories)


def label_names(source) -> list[str]:
    """Class names indexed by model label: ``["background", <label 1>, ..., <label K>]``."""
    label_of, _ = label_maps(source)
    names = ["background"] + [""] * len(source.categories)
    for category in source.categories:
        names[label_of[category["id"]]] = category["name"]
    return names


class InstanceDataset(torch.utils.data.Dataset):
    """``dataset[i] -> (image, target)`` for any :class:`detseg.data.records.Source`.

    ``image`` is a ``tv_tensors.Image`` uint8 (3, H, W). ``target`` holds, for the N annotations of the image:
    ``boxes`` (BoundingBoxes XYXY float32 (N, 4)), ``labels`` int64 (N,) in 1..K, ``masks`` (Mask uint8 (N, H, W);
    an annotation without segmentation gets its filled box), ``keypoints`` float32 (N, J, 3) with J the most
    keypoints of any category (rows of other categories are zero), ``iscrowd`` int64 (N,), ``area`` float32
    (N,), ``image_id`` int, ``semantic`` (Mask int64 (H, W), label per pixel, 0 = background; crowd regions are
    not painted) and ``captions`` (list of N str, '' where none).

    ``transforms`` is a ``torchvision.transforms.v2`` callable applied to ``(image, target)``. While it runs,
    ``target["keypoints"]`` is a ``tv_tensors.KeyPoints`` (N, J, 2) — so geometric transforms move the joints —
    and ``target["keypoint_visibility"]`` (N, J) holds the flags; afterwards they are joined again into (N, J, 3)
    and joints that left the image become invisible (0, 0, 0). Horizontal flips must also swap left and right
    joints: use :class:`detseg.data.transforms.RandomHorizontalFlipWithJoints` instead of ``v2.RandomHorizontalFlip`` for pose data.
    """

    OPTIONAL_FIELDS = ("masks", "keypoints", "semantic", "captions")

    def __init__(self, source, transforms: Callable | None = None, fields: Sequence[str] | None = None):
        self.source, self.transforms = source, transforms
        # What a task reads besides boxes, labels, iscrowd, area and image_id (None: everything). Decoding masks
        # is most of a sample's cost on real data, and a box detector never looks at them.
        self.fields = set(self.OPTIONAL_FIELDS if fields is None else fields)
        unknown = self.fields - set(self.OPTIONAL_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; optional fields are {self.OPTIONAL_FIELDS}")
        self.label_of, self.category_of = label_maps(source)
        self.label_names = label_names(source)
        self.num_classes = len(self.label_names)  # K + 1, background included
        self.num_keypoints = max((len(c.get("keypoints", [])) for c in source.categories), default=0)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        sample = self.source.sample(index)
        image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1))
        target = self._target(sample)
        if self.transforms is not None:
            image, target = self._transformed(image, target)
        return image, target

    def _target(self, sample: Sample) -> dict:
        height, width = sample.image.shape[:2]
        annotations = sample.annotations
        needs_masks = bool(self.fields & {"masks", "semantic"}) or any("area" not in a for a in annotations)
        masks = instance_masks(sample) if needs_masks else None  # (N, H, W) uint8
        labels = torch.tensor([self.label_of[a["category_id"]] for a in annotations], dtype=torch.int64)
        iscrowd = torch.tensor([int(a.get("iscrowd", 0)) for a in annotations], dtype=torch.int64)
        xywh = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        area = [float(a["area"]) if "area" in a else float(masks[row].sum()) for row, a in enumerate(annotations)]
        target = {
            "boxes": tv_tensors.BoundingBoxes(box_convert(xywh, "xywh", "xyxy"), format="XYXY",
                                              canvas_size=(height, width)),
            "labels": labels,
            "iscrowd": iscrowd,
            "area": torch.tensor(area, dtype=torch.float32),
            "image_id": int(sample.image_id),
        }
        if "masks" in self.fields:
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        if "keypoints" in self.fields:
            target["keypoints"] = self._keypoints(annotations)
        if "semantic" in self.fields:
            target["semantic"] = tv_tensors.Mask(torch.from_numpy(self._semantic(sample, masks, labels, iscrowd)))
        if "captions" in self.fields:
            target["captions"] = [str(a.get("caption", "")) for a in annotations]
        return target

    def _keypoints(self, annotations: list[dict]) -> torch.Tensor:
        """Flat COCO ``[x1, y1, v1, ...]`` -> (N, J, 3), zero rows for annotations without keypoints."""
        keypoints = torch.zeros(len(annotations), self.num_keypoints, 3)
        for row, annotation in enumerate(annotations):
            flat = annotation.get("keypoints")
            if flat:
                joints = torch.tensor(flat, dtype=torch.float32).reshape(-1, 3)  # (J_category, 3)
                keypoints[row, :len(joints)] = joints
        return keypoints

    def _semantic(self, sample: Sample, masks: np.ndarray, labels: torch.Tensor, iscrowd: torch.Tensor):
        """(H, W) int64 label map: the source's own (category ids -> labels), else painted from the masks."""
        if sample.semantic is not None:
            lookup = np.zeros(max(self.category_of) + 1, dtype=np.int64)  # category id -> label
            lookup[self.category_of] = np.arange(len(self.category_of))
            present = np.unique(sample.semantic)
            unknown = [int(v) for v in present if v != 0 and (v >= len(lookup) or lookup[v] == 0)]
            if unknown:
                raise DataError(sample.file_name or "<source>", "semantic map holds ids that are no category",
                                image_id=sample.image_id, field="semantic", value=unknown)
            return lookup[sample.semantic]
        semantic = np.zeros(masks.shape[1:], dtype=np.int64)
        # Annotation order is paint order, so later (occluding) objects win where masks overlap.
        for mask, label, crowd in zip(masks, labels.tolist(), iscrowd.tolist()):
            if not crowd:
                semantic[mask.astype(bool)] = label
        return semantic

    def _transformed(self, image: tv_tensors.Image, target: dict):
        """Run ``self.transforms`` with keypoints as tv_tensors.KeyPoints so geometric transforms move them."""
        image, target = self.transforms(image, split_keypoints(target, tuple(image.shape[-2:])))
        return image, join_keypoints(target, tuple(image.shape[-2:]))


def instance_masks(sample: Sample) -> np.ndarray:
    """(N, H, W) uint8 masks of a sample: its own, else decoded from each segmentation, else the filled box."""
    height, width = sample.image.shape[:2]
    if sample.masks is not None:
        masks = np.asarray(sample.masks, dtype=np.uint8)
        if masks.shape != (len(sample.annotations), height, width):
            raise ValueError(f"sample {sample.image_id}: masks {masks.shape} do not match "
                             f"{len(sample.annotations)} annotations on a {height}x{width} image")
        return masks
    masks = np.zeros((len(sample.annotations), height, width), dtype=np.uint8)
    for row, annotation in enumerate(sample.annotations):
        segmentation = annotation.get("segmentation")
        if segmentation:
            try:
                masks[row] = mask_utils.decode(segmentation_to_rle(segmentation, height, width))
            except (ValueError, TypeError) as error:  # e.g. compressed counts that do not add up to H*W
                raise DataError(sample.file_name or "<source>", f"cannot decode segmentation: {error}",
                                image_id=sample.image_id, ann_id=annotation.get("id"), field="segmentation") from None
        else:
            # No outline given (VOC, box-only COCO): the box is the best mask we have.
            x, y, w, h = annotation["bbox"]
            x0, y0 = int(np.floor(x)), int(np.floor(y))
            x1, y1 = int(np.ceil(x + w)), int(np.ceil(y + h))
            masks[row, max(y0, 0):y1, max(x0, 0):x1] = 1
    return masks


def keypoint_flip_index(names: Sequence[str]) -> list[int]:
    """Which joint each joint becomes under a horizontal flip, from left/right prefixes in the names.

    ``l_``/``r_`` and ``left_``/``right_`` swap (LSP's ``r_ankle`` <-> ``l_ankle``, COCO's ``left_eye`` <->
    ``right_eye``); joints without a partner (``neck``, ``nose``) map to themselves.
    """
    swaps = (("l_", "r_"), ("r_", "l_"), ("left_", "right_"), ("right_", "left_"))
    position = {name: i for i, name in enumerate(names)}
    flip_index = []
    for i, name in enumerate(names):
        partner = next((new + name[len(old):] for old, new in swaps if name.startswith(old)), name)
        flip_index.append(position.get(partner, i))
    return flip_index


def detection_collate(batch: list) -> tuple[list, list]:
    """Images differ in size and targets in length, so a batch stays two lists: ``(images, targets)``."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def coco_ground_truth(source) -> dict:
    """Any source as a COCO dict (``info``, ``images``, ``annotations``, ``categories``) for pycocotools.

    Sources that hold their records (CocoSource, VocSource, anything with ``ground_truth()``) answer without
    decoding images. Others are sampled; masks of samples that carry masks but no segmentation are RLE-encoded.
    """
    if hasattr(source, "ground_truth"):
        return source.ground_truth()
    annotations = []
    for index in range(len(source)):
        sample = source.sample(index)
        for row, original in enumerate(sample.annotations):
            annotation = dict(original)
            annotation.setdefault("image_id", sample.image_id)
            annotation.setdefault("id", len(annotations) + 1)
            annotation.setdefault("iscrowd", 0)
            if "segmentation" not in annotation and sample.masks is not None:
                rle = mask_utils.encode(np.asfortranarray(sample.masks[row].astype(np.uint8)))
                annotation["segmentation"] = rle_for_json(rle)
            if "area" not in annotation:
                annotation["area"] = (float(sample.masks[row].sum()) if sample.masks is not None
                                      else float(annotation["bbox"][2] * annotation["bbox"][3]))
            annotations.append(annotation)
    return {"info": {"description": "detseg ground truth"},
            "images": [dict(image) for image in source.images],
            "annotations": annotations,
            "categories": [dict(category) for category in source.categories]}
