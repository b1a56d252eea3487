"""Data shared by the image tasks (segmentation, localization, pose, detection): scenes or COCO / VOC files.

Every split is a :class:`~detseg.data.loading.SourceSet`: samples decoded one at a time and brought to the size the
model takes by :class:`Resize` - square ``image_size`` (the scenes' and the lecture's setup) or, for detectors,
aspect-preserving ``min_size`` / ``max_size``. Small sets are then decoded once into memory (an epoch costs only the
network, which is what the lecture's comparisons are about); large ones stream from disk through the DataLoader's
workers (``loading=auto|memory|stream``). Normalisation is the models' business (their preprocessing stage).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import Option
from ..data.dataset import InstanceDataset
from ..data.loading import InMemorySet, SourceSet, check_image_headers, into_memory
from ..data.scenes import ScenesSource
from ..data.sources import open_source
from ..errors import ConfigError
from ..models.base import input_shape, resize_square, scale_target

LOADING_OPTIONS = {
    "loading": Option("auto", "memory: decode every image once into memory; stream: read each batch from disk "
                              "(any size of data set); auto: memory for the built-in scenes and for files whose "
                              "decoded inputs fit in memory_budget_mb, stream otherwise",
                      choices=("auto", "memory", "stream")),
    "memory_budget_mb": Option(1024, "loading=auto: a file set whose decoded inputs (images at input size, plus "
                                     "masks / semantic maps the task reads) fit in this many MiB is held in memory",
                               min=0, max=1 << 20),
    "skip_bad_images": Option(True, "an image file that fails to decode mid-run is reported and skipped (false: "
                                    "the run stops with exit 2)"),
}


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
    strict = config.get("strict", True)   # the detectors' knob; a lenient open keeps boxes of degenerate polygons
    return open_source(data, strict=strict), open_source(val, split="val", strict=strict)


@dataclass
class Resize:
    """The ``prepare`` step of a :class:`SourceSet`: ``convert`` the target, then bring image and target to the
    model's input size - ``image_size`` square, or with ``min_size > 0`` aspect-preserving (short side
    ``min_size``, long side at most ``max_size``): :func:`detseg.models.base.input_shape`, the models' own rule.

    The resize is the models' own (:func:`detseg.models.base.resize_square`), so a model given the original image
    sees exactly the stored copy. ``target["size"]`` records the (height, width) delivered, which scorers need to
    map predictions back to the original pixels."""

    image_size: int | tuple[int, int] = 128
    min_size: int = 0
    max_size: int = 0
    convert: Callable[[dict], dict] | None = None     # a module-level function, so worker processes can unpickle it

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        if self.convert is not None:
            target = self.convert(target)
        height, width = image.shape[-2:]
        shape = input_shape(height, width, self.image_size, self.min_size, self.max_size)
        if shape != (height, width):
            image = resize_square(image, shape).to(torch.uint8)
            target = scale_target(target, shape[1] / width, shape[0] / height, shape)
        target["size"] = tuple(shape)
        return image, target


def decoded_bytes(source, prepare: Resize, fields: tuple[str, ...] | None = None) -> int | None:
    """What a file-backed split would take in memory once decoded: every image at its input size (3 bytes a
    pixel), an int64 semantic map and one byte a pixel per instance mask when the task reads them (``fields``, None
    = all). ``None`` for a source that does not list its images' sizes."""
    images = getattr(source, "images", None)
    if images is None:
        return None
    fields = InstanceDataset.OPTIONAL_FIELDS if fields is None else fields
    masks = Counter(a["image_id"] for a in getattr(source, "annotations", ())) if "masks" in fields else Counter()
    per_pixel = 3 + (8 if "semantic" in fields else 0)
    total = 0
    for image in images:
        height, width = input_shape(image["height"], image["width"], prepare.image_size, prepare.min_size,
                                    prepare.max_size)
        total += height * width * (per_pixel + masks[image["id"]])
    return total


def uses_memory(config: dict, source, prepare: Resize, fields: tuple[str, ...] | None = None) -> bool:
    """``loading=auto``: the generated scenes live in memory, and so does a file set that fits the memory budget
    once decoded (decoding a PNG each epoch cost a fast detector ~0.7 of its ~5 ms per image); larger sets stream."""
    choice = config.get("loading", "auto")
    if choice != "auto":
        return choice == "memory"
    if isinstance(source, ScenesSource):
        return True
    size = decoded_bytes(source, prepare, fields)
    budget = config.get("memory_budget_mb", LOADING_OPTIONS["memory_budget_mb"].default)
    return size is not None and size <= budget * 2 ** 20


def open_set(source, config: dict, prepare: Resize, augment=None, fields: tuple[str, ...] | None = None,
             desc: str = "", in_memory: bool | None = None) -> SourceSet | InMemorySet:
    """One split, streamed or decoded into memory (``loading``); image files' headers are checked first."""
    check_image_headers(source)
    streamed = SourceSet(source, prepare, augment, seed=config["seed"],
                         skip_bad_images=config.get("skip_bad_images", True), fields=fields)
    memory = uses_memory(config, source, prepare, fields) if in_memory is None else in_memory
    return into_memory(streamed, desc=desc) if memory else streamed


def materialize(source, image_size: int, progress: bool = True, desc: str = "") -> tuple[torch.Tensor, list[dict]]:
    """Every image of ``source`` as one uint8 tensor (N, 3, S, S), resized if needed, plus its full targets."""
    memory = into_memory(SourceSet(source, Resize(image_size)), progress=progress, desc=desc)
    images = memory.images if torch.is_tensor(memory.images) else torch.empty(0, 3, image_size, image_size,
                                                                              dtype=torch.uint8)
    return images, memory.targets


def set_images(dataset, count: int) -> list:
    """The first ``count`` images (H, W, 3) uint8 of a validation set, in memory or streamed."""
    pictures = []
    for index in range(min(count, len(dataset))):
        item = dataset[index]
        if item is not None:
            pictures.append(item[0].permute(1, 2, 0).numpy())
    return pictures


def label_names(source) -> list[str]:
    """Index 0 = background, then the categories in order (the contiguous labels models predict)."""
    return ["background"] + [category["name"] for category in source.categories]
