"""What a player's score is compared with: four baselines the server computes on the same data set.

1. ``majority``: always predict the most frequent training class - the floor any learner must clear.
2. ``logistic_regression``: a linear softmax classifier on the (normalised) inputs - multinomial logistic regression
   with L2 weight decay - trained by SGD for the epoch budget (it is the game's MLP with no hidden layer).
3. ``default_network``: the game's default network with the default hyperparameters.
4. ``random_search``: the best of N random hyperparameter draws (``random_draw_<i>``) - the lecture's advice
   (Bergstra & Bengio 2012) as a player to beat.

Every trained baseline gets the same epoch budget as a player (the epoch limit) and is scored by its best epoch's
validation accuracy: a player who reverts to their best epoch and stops gets exactly that, so it is the fair
comparison. Baselines train exactly like a player does - one epoch per job, on the fair queue, in the server's own
lane - so they never hold a worker for long while people wait: each epoch is one turn among the players'.
"""
from __future__ import annotations

import math
import shutil
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from sqlalchemy import select

from .db import Baseline, Database, Dataset
from .jobs import epoch_job
from .settings import DEFAULT_HPARAMS, DEFAULT_NETWORK, OPTIMIZERS, Settings
from .worker import FairQueue, Job, log

TRAINED = ("logistic_regression", "default_network")
LINEAR = {"arch": "mlp", "width": 1, "depth": 0}   # no hidden layer: the classifier alone is logistic regression


def baseline_names(draws: int) -> list[str]:
    """The baselines computed by training (majority is counted directly from the data set's summary)."""
    return [*TRAINED, *(f"random_draw_{index}" for index in range(draws))]


def majority_accuracy(summary: dict) -> float:
    """Validation accuracy of predicting the most frequent *training* class."""
    majority = int(np.argmax(summary["class_counts_train"]))
    return summary["class_counts_val"][majority] / max(1, sum(summary["class_counts_val"]))


def random_configuration(rng: np.random.Generator) -> tuple[dict, dict]:
    """One random-search draw: learning rate and weight decay log-uniform (their scale is what matters), width
    log-uniform over 32-1024 units, depth 1-4, dropout uniform in [0, 0.6], a batch size and an optimiser."""
    network = {"arch": "mlp", "width": int(round(math.exp(rng.uniform(math.log(32), math.log(1024))))),
               "depth": int(rng.integers(1, 5))}
    hparams = {"lr": float(10 ** rng.uniform(-4, math.log10(0.5))), "dropout": float(rng.uniform(0.0, 0.6)),
               "batch_size": int(rng.choice([32, 64, 128, 256])), "weight_decay": float(10 ** rng.uniform(-6, -2)),
               "optimizer": str(rng.choice(OPTIMIZERS))}
    return network, hparams


def configuration(name: str, seed: int) -> tuple[dict, dict]:
    """The network and hyperparameters of baseline ``name``."""
    if name == "logistic_regression":
        return dict(LINEAR), dict(DEFAULT_HPARAMS)
    if name == "default_network":
        return dict(DEFAULT_NETWORK), dict(DEFAULT_HPARAMS)
    if name.startswith("random_draw_"):
        return random_configuration(np.random.default_rng([seed, int(name.rsplit("_", 1)[1])]))
    raise ValueError(f"unknown baseline {name!r}")


def summarize_baselines(rows: dict[str, float | None], summary: dict | None, draws: int) -> dict:
    """The four baselines of a data set for the page: ``None`` where still being computed."""
    done_draws = [rows[f"random_draw_{i}"] for i in range(draws) if rows.get(f"random_draw_{i}") is not None]
    return {
        "majority": majority_accuracy(summary) if summary else None,
        "logistic_regression": rows.get("logistic_regression"),
        "default_network": rows.get("default_network"),
        "random_search": max(done_draws) if len(done_draws) == draws else None,
        "random_search_draws_done": len(done_draws), "random_search_draws": draws,
    }


