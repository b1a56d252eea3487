"""Data shared by the dense-prediction tasks (segmentation, localization, pose): scenes or COCO files, held in memory.

Images are small (128 px by default) and data sets are thousands of images, so each split is decoded once into
uint8 tensors and batches are cut from memory: an epoch then costs only the network, which is what the lecture's
comparisons are about. Images are normalised on the fly with fixed statistics kept in the run's ``info``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.dataset import InstanceDataset
from ..data.scenes import ScenesSource
from ..data.sources import open_source
from ..errors import ConfigError

# Fixed per-channel statistics for every dense task: the scenes' backgrounds and colours span the range evenly.
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def open_splits(config: dict, data: str | None, val: str | None, **scenes_kwargs):
    """(train source, val source) from ``--data scenes`` (generated) or ``--data TRAIN.json --val VAL.json``."""
    if data in (None, "scenes"):
        if val is not None:
            raise ConfigError("--val: the built-in scenes make their own validation split; drop --val")
        common = dict(size=config["image_size"], seed=config["data_seed"], **scenes_kwargs)
        return (ScenesSource(config["train_size"], split="train", **common),
                ScenesSource(config["val_size"], split="val", **common))
    if not str(data).endswith(".json") and not Path(data).is_dir():
        raise ConfigError(f"--data {data}: expected 'scenes', a COCO .json file or a VOC directory")
    if val is None:
        raise ConfigError(f"--data {data}: also give --val VAL.json (the validation split)")
    return open_source(data), open_source(val, split="val")


def materialize(source, image_size: int, progress: bool = True, desc: str = "") -> tuple[torch.Tensor, list[dict]]:
    """Every image of ``source`` as one uint8 tensor (N, 3, S, S), resized if needed, plus its targets."""
    dataset = InstanceDataset(source)
    images = torch.empty(len(dataset), 3, image_size, image_size, dtype=torch.uint8)
    targets = []
    for index in tqdm(range(len(dataset)), desc=desc, disable=None if progress else True, leave=False):
        image, target = dataset[index]
        height, width = image.shape[1:]
        if (height, width) != (image_size, image_size):
            image = F.interpolate(image[None].float(), size=(image_size, image_size), mode="bilinear",
                                  antialias=True, align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
            target = rescale_target(target, image_size / width, image_size / height, image_size)
        images[index] = image
        targets.append(target)
    return images, targets


def rescale_target(target: dict, scale_x: float, scale_y: float, size: int) -> dict:
    """Targets of an image resized to ``size``×``size``: boxes and joints scaled, maps resized (nearest)."""
    scaled = dict(target)
    scaled["boxes"] = target["boxes"] * torch.tensor([scale_x, scale_y, scale_x, scale_y])
    keypoints = target["keypoints"].clone()
    keypoints[..., 0] *= scale_x
    keypoints[..., 1] *= scale_y
    scaled["keypoints"] = keypoints
    scaled["semantic"] = F.interpolate(target["semantic"][None, None].float(), size=(size, size),
                                       mode="nearest")[0, 0].long()
    return scaled


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float, zero-centred with the fixed statistics."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def resize_to_square(image: np.ndarray, size: int) -> torch.Tensor:
    """A raw RGB image (H, W, 3) of any size -> (1, 3, size, size) float pixels, rounded to 0..255."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255)


def to_square_input(image: np.ndarray, size: int) -> torch.Tensor:
    """A raw RGB image (H, W, 3) of any size -> normalised (1, 3, size, size)."""
    return normalize(resize_to_square(image, size))


def label_names(source) -> list[str]:
    """Index 0 = background, then the categories in order (the contiguous labels models predict)."""
    return ["background"] + [category["name"] for category in source.categories]
