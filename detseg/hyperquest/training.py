"""A HyperQuest network and its training state, on top of detseg's Trainer and Net2Net growth.

One trial is a chain of checkpoint files. Each holds the network's architecture (grown networks are not uniform, so
:func:`detseg.growth.architecture` records every layer's width) and the Trainer's whole state: weights, optimiser
moments, epoch counters and the RNG state, so that an epoch resumed from a file - after a revert, or in another
worker process, or after a server restart - continues exactly as it would have in memory.

The network is a :class:`~detseg.models.classification.Classifier` like every detseg classifier - it computes its
own loss - around the player's MLP or convnet, which is what Net2Net grows (``trainer.model.network``). HyperQuest's
data sets are stored already standardised with their training statistics (the page shows those), so the
classifier's own standardisation is the identity here.

The Trainer reports the training loss of an epoch; the game also plots training *accuracy*, which
:class:`TrackingTask` counts from the very logits the loss is computed on - a forward hook on the network's last
layer, during training steps only (so it is the accuracy of the network while it trains, dropout on, like the loss
beside it).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from ..config import TRAIN_OPTIONS
from ..data.classification import ClassificationData
from ..engine.checkpoint import load_checkpoint, save_checkpoint
from ..engine.trainer import Trainer
from ..growth import architecture, deepen, describe, rebuild, widen
from ..models.classification import MLP, Classifier, ConvNet
from ..tasks.base import DataBundle
from ..tasks.classification import ClassificationTask, LabeledInputs
from .settings import MOMENTUM

WIDEN_NOISE = 0.1  # unequal split of a copied unit's outgoing weights, so copies can drift apart (growth.py)


class TrackingTask(ClassificationTask):
    """Classification that also counts the correct predictions of every training step (train accuracy)."""

    def __init__(self) -> None:
        super().__init__(config={})
        self._labels: torch.Tensor | None = None
        self._hook = None
        self.reset()

    def reset(self) -> None:
        self.correct, self.seen = 0, 0

    @property
    def train_accuracy(self) -> float:
        return self.correct / max(1, self.seen)

    def collate(self, batch: list):
        inputs, targets = super().collate(batch)
        self._labels = torch.stack([target["labels"] for target in targets])   # the labels of the next step
        return inputs, targets

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        # (Re-)attached every epoch: growing the network replaces its last layer.
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.network.classifier.register_forward_hook(self._count)

    def _count(self, module: nn.Module, inputs, logits: torch.Tensor) -> None:
        if module.training and self._labels is not None and len(self._labels) == len(logits):
            self.correct += int((logits.detach().argmax(dim=1).cpu() == self._labels).sum())
            self.seen += len(logits)


def build_network(network: dict, input_shape: tuple[int, ...], num_classes: int, dropout: float,
                  seed: int) -> nn.Module:
    """A fresh network from the player's choice ``{"arch", "width", "depth"}``, initialised from ``seed``.

    The convnet has one 3x3 conv block per stage: the CPU budget of one epoch rules out the two of ``cls/convnet``.
    """
    torch.manual_seed(seed)
    if network["arch"] == "convnet":
        return Classifier(ConvNet(tuple(input_shape), num_classes, width=network["width"], depth=network["depth"],
                                  dropout=dropout, convs_per_stage=1))
    return Classifier(MLP(tuple(input_shape), num_classes, width=network["width"], depth=network["depth"],
                          dropout=dropout))


def trainer_config(hparams: dict, seed: int) -> dict:
    """The Trainer's config: the player's knobs, a constant learning rate (the player is the schedule)."""
    config = {key: option.default for key, option in TRAIN_OPTIONS.items()}
    config.update(schedule="constant", warmup_epochs=0.0, checkpoint_seconds=0.0, num_workers=0, momentum=MOMENTUM,
                  seed=seed, lr=hparams["lr"], batch_size=hparams["batch_size"],
                  weight_decay=hparams["weight_decay"], optimizer=hparams["optimizer"])
    return config


def make_trainer(model: nn.Module, data: ClassificationData | None, hparams: dict, seed: int) -> Trainer:
    """A Trainer on ``data`` (None: no data, for growing a checkpoint without training it)."""
    if data is None:
        bundle = DataBundle([], [], {})
    else:
        bundle = DataBundle(LabeledInputs(data.x_train, data.y_train), LabeledInputs(data.x_val, data.y_val),
                            {"num_classes": data.num_classes, "input_shape": list(data.input_shape)})
    return Trainer(model, TrackingTask(), bundle, trainer_config(hparams, seed), progress=False)


def apply_hparams(trainer: Trainer, hparams: dict) -> None:
    """Between epochs: the optimiser's knobs through the Trainer, dropout straight on the network."""
    trainer.set_hparams(lr=hparams["lr"], batch_size=hparams["batch_size"], weight_decay=hparams["weight_decay"],
                        optimizer=hparams["optimizer"])
    trainer.model.network.dropout.p = hparams["dropout"]


# ---- checkpoint files ------------------------------------------------------------------------------------------
def save_state(path: str | Path, trainer: Trainer) -> dict:
    """Write the trainer's state and the network's architecture; returns the architecture."""
    arch = architecture(trainer.model.network)
    save_checkpoint(path, {"architecture": arch, "state": trainer.state_dict()})
    return arch


def restore(path: str | Path, data: ClassificationData | None, hparams: dict, seed: int) -> Trainer:
    """A Trainer continuing from the checkpoint file ``path`` with (possibly changed) ``hparams``."""
    payload = load_checkpoint(path)
    trainer = make_trainer(Classifier(rebuild(payload["architecture"])), data, hparams, seed)
    trainer.load_state_dict(payload["state"])
    apply_hparams(trainer, hparams)
    return trainer


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def train_one_epoch(trainer: Trainer) -> dict:
    """One epoch and a validation pass: losses, accuracies, seconds, and whether training diverged.

    A diverged epoch (a non-finite loss) keeps ``None`` for the non-finite numbers - JSON and SQLite have no NaN.
    """
    task: TrackingTask = trainer.task
    task.reset()
    start = time.perf_counter()
    stats = trainer.run_epoch()
    metrics = trainer.evaluate()
    seconds = time.perf_counter() - start
    diverged = not (math.isfinite(stats["loss"]) and math.isfinite(metrics["val_loss"]))
    return {"epoch": trainer.epoch, "train_loss": _finite_or_none(stats["loss"]),
            "train_acc": task.train_accuracy, "val_loss": _finite_or_none(metrics["val_loss"]),
            "val_acc": float(metrics["top1"]), "diverged": diverged, "seconds": seconds}


# ---- growing ---------------------------------------------------------------------------------------------------
def grow_checkpoint(source: str | Path, target: str | Path, how: str, layer: int, factor: float, hparams: dict,
                    seed: int) -> dict:
    """Net2Net on a checkpoint: ``how`` is "wider" (layer ``layer`` times ``factor``) or "deeper" (a new identity
    layer after ``layer``). The grown network keeps the function; the optimiser starts afresh for its new
    parameters, the epoch counters carry on. Writes ``target``; returns the new architecture and layer table."""
    trainer = restore(source, None, hparams, seed)
    if how == "wider":
        generator = torch.Generator().manual_seed(seed)
        grown = widen(trainer.model.network, layer, factor, generator=generator, noise=WIDEN_NOISE)
    else:
        grown = deepen(trainer.model.network, layer)
    trainer.model.network = grown
    trainer.rebuild_optimizer()
    return {"architecture": save_state(target, trainer), "layers": describe(grown)}

