"""Training augmentation on ``torchvision.transforms.v2``: image, boxes, masks and joints move together.

A target dict of plain tensors is wrapped as ``tv_tensors`` for the pipeline - ``boxes`` and ``proposals`` as
``BoundingBoxes``, ``masks`` as ``Mask``, ``semantic`` as :class:`SemanticMap` (a ``Mask`` padded with "ignore"),
``keypoints`` (G, J, 3) as ``KeyPoints`` (G, J, 2) plus a visibility column kept aside - so every geometric transform
treats them consistently, and unwrapped afterwards (joints that left the image become (0, 0, 0)). A horizontal flip
of people also swaps left and right joints (:class:`RandomHorizontalFlipWithJoints`).

The steps, all off by default so the lecture's studies see exactly their data (:data:`AUGMENT_OPTIONS`): horizontal
flip, scale jitter (:class:`ScaleJitterToCanvas`), random resized crop (:class:`RandomResizedCropToCanvas`), colour
jitter (``v2.ColorJitter``, the image only). The geometric ones give back an image of the input's size, so samples of
an in-memory set still stack into one batch tensor; after them each box is made the tight box of its mask again and
instances that left the image are dropped with every row describing them (:func:`refit_instances`).

Randomness is drawn per sample from a generator seeded by (seed, epoch, index) (:func:`sample_seed`), not from the
global RNG: the augmentation of an example is fixed by the run's seed, so a resumed run sees exactly what an
uninterrupted one would, whichever worker process or order the example is loaded in.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from ..config import Option, number_list
from ..errors import ConfigError

BOX_KEYS = ("boxes", "proposals")
# Per-instance entries: row i of each describes instance i, so an instance is dropped from all of them at once.
INSTANCE_KEYS = ("boxes", "labels", "iscrowd", "area", "masks", "keypoints", "captions")
IGNORE_LABEL = 255       # the semantic maps' "don't care" value, which losses and mIoU skip
MIN_BOX_SIDE = 1.0       # pixels: a box thinner than this after a crop is no object any more
RETRIES = 10             # keep_instances: crops drawn before giving up on geometry for a sample

AUGMENT_OPTIONS = {
    "scale_jitter": Option("0", "scale jitter: resize by a factor drawn from MIN,MAX (e.g. 0.5,2.0), then crop or "
                                "pad back to the input size; 0 = off"),
    "random_crop": Option(0.0, "random resized crop keeping at least this share of the image's area (e.g. 0.3), resized "
                        "back to the input size; 0 = off", min=0, max=1),
    "color_jitter": Option(0.0, "brightness, contrast and saturation jitter of this strength, hue a tenth of it "
                                "(e.g. 0.4), image only; 0 = off", min=0, max=1),
}


class SemanticMap(tv_tensors.Mask):
    """A (H, W) label map. Transforms treat it as a ``Mask`` (nearest-neighbour resampling); its own type lets padding
    fill it with :data:`IGNORE_LABEL` rather than background: the padded border is no class at all."""


PAD_FILL = {tv_tensors.Image: 0, SemanticMap: IGNORE_LABEL, "others": 0}


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One 63-bit seed per (run seed, epoch, example index)."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2 ** 63)


def wrap_target(target: dict, canvas_size: tuple[int, int]) -> dict:
    """Plain tensors -> tv_tensors, so v2 transforms know what each entry is (others pass through untouched)."""
    wrapped = dict(target)
    for key in BOX_KEYS:
        if key in target:
            wrapped[key] = tv_tensors.BoundingBoxes(target[key], format="XYXY", canvas_size=canvas_size)
    if "masks" in target:
        wrapped["masks"] = tv_tensors.Mask(target["masks"])
    if "semantic" in target:
        wrapped["semantic"] = SemanticMap(target["semantic"])
    return split_keypoints(wrapped, canvas_size)


def split_keypoints(target: dict, canvas_size: tuple[int, int]) -> dict:
    """``keypoints`` (G, J, 3) -> ``KeyPoints`` (G, J, 2), which v2 transforms move, + ``keypoint_visibility``."""
    if "keypoints" in target:
        joints = target["keypoints"]
        target["keypoints"] = tv_tensors.KeyPoints(joints[..., :2], canvas_size=canvas_size)
        target["keypoint_visibility"] = joints[..., 2]
    return target


def join_keypoints(target: dict, canvas_size: tuple[int, int]) -> dict:
    """The inverse of :func:`split_keypoints` after a transform: joints outside the image become (0, 0, 0).

    One pixel of slack: torchvision flips points as x -> W - 1 - x (pixel centres) and boxes as x -> W - x.
    """
    if "keypoint_visibility" in target:
        height, width = canvas_size
        xy = target.pop("keypoints").as_subclass(torch.Tensor)
        visibility = target.pop("keypoint_visibility")
        inside = (xy[..., 0] > -1) & (xy[..., 0] < width) & (xy[..., 1] > -1) & (xy[..., 1] < height)
        visibility = torch.where(inside, visibility, torch.zeros_like(visibility))
        xy = xy * (visibility > 0).unsqueeze(-1)
        target["keypoints"] = torch.cat([xy, visibility.unsqueeze(-1)], dim=-1).float()
    return target


def unwrap_target(target: dict, canvas_size: tuple[int, int]) -> dict:
    """tv_tensors -> plain tensors; joints back to (G, J, 3) (:func:`join_keypoints`)."""
    plain = {key: (value.as_subclass(torch.Tensor) if isinstance(value, tv_tensors.TVTensor) else value)
             for key, value in target.items()}
    return join_keypoints(plain, canvas_size)


class RandomHorizontalFlipWithJoints(v2.Transform):
    """``v2.RandomHorizontalFlip`` that also swaps left/right joints, for targets made by InstanceDataset.

    Mirroring a person turns their right wrist into the left wrist of the mirrored person, so after flipping the
    coordinates joint ``i`` must be renamed ``flip_index[i]`` (see :func:`detseg.data.dataset.keypoint_flip_index`).
    """

    def __init__(self, flip_index: Sequence[int], p: float = 0.5):
        super().__init__()
        self.flip_index, self.p = torch.as_tensor(list(flip_index), dtype=torch.long), p
        self._flip = v2.RandomHorizontalFlip(p=1.0)

    def forward(self, *inputs):
        if torch.rand(()) >= self.p:
            return inputs if len(inputs) > 1 else inputs[0]
        flipped = self._flip(*inputs)
        for item in flipped if isinstance(flipped, tuple) else (flipped,):
            if isinstance(item, dict) and "keypoint_visibility" in item:
                joints = item["keypoints"]  # (N, J, 2)
                if joints.shape[1] != len(self.flip_index):
                    raise ValueError(f"flip_index has {len(self.flip_index)} joints, targets have {joints.shape[1]}")
                item["keypoints"] = tv_tensors.wrap(joints[:, self.flip_index], like=joints)
                item["keypoint_visibility"] = item["keypoint_visibility"][:, self.flip_index]
        return flipped


def _canvas(inputs: tuple) -> tuple[int, int]:
    """(height, width) of the image among a transform's inputs."""
    image = next(item for item in inputs if isinstance(item, tv_tensors.Image))
    return tuple(image.shape[-2:])


