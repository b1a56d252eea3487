"""Data shared by the in-memory tasks (segmentation, localization, pose, detection): scenes or COCO files.

Images are small (128 px by default) and data sets are thousands of images, so each split is decoded once into
uint8 tensors at ``image_size`` and batches are cut from memory: an epoch then costs only the network, which is what
the lecture's comparisons are about. Normalisation is the models' business (their preprocessing stage).
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..data.dataset import InstanceDataset
from ..data.scenes import ScenesSource
from ..data.sources import open_source
from ..errors import ConfigError
from ..models.base import resize_square, scale_target

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
    """Every image of ``source`` as one uint8 tensor (N, 3, S, S), resized if needed, plus its targets.

    The resize is the models' own (:func:`detseg.models.base.resize_square`), so a model given the original image
    sees exactly the stored copy.
    """
    dataset = InstanceDataset(source)
    images = torch.empty(len(dataset), 3, image_size, image_size, dtype=torch.uint8)
    targets = []
    for index in tqdm(range(len(dataset)), desc=desc, disable=None if progress else True, leave=False):
        image, target = dataset[index]
        height, width = image.shape[1:]
        if (height, width) != (image_size, image_size):
            image = resize_square(image, image_size).to(torch.uint8)
            target = scale_target(target, image_size / width, image_size / height, image_size)
        images[index] = image
        targets.append(target)
    return images, targets


def label_names(source) -> list[str]:
    """Index 0 = background, then the categories in order (the contiguous labels models predict)."""
    return ["background"] + [category["name"] for category in source.categories]
