"""What a player's score is compared with: four baselines the server computes on the same data set.

1. ``majority``: always predict the most frequent training class - the floor any learner must clear.
2. ``logistic_regression``: a linear classifier on the (normalised) inputs, scikit-learn's L2-regularised one.
3. ``default_network``: the game's default network with the default hyperparameters, trained for the epoch limit.
4. ``random_search``: the best of N random hyperparameter draws (``random_draw_<i>``), each trained for the same
   epoch budget - the lecture's advice (Bergstra & Bengio 2012) as a player to beat.

Networks are scored by their best epoch's validation accuracy: a player who reverts to their best epoch and stops
gets exactly that, so it is the fair comparison. Each baseline is its own background job (the server's lane of the
fair queue), so they fill in one by one while people play.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from .settings import DEFAULT_HPARAMS, DEFAULT_NETWORK, OPTIMIZERS
from .tasks import load_dataset
from .training import fit

JOB_BASELINES = ("logistic_regression", "default_network")


def baseline_names(draws: int) -> list[str]:
    """The baselines computed by background jobs (majority is counted directly from the data set's summary)."""
    return [*JOB_BASELINES, *(f"random_draw_{index}" for index in range(draws))]


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


def logistic_regression(data) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x_train = data.x_train.flatten(1).numpy()            # (N, *input_shape) -> (N, D)
    x_val = data.x_val.flatten(1).numpy()
    classifier = LogisticRegression(max_iter=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 200 lbfgs steps is the budget, converged or not
        classifier.fit(x_train, data.y_train.numpy())
    accuracy = float((classifier.predict(x_val) == data.y_val.numpy()).mean())
    return {"val_acc": accuracy, "details": {"max_iter": 200, "iterations": int(np.max(classifier.n_iter_))}}


def baseline_job(name: str, dataset_path: str, epochs: int, seed: int) -> dict:
    """Compute baseline ``name`` (a :func:`baseline_names` entry) on the stored data set (runs in a worker)."""
    data = load_dataset(dataset_path)
    if name == "logistic_regression":
        return logistic_regression(data)
    if name == "default_network":
        network, hparams = dict(DEFAULT_NETWORK), dict(DEFAULT_HPARAMS)
    elif name.startswith("random_draw_"):
        network, hparams = random_configuration(np.random.default_rng([seed, int(name.rsplit("_", 1)[1])]))
    else:
        raise ValueError(f"unknown baseline {name!r}")
    outcome = fit(data, network, hparams, epochs, seed)
    return {"val_acc": outcome["best_val_acc"] or 0.0,
            "details": {"network": network, "hparams": hparams, **outcome}}


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