class ScaleJitterToCanvas(v2.Transform):
    """Scale jitter at a fixed output size ("large scale jitter", Ghiasi et al. 2021): resize image and target by
    a factor drawn from ``scale_range`` (``v2.ScaleJitter``), then take a random crop of the input's size - zooming
    in - or pad up to it - zooming out, the new border black in the image and "ignore" in semantic maps."""

    def __init__(self, scale_range: tuple[float, float]):
        super().__init__()
        self.scale_range = scale_range

    def forward(self, *inputs):
        height, width = _canvas(inputs)
        # With the canvas as target size, ScaleJitter's factor is exactly the one drawn from the range. (Its
        # target_size is (width, height), unlike the (height, width) of every other v2 size.)
        scaled = v2.ScaleJitter((width, height), scale_range=self.scale_range, antialias=True)(*inputs)
        return v2.RandomCrop((height, width), pad_if_needed=True, fill=PAD_FILL)(*scaled)


class RandomResizedCropToCanvas(v2.Transform):
    """``v2.RandomResizedCrop`` back to the input's own size: a crop of ``min_scale``..1 of the area, its aspect
    ratio within 3/4..4/3 of the image's (so a 4:3 photo is not cropped square and then stretched)."""

    def __init__(self, min_scale: float):
        super().__init__()
        self.min_scale = min_scale

    def forward(self, *inputs):
        height, width = _canvas(inputs)
        aspect = width / height
        crop = v2.RandomResizedCrop((height, width), scale=(self.min_scale, 1.0),
                                    ratio=(aspect * 3 / 4, aspect * 4 / 3), antialias=True)
        return crop(*inputs)


def jitter_range(value) -> tuple[float, float] | None:
    """The ``scale_jitter`` option: ``0`` -> None (off), ``"0.5,2.0"`` (or a pair) -> (0.5, 2.0)."""
    numbers = tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else \
        number_list("scale_jitter", value, positive=False)
    if numbers == (0.0,):
        return None
    if len(numbers) != 2 or not 0 < numbers[0] <= numbers[1]:
        raise ConfigError(f"scale_jitter={value}: expected 0 (off) or MIN,MAX with 0 < MIN <= MAX, e.g. 0.5,2.0")
    return numbers[0], numbers[1]


