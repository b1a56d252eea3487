"""What a task is: the glue between data, a model and its metrics.

The engine knows nothing about boxes or pixels. A task tells it how to build the data for a run, how to batch it,
what the losses of one batch are, how to score the validation set, and how to turn raw images into drawn
predictions. Models of the same task (every segmentation network, say) share one task object, which is what makes
their numbers comparable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..config import Option


@dataclass
class DataBundle:
    """The data of one run: training and validation sets and what a model must know about them.

    ``info`` is saved inside checkpoints so that a model can be rebuilt and used for prediction without the data:
    number of classes, class names, input shape, normalisation statistics.
    """

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    info: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. the COCO ground truth of the validation set


class Task:
    """Base class; subclasses fill in every method."""

    name: str = ""
    main_metric: str = ""           # the metrics.json key that decides best.pt ("top1", "miou", "ap", ...)
    options: dict[str, Option] = {}  # data options of this task (sizes, data set choice)

    def make_data(self, config: dict, data: str | None, val: str | None) -> DataBundle:
        raise NotImplementedError

    def placeholder_info(self, config: dict, data: str | None) -> dict | None:
        """A stand-in for the data info, so a model can be built (and its knobs checked) before the data is made:
        a bad combination of knobs then fails in a second, not after minutes of data generation."""
        return None

    def collate(self, batch: list) -> Any:
        return torch.utils.data.default_collate(batch)

    def batch_size_of(self, batch: Any) -> int:
        """Number of images in a collated batch (for throughput)."""
        return len(batch[0])

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Called before each training epoch (0-based) with the bare model; e.g. to freeze a backbone."""

    def losses(self, model: nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
        """Named losses of one training batch; the engine minimises their sum."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, bundle: DataBundle) -> dict[str, float]:
        """Metrics on the validation loader (model in eval mode), including ``val_loss`` and ``main_metric``."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[np.ndarray], info: dict, device: torch.device) -> list[dict]:
        """Predictions for raw RGB images (H, W, 3) uint8 of any size, as JSON-ready dicts."""
        raise NotImplementedError

    def draw(self, image: np.ndarray, prediction: dict, info: dict) -> torch.Tensor:
        """A (3, H, W) uint8 picture of one prediction on its image."""
        raise NotImplementedError

    def write_outputs(self, model: nn.Module, bundle: DataBundle, run_dir, device: torch.device) -> None:
        """Extra files of a finished run (detectors write predictions.json); nothing by default."""

    def validation_images(self, bundle: DataBundle, count: int) -> list[np.ndarray]:
        """A few raw validation images (H, W, 3) uint8 for ``val_predictions.png``."""
        raise NotImplementedError


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper, whose own methods and attributes live there."""
    return getattr(model, "module", model)


def attach_run_options(model: nn.Module, config: dict, keys: tuple[str, ...]) -> nn.Module:
    """Give the model the few run options its task needs at step time (flips, crop counts, eval stride).

    Tasks are shared by every run, so per-run settings travel with the model instead of living on the task.
    """
    model.run_options = {key: config[key] for key in keys}
    return model


def knobs_of(options: dict, config: dict) -> dict:
    """The part of a run config that a model constructor takes (its ``OPTIONS`` keys)."""
    return {key: config[key] for key in options}


def run_options(model: nn.Module) -> dict:
    return getattr(unwrap(model), "run_options", {})


@dataclass
class ModelEntry:
    """One model of the registry: found by its name ``task/method``."""

    name: str
    task: Task
    description: str
    build: Callable[[dict, dict], nn.Module]   # (config, data info) -> model
    options: dict[str, Option]                 # the model's knobs and its training defaults

    def all_options(self) -> dict[str, Option]:
        from ..config import TRAIN_OPTIONS
        merged = dict(TRAIN_OPTIONS)
        merged.update(self.task.options)
        merged.update(self.options)
        return merged
