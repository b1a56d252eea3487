"""The pieces of work the game queues - generate a data set, train a trial's epoch, train a baseline's epoch - as
plain JSON, built from the database rows they are about.

The same object goes to the in-process queue and to the PostgreSQL one (as a procrastinate job's arguments)::

    {"kind": "prepare" | "epoch" | "baseline",
     "lane": "player:7",                       # fairness: one running job per lane, lanes take turns
     "key": "trial:12:epoch:3",                # at most one waiting job per key
     "args": {...}}                            # what the job and the recording of its result need

Paths in ``args`` are relative to the artifact store (``Settings.artifacts``), which each worker reaches under its own
root; and ``args`` carries the rules that decide what a result means (the epoch limit, how many random-search draws),
so that a worker started on another machine needs nothing but the database URL and the store.
"""
from __future__ import annotations

import uuid

from .baselines import configuration
from .db import Action, Checkpoint, Dataset, Trial

BASELINE_SEED = 7919


def player_lane(player_id: int) -> str:
    return f"player:{player_id}"


def rules(settings) -> dict:
    return {"epoch_limit": settings.epoch_limit, "baseline_draws": settings.baseline_draws}


def new_checkpoint_path(trial_id: int) -> str:
    """A fresh file name per queued epoch: a retry of the same job writes the same file, a new epoch another."""
    return f"trials/{trial_id}/{uuid.uuid4().hex}.pt"


def prepare(dataset: Dataset, lane: str, rule: dict) -> dict:
    return {"kind": "prepare", "lane": lane, "key": f"dataset:{dataset.id}",
            "args": {"dataset_id": dataset.id, "spec": dict(dataset.spec), "path": dataset.path, "rules": rule}}


def epoch(session, trial: Trial, action_id: int, rule: dict) -> dict:
    """Train the epoch that action ``action_id`` asked for, from the trial's current checkpoint."""
    dataset = session.get(Dataset, trial.dataset_id)
    source = session.get(Checkpoint, trial.current_checkpoint_id) if trial.current_checkpoint_id else None
    action = session.get(Action, action_id)
    return {"kind": "epoch", "lane": player_lane(trial.player_id), "key": f"trial:{trial.id}:epoch:{trial.epoch + 1}",
            "args": {"trial_id": trial.id, "action_id": action_id, "dataset_path": dataset.path,
                     "source": source.path if source else None, "target": new_checkpoint_path(trial.id),
                     "network": trial.network, "hparams": action.payload["hparams"], "seed": trial.seed,
                     "rules": rule}}


def baseline(dataset: Dataset, name: str, epoch_number: int, source: str | None, rule: dict) -> dict:
    """Epoch ``epoch_number`` of baseline ``name``: each baseline run is a lane of its own, so every baseline gets a
    turn per round like a player does (baselines are never starved, and never crowd the players out)."""
    seed = BASELINE_SEED * (dataset.pool_index + 1)
    network, hparams = configuration(name, seed)
    return {"kind": "baseline", "lane": f"baseline:{dataset.id}:{name}",
            "key": f"baseline:{dataset.id}:{name}:{epoch_number}",
            "args": {"dataset_id": dataset.id, "name": name, "epoch": epoch_number, "dataset_path": dataset.path,
                     "source": source, "target": f"baselines/{dataset.id}/{name}/epoch{epoch_number}.pt",
                     "network": network, "hparams": hparams, "seed": seed, "rules": rule}}


def describe(work: dict) -> str:
    args = work["args"]
    if work["kind"] == "prepare":
        return f"generate data set {args['dataset_id']}"
    if work["kind"] == "epoch":
        return f"epoch of trial {args['trial_id']} (action {args['action_id']})"
    return f"epoch {args['epoch']} of baseline {args['name']} on data set {args['dataset_id']}"
