"""Training augmentation on ``torchvision.transforms.v2``: image, boxes, masks and joints move together.

A target dict of plain tensors is wrapped as ``tv_tensors`` for the pipeline - ``boxes`` and ``proposals`` as
``BoundingBoxes``, ``semantic`` and ``masks`` as ``Mask``, ``keypoints`` (G, J, 3) as ``KeyPoints`` (G, J, 2) plus a
visibility column kept aside - so every geometric transform treats them consistently, and unwrapped afterwards
(joints that left the image become (0, 0, 0)). A horizontal flip of people also swaps left and right joints
(:class:`RandomHorizontalFlipWithJoints`).

Randomness is drawn per sample from a generator seeded by (seed, epoch, index) (:func:`sample_seed`), not from the
global RNG: the augmentation of an example is fixed by the run's seed, so a resumed run sees exactly what an
uninterrupted one would, whichever worker process or order the example is loaded in.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

BOX_KEYS = ("boxes", "proposals")
MASK_KEYS = ("semantic", "masks")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One 63-bit seed per (run seed, epoch, example index)."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2 ** 63)


def wrap_target(target: dict, canvas_size: tuple[int, int]) -> dict:
    """Plain tensors -> tv_tensors, so v2 transforms know what each entry is (others pass through untouched)."""
    wrapped = dict(target)
    for key in BOX_KEYS:
        if key in target:
            wrapped[key] = tv_tensors.BoundingBoxes(target[key], format="XYXY", canvas_size=canvas_size)
    for key in MASK_KEYS:
        if key in target:
            wrapped[key] = tv_tensors.Mask(target[key])
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


class Augmentation:
    """The training augmentation of a run: ``augmentation(image, target, seed) -> (image, target)``.

    ``hflip``: mirror left-right with probability 1/2; ``flip_index`` (joint i becomes joint flip_index[i]) for data
    with keypoints. An augmentation with no step is falsy, and data sets skip it.
    """

    def __init__(self, hflip: bool = False, flip_index: Sequence[int] | None = None):
        steps: list[v2.Transform] = []
        if hflip:
            steps.append(RandomHorizontalFlipWithJoints(flip_index) if flip_index is not None
                         else v2.RandomHorizontalFlip(p=0.5))
        self.pipeline = v2.Compose(steps) if steps else None

    def __bool__(self) -> bool:
        return self.pipeline is not None

    def __call__(self, image: torch.Tensor, target: dict, seed: int) -> tuple[torch.Tensor, dict]:
        if self.pipeline is None:
            return image, target
        canvas = tuple(image.shape[-2:])
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone (what v2 draws from): torch.manual_seed would also queue a CUDA seeding,
            # whose bookkeeping formats the whole call stack - most of the cost of a small augmentation.
            torch.default_generator.manual_seed(seed)
            image, target = self.pipeline(tv_tensors.Image(image), wrap_target(target, canvas))
        return image.as_subclass(torch.Tensor), unwrap_target(target, tuple(image.shape[-2:]))
