"""What a player's score is compared with: four baselines the server computes on the same data set.

1. ``majority``: always predict the most frequent training class - the floor any learner must clear.
2. ``logistic_regression``: a linear softmax classifier on the (normalised) inputs - multinomial logistic regression
   with L2 weight decay - trained by SGD for the epoch budget (it is the game's MLP with no hidden layer).
3. ``default_network``: the game's default network with the default hyperparameters.
4. ``random_search``: the best of N random hyperparameter draws (``random_draw_<i>``) - the lecture's advice
   (Bergstra & Bengio 2012) as a player to beat.

Every trained baseline gets the same epoch budget as a player (the epoch limit) and is scored by its best epoch's
validation accuracy: a player who reverts to their best epoch and stops gets exactly that, so it is the fair
comparison. Baselines train exactly like a player does - one epoch per job, each baseline in a lane of its own on the
fair queue - so they never hold a worker for long while people wait, and are never starved: each epoch is one turn
among the players'. Their progress is a database row (:class:`~.db.BaselineRun`), recorded by :mod:`.outcomes`, so
any worker may train a baseline's next epoch and a restart continues where it stopped.
"""
from __future__ import annotations

import math

import numpy as np

from .settings import DEFAULT_HPARAMS, DEFAULT_NETWORK, OPTIMIZERS

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
