"""What a task is: the glue between data, a model and its metrics - one object per run, made from its config.

The engine knows nothing about boxes or pixels, and a task knows nothing about losses: the model computes those
(:mod:`detseg.models`). A task tells the engine how to build the data of a run, how to batch it, how to score what
the model predicts on the validation set, and how to describe and draw a prediction. Models of the same task (every
segmentation network, say) are scored by the same task class, which is what makes their numbers comparable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..config import Option
from ..data.loading import InMemorySet, drop_skipped  # noqa: F401  (InMemorySet: tasks import it from here)


@dataclass
class DataBundle:
    """The data of one run: training and validation sets and what a model must know about them.

    ``info`` is saved inside checkpoints so that a model can be rebuilt and used for prediction without the data:
    number of classes, class names, input shape, image size.
    """

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    info: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. the COCO ground truth of the validation set


class Scorer:
    """Accumulates one evaluation: ``update(outputs, targets)`` per validation batch, then ``compute()``."""

    def update(self, outputs: list[dict], targets: list[dict]) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, Any]:
        raise NotImplementedError


class Task:
    """Base class; a subclass is instantiated once per run with that run's config."""

    name: str = ""
    main_metric: str = ""           # the metrics.json key that decides best.pt ("top1", "miou", "ap", ...)
    options: dict[str, Option] = {}  # data options of this task (sizes, data set choice, augmentation)

    def __init__(self, config: dict):
        self.config = config

    def make_data(self, data: str | None, val: str | None) -> DataBundle:
        raise NotImplementedError

    def placeholder_info(self, data: str | None) -> dict | None:
        """A stand-in for the data info, so a model can be built (and its knobs checked) before the data is made:
        a bad combination of knobs then fails in a second, not after minutes of data generation."""
        return None

    def collate(self, batch: list) -> tuple[Any, list[dict]]:
        """``[(input, target)] -> (inputs, targets)``: inputs stacked when they share a shape, else a list."""
        return collate_pairs(batch)

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Called before each training epoch (0-based) with the bare model; e.g. to freeze a backbone."""

    def scorer(self, bundle: DataBundle) -> Scorer:
        raise NotImplementedError

    def write_outputs(self, scorer: Scorer, run_dir) -> None:
        """Extra files of a finished evaluation (detectors write predictions.json); nothing by default."""

    def check_predictable(self, info: dict) -> None:
        """Raise a ConfigError when a model of this run cannot predict on image files; fine by default."""

    def describe(self, output: dict, info: dict) -> dict:
        """One model output as a JSON-ready dict; keys starting with ``_`` hold arrays for :meth:`draw` only."""
        raise NotImplementedError

    def draw(self, image: np.ndarray, prediction: dict, info: dict) -> torch.Tensor:
        """A (3, H, W) uint8 picture of one described prediction on its image."""
        raise NotImplementedError

    def validation_images(self, bundle: DataBundle, count: int) -> list[np.ndarray]:
        """A few raw validation images (H, W, 3) uint8 for ``val_predictions.png``."""
        raise NotImplementedError


def knobs_of(options: dict, config: dict) -> dict:
    """The part of a run config that a model constructor takes (its ``OPTIONS`` keys)."""
    return {key: config[key] for key in options}


def collate_pairs(batch: list) -> tuple[Any, list[dict]]:
    batch = drop_skipped(batch)
    if not batch:                     # every sample of the batch failed to decode (and was skipped)
        return [], []
    inputs, targets = zip(*batch)
    same = all(item.shape == inputs[0].shape for item in inputs)
    return (torch.stack(inputs) if same else list(inputs)), list(targets)


def to_device(inputs, targets: list[dict], device: torch.device):
    """A collated batch on ``device``: the inputs, and every tensor of every target dict."""
    inputs = inputs.to(device) if torch.is_tensor(inputs) else [item.to(device) for item in inputs]
    targets = [{key: (value.to(device) if torch.is_tensor(value) else value) for key, value in target.items()}
               for target in targets]
    return inputs, targets


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> (3, H, W) uint8 tensor, the models' input."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


@torch.no_grad()
def predict_arrays(model: nn.Module, task: Task, images: list[np.ndarray], info: dict,
                   device: torch.device) -> list[dict]:
    """Described predictions for raw RGB images (H, W, 3) uint8 of any size: one eval-mode forward per image."""
    model.eval()
    return [task.describe(model([image_tensor(image).to(device)])[0], info) for image in images]


@dataclass
class ModelEntry:
    """One model of the registry: found by its name ``task/method``."""

    name: str
    task: type[Task]
    description: str
    build: Callable[[dict, dict], nn.Module]   # (config, data info) -> model
    options: dict[str, Option]                 # the model's knobs and its training defaults

    def all_options(self) -> dict[str, Option]:
        from ..config import TRAIN_OPTIONS
        merged = dict(TRAIN_OPTIONS)
        merged.update(self.task.options)
        merged.update(self.options)
        return merged

    def make_task(self, config: dict) -> Task:
        return self.task(config)
