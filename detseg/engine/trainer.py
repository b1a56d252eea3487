"""The step-wise trainer every model and HyperQuest use.

One object owns a model, its optimiser and the training state, and exposes training as small steps a caller can
interleave with anything else: ``run_epoch()``, ``evaluate()``, ``set_hparams()`` between epochs, ``snapshot()`` /
``revert()`` in memory, ``save()`` / ``load()`` on disk. ``fit()`` strings them together for ``detseg train``.

The engine calls the model and nothing else: ``model(images, targets)`` in training mode returns the named losses
(the model computes them; see :mod:`detseg.models`), and evaluation runs ``model(images)`` in eval mode once per
validation batch and hands the outputs to the task's scorer.

Exact resume is a design goal, not an accident. Everything random in training is derived from state we save:
the shuffling order of epoch ``e`` comes from its own generator seeded by (seed, e), augmentation from generators
seeded by (seed, epoch, example), and dropout / sampling inside models from the global torch RNG, whose state goes
into every checkpoint. Evaluation runs on a forked RNG, so it never shifts what training draws next. A run killed
mid-epoch therefore restarts from the last checkpoint, skips the batches it had already seen and continues on the
same trajectory.
"""
from __future__ import annotations

import copy
import math
import random
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..tasks.base import DataBundle, Scorer, Task, to_device
from .checkpoint import save_checkpoint

HPARAMS = ("lr", "weight_decay", "momentum", "batch_size", "grad_clip", "optimizer")


