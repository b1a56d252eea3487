"""Shared pieces of the detector tests: tiny detectors from the registry and batches of tiny scenes."""
from __future__ import annotations

import torch

from detseg import registry
from detseg.config import resolve
from detseg.data.dataset import InstanceDataset
from detseg.data.scenes import ScenesSource
from detseg.tasks.detection import plain_target


def tiny_detector(name: str, **overrides) -> torch.nn.Module:
    """``det/<method>`` with width 8 at 64 px (8 classes), seeded so the tests are repeatable."""
    entry = registry.get(name)
    config = resolve(entry.all_options(), {"width": 8, "image_size": 64, **overrides})
    torch.manual_seed(0)
    return entry.build(config, {"num_classes": 8, "image_size": 64})


def scene_batch(indices, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """Scenes ``indices`` as a detector batch: uint8 images (N, 3, size, size) and the targets the task feeds."""
    indices = list(indices)
    dataset = InstanceDataset(ScenesSource(max(indices) + 1, size=size, seed=seed))
    pairs = [dataset[index] for index in indices]
    images = torch.stack([image.as_subclass(torch.Tensor) for image, _ in pairs])
    return images, [plain_target(target) for _, target in pairs]
