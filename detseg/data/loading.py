"""Data sets of any size: read lazily from disk (or rendered) one sample at a time, or held in memory when small.

A :class:`SourceSet` wraps a source (scenes, COCO, VOC): ``set[i]`` decodes image ``i``, turns it into tensors
(:class:`~detseg.data.dataset.InstanceDataset`), brings it to the size the model takes (``prepare``: a square
resize, or an aspect-preserving one) and augments it. Nothing but the source's annotation index stays in memory, so
a data set of any length streams through the engine's ``num_workers`` DataLoader processes; the same object can
instead be decoded once into memory (:func:`into_memory`) when that fits, which is what the built-in scenes do.

A file that fails to decode mid-run (truncated, corrupt) is reported - file and image id - and skipped
(``skip_bad_images=True``): the sample comes back as ``None``, collation drops it, and a counter shared with the
worker processes says how many were skipped at the end. With ``skip_bad_images=False`` the run stops on it with
the usual one-line :class:`~detseg.errors.DataError` (exit 2 on the CLI). Headers are checked when a set is opened
(:func:`check_image_headers`: PIL reads a few bytes per file), so a missing, non-image or mis-sized file fails in
seconds, before any training.
"""
from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from tqdm import tqdm

from ..errors import DataError
from .dataset import InstanceDataset
from .images import read_image_size
from .transforms import Augmentation, sample_seed

# prepare(image (3, H, W) uint8, target) -> (image (3, h, w) uint8, target in those pixels)
Prepare = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


class SourceSet(torch.utils.data.Dataset):
    """``set[i] -> (image uint8 (3, h, w), target)`` streamed from ``source``, or ``None`` for a skipped file.

    ``fields`` limits what :class:`InstanceDataset` computes per sample (detection needs no masks, say);
    ``prepare`` resizes and converts the target (the task's); ``augment`` draws from (``seed``, epoch, index) so a
    sample's augmentation does not depend on which worker loads it.
    """

    def __init__(self, source, prepare: Prepare, augment: Augmentation | None = None, seed: int = 0,
                 skip_bad_images: bool = True, fields: tuple[str, ...] | None = None):
        self.source, self.prepare, self.augment, self.seed = source, prepare, augment, seed
        self.instances = InstanceDataset(source, fields=fields)
        self.skip_bad_images, self.epoch = skip_bad_images, 0
        # One flag per image, in shared memory so DataLoader workers (forked or spawned) set them for everyone.
        self._failed = multiprocessing.Array("b", len(source), lock=False)

    @property
    def skipped(self) -> int:
        """How many different images failed to decode and were skipped so far (worker processes included)."""
        return sum(self._failed)

    def skipped_files(self) -> list[str]:
        """The file names of the skipped images, in index order."""
        return [self.source.images[index].get("file_name", str(index))
                for index, failed in enumerate(self._failed) if failed]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int) -> tuple[torch.Tensor, dict] | None:
        """Sample ``index`` decoded and prepared, not augmented; ``None`` when its file cannot be decoded."""
        try:
            image, target = self.instances[index]
        except DataError as error:
            if not self.skip_bad_images:
                raise
            self._failed[index] = 1
            print(f"skipping an image that cannot be decoded ({error}); skip_bad_images=false stops instead",
                  file=sys.stderr, flush=True)
            return None
        return self.prepare(image.as_subclass(torch.Tensor), target)

    def __getitem__(self, index: int):
        item = self.load(index)
        if item is None or not self.augment:
            return item
        return self.augment(*item, sample_seed(self.seed, self.epoch, index))


class InMemorySet(torch.utils.data.Dataset):
    """Images (a (N, 3, S, S) uint8 tensor, or a list of (3, h_i, w_i) when sizes differ) and one target dict each,
    in memory, augmented per sample for training.

    ``augment`` (an :class:`~detseg.data.transforms.Augmentation`) draws from (``seed``, epoch, index); the engine
    calls :meth:`set_epoch` before each epoch. Validation sets have no augmentation.
    """

    def __init__(self, images, targets: list[dict], augment: Augmentation | None = None, seed: int = 0,
                 skipped: int = 0):
        self.images, self.targets = images, targets
        self.augment, self.seed, self.epoch, self.skipped = augment, seed, 0, skipped

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, target = self.images[index], self.targets[index]
        if self.augment:
            image, target = self.augment(image, target, sample_seed(self.seed, self.epoch, index))
        return image, target


def into_memory(streamed: SourceSet, progress: bool = True, desc: str = "") -> InMemorySet:
    """Every sample of ``streamed`` decoded once into memory, with the same augmentation: the fast path for small
    sets (an epoch then costs only the network). Images are stacked into one tensor when they share a size."""
    images, targets = [], []
    for index in tqdm(range(len(streamed)), desc=desc, disable=None if progress else True, leave=False):
        item = streamed.load(index)
        if item is not None:
            images.append(item[0])
            targets.append(item[1])
    if images and all(image.shape == images[0].shape for image in images):
        images = torch.stack(images)
    return InMemorySet(images, targets, streamed.augment, streamed.seed, skipped=streamed.skipped)


def drop_skipped(batch: list) -> list:
    """A batch without the samples :class:`SourceSet` skipped (``None``)."""
    return [item for item in batch if item is not None]


def check_image_headers(source, progress: bool = True, threads: int = 8) -> None:
    """Open every image file of a file-backed source far enough to read its header (format and size); a missing
    or non-image file, or one whose size differs from the annotations', raises :class:`DataError` naming it.

    Reading a header costs a fraction of a millisecond, and threads overlap the disk waits, so this stays fast for
    large sets; sources without files (the rendered scenes) are skipped."""
    if not hasattr(source, "image_path") or not hasattr(source, "check_size"):
        return

    def check(index: int) -> None:
        width, height = read_image_size(source.image_path(index), image_id=source.images[index]["id"])
        source.check_size(index, width=width, height=height)      # the same check as decoding makes

    with ThreadPoolExecutor(threads) as pool:
        for _ in tqdm(pool.map(check, range(len(source)), chunksize=64), total=len(source),
                      desc="checking image headers", disable=None if progress else True, leave=False):
            pass