@dataclass
class _Run:
    """One baseline being trained: where it is, and what it has scored so far."""

    dataset_id: int
    name: str
    data_path: str
    directory: Path
    network: dict
    hparams: dict
    seed: int
    epochs: int
    history: list[dict] = field(default_factory=list)

    @property
    def last_checkpoint(self) -> str | None:
        return str(self.directory / f"epoch{len(self.history)}.pt") if self.history else None


class BaselineRunner:
    """Queues the missing baselines of a data set and records them when their last epoch is done.

    Progress lives in memory (and checkpoint files); a server restart trains unfinished baselines from scratch.
    """

    def __init__(self, settings: Settings, database: Database, queue: FairQueue):
        self.settings, self.db, self.queue = settings, database, queue
        self._running: set[tuple[int, str]] = set()
        self._lock = threading.Lock()

    def queue_missing(self, dataset_id: int) -> None:
        with self.db.session() as session:
            dataset = session.get(Dataset, dataset_id)
            done = set(session.scalars(select(Baseline.name).where(Baseline.dataset_id == dataset_id)))
            data_path, seed = str(self.settings.data_dir / dataset.path), 7919 * (dataset.pool_index + 1)
        for name in baseline_names(self.settings.baseline_draws):
            with self._lock:
                if name in done or (dataset_id, name) in self._running:
                    continue
                self._running.add((dataset_id, name))
            network, hparams = configuration(name, seed)
            directory = self.settings.data_dir / "baselines" / str(dataset_id) / name
            shutil.rmtree(directory, ignore_errors=True)       # leftovers of an interrupted run
            self._queue_epoch(_Run(dataset_id, name, data_path, directory, network, hparams, seed,
                                   self.settings.epoch_limit))

    def _queue_epoch(self, run: _Run, front: bool = False) -> None:
        target = str(run.directory / f"epoch{len(run.history) + 1}.pt")
        args = (run.data_path, run.last_checkpoint, target, run.network, run.hparams, run.seed)
        # The next epoch of a run goes to the front of the server's lane: one baseline finishes before the next.
        self.queue.submit(Job("server", epoch_job, args, name=f"baseline {run.name} of data set {run.dataset_id}",
                              on_done=partial(self._epoch_done, run)), front=front)

    def _epoch_done(self, run: _Run, result: dict | None, error: BaseException | None) -> None:
        if error is not None:          # left missing: the next server start tries again
            log.error("baseline %s of data set %s failed: %s", run.name, run.dataset_id, error)
            with self._lock:
                self._running.discard((run.dataset_id, run.name))
            return
        run.history.append({key: result[key] for key in ("epoch", "train_loss", "val_loss", "val_acc", "diverged",
                                                          "seconds")})
        if len(run.history) > 1:
            Path(run.directory / f"epoch{len(run.history) - 1}.pt").unlink(missing_ok=True)
        if len(run.history) < run.epochs and not result["diverged"]:
            return self._queue_epoch(run, front=True)
        self._record(run)

    def _record(self, run: _Run) -> None:
        scores = [row["val_acc"] for row in run.history if not row["diverged"]]
        details = {"network": run.network, "hparams": run.hparams, "epochs": len(run.history),
                   "diverged": run.history[-1]["diverged"], "best_epoch": 1 + int(np.argmax(scores)) if scores else None,
                   "seconds": sum(row["seconds"] for row in run.history), "history": run.history}
        with self.db.session() as session:
            exists = session.scalar(select(Baseline.id).where(Baseline.dataset_id == run.dataset_id,
                                                              Baseline.name == run.name))
            if exists is None:
                session.add(Baseline(dataset_id=run.dataset_id, name=run.name, val_acc=max(scores, default=0.0),
                                     details=details))
        shutil.rmtree(run.directory, ignore_errors=True)
        with self._lock:
            self._running.discard((run.dataset_id, run.name))