class EpochSampler(torch.utils.data.Sampler):
    """Indices of one epoch: a permutation fixed by (seed, epoch), this process's share of it, minus a prefix.

    Under torchrun every process draws the same permutation and takes every ``world``-th index, padded so that all
    processes run the same number of steps (as DistributedSampler does). ``skip`` drops the first items, for
    resuming in the middle of an epoch.
    """

    def __init__(self, size: int, seed: int, epoch: int, shuffle: bool = True, rank: int = 0, world: int = 1,
                 skip: int = 0):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(size, generator=generator) if shuffle else torch.arange(size)
        per_rank = math.ceil(size / world)
        order = torch.cat([order, order[: per_rank * world - size]])  # pad to a multiple of world
        self.indices = order[rank::world][skip:].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def lr_factor(config: dict, progress: float, epoch_float: float, warmup_fraction: float) -> float:
    """Multiplier of the peak lr. ``progress`` in [0, 1] is how far training is (steps or time budget)."""
    if warmup_fraction > 0 and progress < warmup_fraction:
        return max(progress / warmup_fraction, 1e-3)
    schedule = config["schedule"]
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return config["gamma"] ** int(epoch_float // config["step_epochs"])
    rest = (progress - warmup_fraction) / max(1e-12, 1.0 - warmup_fraction)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, rest))))


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class Trainer:
    """Trains ``model`` on ``bundle`` with the hyperparameters of ``config`` (see :data:`config.TRAIN_OPTIONS`)."""

    def __init__(self, model: nn.Module, task: Task, bundle: DataBundle, config: dict, *,
                 device: torch.device | str = "cpu", rank: int = 0, world: int = 1, progress: bool = True):
        self.task, self.bundle, self.config = task, bundle, dict(config)
        self.device = torch.device(device)
        self.rank, self.world = rank, world
        self.progress = progress and rank == 0
        self.model = model.to(self.device)
        self.ddp_model = self._wrap(self.model)
        self.optimizer = self._build_optimizer()
        # Training state: everything needed to continue exactly where we stopped.
        self.epoch = 0              # completed epochs
        self.step_in_epoch = 0      # batches of the current epoch already trained on (mid-epoch checkpoints)
        self.global_step = 0
        self.train_seconds = 0.0
        self.images_seen = 0
        self.epoch_sums: dict[str, float] = {}   # running loss sums of the current epoch
        self.epoch_images = 0
        self.history: list[dict] = []
        self.best_metric = -math.inf
        self.best_epoch = 0
        self.stopped_by_budget = False
        self._last_checkpoint_time = time.monotonic()
        self._extras: dict[str, Any] = {}   # what checkpoints carry besides the state (model name, config, info)
        self.on_first_step: Callable[[], None] | None = None   # called once, after this process's first step

    # ---- construction -------------------------------------------------------------------------------------------
    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model

    def _build_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if config["optimizer"] == "sgd":
            return torch.optim.SGD(params, lr=config["lr"], momentum=config["momentum"],
                                   weight_decay=config["weight_decay"])
        return torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])

    def rebuild_optimizer(self) -> None:
        """After the set of trainable parameters changed (frozen layers released, a network grown)."""
        self.ddp_model = self._wrap(self.model)
        self.optimizer = self._build_optimizer()

    def set_hparams(self, **changes: Any) -> None:
        """Change hyperparameters between epochs (HyperQuest, schedules of the caller's own)."""
        unknown = set(changes) - set(HPARAMS)
        if unknown:
            raise KeyError(f"not a trainer hyperparameter: {', '.join(sorted(unknown))}")
        rebuild = "optimizer" in changes and changes["optimizer"] != self.config["optimizer"]
        self.config.update(changes)
        if rebuild:
            self.optimizer = self._build_optimizer()
        for group in self.optimizer.param_groups:
            group["weight_decay"] = self.config["weight_decay"]
            if "momentum" in group:
                group["momentum"] = self.config["momentum"]

    # ---- data ---------------------------------------------------------------------------------------------------
    def _loader(self, dataset, sampler, batch_size: int) -> torch.utils.data.DataLoader:
        # A private generator keeps the DataLoader from drawing its worker seed out of the global RNG, which would
        # shift every later dropout mask when a run is resumed (a new iterator is created then, but not otherwise).
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, collate_fn=self.task.collate,
            num_workers=self.config["num_workers"], generator=torch.Generator().manual_seed(0))

    def steps_per_epoch(self) -> int:
        per_rank = math.ceil(len(self.bundle.train) / self.world)
        return math.ceil(per_rank / self.config["batch_size"])

    # ---- training -----------------------------------------------------------------------------------------------
    def _progress_fraction(self) -> float:
        total = max(1, self.config["epochs"] * self.steps_per_epoch())
        fraction = self.global_step / total
        if self.config["time_budget"] > 0:
            fraction = max(fraction, self.train_seconds / self.config["time_budget"])
        return min(1.0, fraction)

    def current_lr(self) -> float:
        warmup = self.config["warmup_epochs"] / max(self.config["epochs"], 1e-9)
        epoch_float = self.epoch + self.step_in_epoch / max(1, self.steps_per_epoch())
        return self.config["lr"] * lr_factor(self.config, self._progress_fraction(), epoch_float, min(warmup, 1.0))

    def budget_exhausted(self) -> bool:
        budget = self.config["time_budget"]
        crossed = budget > 0 and self.train_seconds >= budget
        if self.world > 1:  # every process must take the same decision, or DDP hangs
            flag = torch.tensor([float(crossed)], device=self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            crossed = bool(flag.item() > 0)
        return crossed

    def run_epoch(self, checkpoint_path=None) -> dict[str, float]:
        """Train until the end of the current epoch (or the time budget); returns this epoch's train stats."""
        config = self.config
        sampler = EpochSampler(len(self.bundle.train), config["seed"], self.epoch, shuffle=True, rank=self.rank,
                               world=self.world, skip=self.step_in_epoch * config["batch_size"])
        if hasattr(self.bundle.train, "set_epoch"):
            self.bundle.train.set_epoch(self.epoch)      # augmentation draws from (seed, epoch, index)
        loader = self._loader(self.bundle.train, sampler, config["batch_size"])
        self.task.on_epoch_start(self.model, self.epoch)
        self.model.train()
        bar = tqdm(loader, total=len(loader), desc=f"epoch {self.epoch + 1}",
                   disable=None if self.progress else True,  # None: bars only on a terminal
                   leave=False, dynamic_ncols=True, unit="batch", mininterval=0.5)
        tick = time.perf_counter()  # step time includes loading the batch: throughput is what a user waits for
        for batch in bar:
            if not batch[1]:              # every sample of the batch was skipped (files that failed to decode)
                continue
            lr = self.current_lr()
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            images, targets = to_device(*batch, self.device)
            losses = self.ddp_model(images, targets)
            total = sum(losses.values())
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            if config["grad_clip"] > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), config["grad_clip"])
            self.optimizer.step()
            count = len(images)
            now = time.perf_counter()
            self.train_seconds += now - tick
            tick = now
            self.global_step += 1
            self.step_in_epoch += 1
            if self.on_first_step is not None:
                self.on_first_step()
                self.on_first_step = None
            self.images_seen += count * self.world
            self.epoch_images += count
            for name, value in {"loss": total, **losses}.items():
                self.epoch_sums[name] = self.epoch_sums.get(name, 0.0) + float(value.detach()) * count
            bar.set_postfix(refresh=False, loss=f"{self.epoch_sums['loss'] / self.epoch_images:.4f}", lr=f"{lr:.2e}",
                            img_s=f"{self.images_seen / max(self.train_seconds, 1e-9):.0f}")
            if self.budget_exhausted():
                self.stopped_by_budget = True
                break
            if (checkpoint_path is not None and self.world == 1 and config["checkpoint_seconds"] > 0
                    and time.monotonic() - self._last_checkpoint_time > config["checkpoint_seconds"]):
                self.save(checkpoint_path)
                tick = time.perf_counter()  # saving is not training time
        bar.close()
        stats = {name: total / max(1, self.epoch_images) for name, total in self.epoch_sums.items()}
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        # An epoch cut short by the budget still counts as the last (partial) epoch of the run.
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_sums, self.epoch_images = {}, 0
        return stats

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None, scorer: Scorer | None = None) -> dict[str, Any]:
        """Validation metrics of ``model`` (default: the one being trained), with ``val_loss`` and
        ``infer_ms_per_image``.

        Every module is in eval mode throughout. Per batch: one prediction pass, ``model(images)``, whose outputs
        the task's ``scorer`` scores - ``infer_ms_per_image`` is the time of these passes alone (pre- and
        post-processing in, scoring out); then, for ``val_loss``, the model's ``training_losses`` on the same batch,
        still in eval mode (batch norm on its running statistics, nothing updated). A model that has no losses in
        eval mode (torchvision's detectors) reports a NaN ``val_loss``.
        """
        model = model or self.model
        scorer = scorer or self.task.scorer(self.bundle)
        loader = self._loader(self.bundle.val, EpochSampler(len(self.bundle.val), 0, 0, shuffle=False),
                              self.config["batch_size"])
        was_training = model.training
        model.eval()
        infer_seconds, loss_sum, loss_images, count = 0.0, 0.0, 0, 0
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)                      # the same val_loss for the same weights, whatever came before
            for batch in loader:
                if not batch[1]:          # every sample of the batch was skipped (files that failed to decode)
                    continue
                images, targets = to_device(*batch, self.device)
                self._synchronize()
                start = time.perf_counter()
                outputs = model(images)
                self._synchronize()
                infer_seconds += time.perf_counter() - start
                scorer.update(outputs, targets)
                losses = getattr(model, "module", model).training_losses(images, targets)
                if losses:
                    loss_sum += float(sum(losses.values())) * len(images)
                    loss_images += len(images)
                count += len(images)
        model.train(was_training)
        metrics = scorer.compute()
        metrics["val_loss"] = loss_sum / loss_images if loss_images else math.nan
        metrics["infer_ms_per_image"] = 1000.0 * infer_seconds / max(1, count)
        return metrics

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def record_epoch(self, train_stats: dict, metrics: dict | None, seconds: float) -> dict:
        """Append one history row (the history.csv contract: epoch, seconds, lr, train_loss, val_loss, metric)."""
        main = self.task.main_metric
        row = {"epoch": self.epoch, "seconds": round(seconds, 3), "lr": train_stats.get("lr", 0.0),
               "train_loss": train_stats.get("loss", math.nan),
               "val_loss": (metrics or {}).get("val_loss", math.nan),
               main: (metrics or {}).get(main, math.nan)}
        for name, value in train_stats.items():
            if name not in ("loss", "lr"):
                row[f"train_{name}"] = value
        self.history.append(row)
        if metrics is not None and metrics.get(main, -math.inf) > self.best_metric:
            self.best_metric, self.best_epoch = metrics[main], self.epoch
        return row

    # ---- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "trainer": {
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "train_seconds": self.train_seconds, "images_seen": self.images_seen,
                "epoch_sums": dict(self.epoch_sums), "epoch_images": self.epoch_images,
                "history": copy.deepcopy(self.history), "best_metric": self.best_metric,
                "best_epoch": self.best_epoch, "stopped_by_budget": self.stopped_by_budget,
                "config": dict(self.config), "rng": _rng_state(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        trainer = state["trainer"]
        self.config.update({key: trainer["config"][key] for key in HPARAMS if key in trainer["config"]})
        self.optimizer = self._build_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        for key in ("epoch", "step_in_epoch", "global_step", "train_seconds", "images_seen", "epoch_images",
                    "best_metric", "best_epoch", "stopped_by_budget"):
            setattr(self, key, trainer[key])
        self.epoch_sums = dict(trainer["epoch_sums"])
        self.history = copy.deepcopy(trainer["history"])
        _set_rng_state(trainer["rng"])

    def snapshot(self) -> dict[str, Any]:
        """An in-memory copy of the whole training state (HyperQuest's checkpoints)."""
        return copy.deepcopy(self.state_dict())

    def revert(self, snapshot: dict[str, Any]) -> None:
        self.load_state_dict(copy.deepcopy(snapshot))

    def save(self, path, **extra: Any) -> None:
        if self.rank != 0:
            return
        save_checkpoint(path, {**self.state_dict(), **extra, **self._extras})
        self._last_checkpoint_time = time.monotonic()

    def set_checkpoint_extras(self, **extras: Any) -> None:
        """What every checkpoint carries besides the state, so it can be used alone (model name, config, info)."""
        self._extras = extras
