"""Shared pieces of the detector tests: tiny detectors from the registry and batches of tiny scenes."""
from __future__ import annotations

import torch
from torchvision.ops import box_iou

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


def fit(model: torch.nn.Module, images, targets: list[dict], steps: int, lr: float = 3e-3) -> tuple[float, float]:
    """AdamW on one batch for ``steps`` steps; (first loss, last loss) - the overfit tests' loop."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    first = last = None
    for _ in range(steps):
        loss = sum(model(images, targets).values())
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return first, last


def objects_found(detections: list[dict], targets: list[dict], min_score: float = 0.5,
                  min_iou: float = 0.5) -> tuple[int, int]:
    """(ground truths with a detection of their class above ``min_score`` at IoU > ``min_iou``, ground truths)."""
    found = total = 0
    for image, target in zip(detections, targets):
        confident = image["scores"] > min_score
        iou = box_iou(target["boxes"], image["boxes"][confident])                     # (G, D)
        same_class = target["labels"][:, None] == image["labels"][confident][None]
        found += int(((iou > min_iou) & same_class).any(dim=1).sum())
        total += len(target["boxes"])
    return found, total