def refit_instances(target: dict, had_mask: torch.Tensor | None) -> dict:
    """After a crop or rescale: each box the tight box of its mask again, degenerate instances removed.

    A clamped box is not the box of the clamped mask (an L-shaped object cut at the crop keeps the box of its
    whole extent), so with masks the boxes are recomputed from them, in the data's convention: x2, y2 one past the
    last pixel (``masks_to_boxes`` gives the last pixel itself). An instance goes - from every
    :data:`INSTANCE_KEYS` entry at once - when its box is thinner than :data:`MIN_BOX_SIDE` or its mask, non-empty
    before (``had_mask``, (N,) bool), left the image. ``area`` becomes the mask's pixel count (the box's area
    where there is no mask); degenerate ``proposals`` are dropped too.
    """
    if "proposals" in target:
        proposals = target["proposals"]
        sides = proposals[:, 2:] - proposals[:, :2]
        target["proposals"] = proposals[(sides >= MIN_BOX_SIDE).all(dim=1)]
    if "boxes" not in target:
        return target
    boxes = target["boxes"].clone()                                        # (N, 4) XYXY
    alive = torch.ones(len(boxes), dtype=torch.bool)
    present = torch.zeros(len(boxes), dtype=torch.bool)
    if "masks" in target:
        masks = target["masks"].bool()                                     # (N, H, W)
        present = masks.flatten(1).any(dim=1)
        boxes[present] = masks_to_boxes(masks[present]).to(boxes.dtype) + boxes.new_tensor([0, 0, 1, 1])
        alive = present | ~had_mask
    sides = boxes[:, 2:] - boxes[:, :2]
    keep = alive & (sides >= MIN_BOX_SIDE).all(dim=1)
    target["boxes"] = boxes
    if "area" in target:
        area = sides.prod(dim=1)
        if "masks" in target:
            area = torch.where(present, target["masks"].flatten(1).sum(dim=1).to(area.dtype), area)
        target["area"] = area.to(target["area"].dtype)
    for key in INSTANCE_KEYS:
        if key in target:
            rows = target[key]
            target[key] = rows[keep] if torch.is_tensor(rows) else [row for row, k in zip(rows, keep.tolist()) if k]
    return target


class Augmentation:
    """The training augmentation of a run: ``augmentation(image, target, seed) -> (image, target)``.

    ``hflip``: mirror left-right with probability 1/2; ``flip_index`` (joint i becomes joint flip_index[i]) for data
    with keypoints. ``scale_jitter`` (0 or MIN,MAX), ``random_crop`` (the least share of the area kept, 0 = off) and
    ``color_jitter`` (strength, 0 = off): see :data:`AUGMENT_OPTIONS`. ``keep_instances``: a crop must keep every
    instance (tasks that regress exactly one object); it is redrawn up to :data:`RETRIES` times, then the sample
    is only flipped and coloured. An augmentation with no step is falsy, and data sets skip it.
    """

    def __init__(self, hflip: bool = False, flip_index: Sequence[int] | None = None,
                 scale_jitter: str | tuple[float, float] = "0",
                 random_crop: float = 0.0, color_jitter: float = 0.0, keep_instances: bool = False):
        if not 0 <= random_crop <= 1:
            raise ConfigError(f"random_crop={random_crop}: expected the least share of the area a crop keeps, in (0, 1]; 0 = off")
        if not 0 <= color_jitter <= 1:
            raise ConfigError(f"color_jitter={color_jitter}: expected a strength in [0, 1]; 0 = off")
        flip: list[v2.Transform] = []
        if hflip:
            flip.append(RandomHorizontalFlipWithJoints(flip_index) if flip_index is not None
                        else v2.RandomHorizontalFlip(p=0.5))
        geometry: list[v2.Transform] = []
        scale_range = jitter_range(scale_jitter)
        if scale_range is not None:
            geometry.append(ScaleJitterToCanvas(scale_range))
        if random_crop > 0:
            geometry.append(RandomResizedCropToCanvas(random_crop))
        color = [v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                hue=color_jitter / 10)] if color_jitter > 0 else []
        steps = flip + geometry + color
        self.pipeline = v2.Compose(steps) if steps else None
        self.geometric, self.keep_instances = bool(geometry), keep_instances
        # What a sample gets when no crop keeps all of its instances (keep_instances).
        self.without_geometry = v2.Compose(flip + color) if flip + color else None

    def __bool__(self) -> bool:
        return self.pipeline is not None

    def __call__(self, image: torch.Tensor, target: dict, seed: int) -> tuple[torch.Tensor, dict]:
        if self.pipeline is None:
            return image, target
        canvas = tuple(image.shape[-2:])
        had_mask = target["masks"].flatten(1).bool().any(dim=1) if "masks" in target else None
        count = len(target["boxes"]) if "boxes" in target else 0
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone (what v2 draws from): torch.manual_seed would also queue a CUDA seeding,
            # whose bookkeeping formats the whole call stack - most of the cost of a small augmentation.
            torch.default_generator.manual_seed(seed)
            for _ in range(RETRIES if self.geometric and self.keep_instances else 1):
                result = self._apply(self.pipeline, image, target, canvas, had_mask)
                if not self.keep_instances or len(result[1].get("boxes", ())) == count:
                    return result
            if self.without_geometry is None:
                return image, target
            return self._apply(self.without_geometry, image, target, canvas, None)

    def _apply(self, pipeline: v2.Compose, image: torch.Tensor, target: dict, canvas: tuple[int, int],
               had_mask: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        image, target = pipeline(tv_tensors.Image(image), wrap_target(target, canvas))
        target = unwrap_target(target, tuple(image.shape[-2:]))
        if self.geometric and pipeline is self.pipeline:
            target = refit_instances(target, had_mask)
        return image.as_subclass(torch.Tensor), target
