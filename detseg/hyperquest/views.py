"""Read-only projections of the records: what the page shows of a trial, the leaderboards, the research export.

Nothing here changes state. A trial's shown history is the *lineage* of its current checkpoint - the chain of
parents back to the first epoch - so after a revert to epoch 2 the plots show epochs 1-2 again, and the abandoned
epochs stay in the database (and the export) for research.
"""
from __future__ import annotations

import csv
import io
import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from .baselines import majority_accuracy, summarize_baselines
from .db import TABLES, Baseline, Checkpoint, Dataset, Player, Trial, iso_utc, row_dict


def lineage(session: Session, trial: Trial) -> list[Checkpoint]:
    """The current checkpoint and its ancestors, oldest first."""
    if trial.current_checkpoint_id is None:
        return []
    by_id = {c.id: c for c in session.scalars(select(Checkpoint).where(Checkpoint.trial_id == trial.id))}
    chain, node = [], by_id.get(trial.current_checkpoint_id)
    while node is not None:
        chain.append(node)
        node = by_id.get(node.parent_id)
    return chain[::-1]


def _metrics(checkpoint: Checkpoint) -> dict:
    return {"train_loss": checkpoint.train_loss, "train_acc": checkpoint.train_acc,
            "val_loss": checkpoint.val_loss, "val_acc": checkpoint.val_acc, "diverged": checkpoint.diverged}


def dataset_view(dataset: Dataset) -> dict:
    return {"id": dataset.id, "pool_index": dataset.pool_index, "state": dataset.state, "name": dataset.spec["name"],
            "summary": dataset.summary}


def baselines_of(session: Session, dataset: Dataset, draws: int) -> dict:
    rows = {b.name: b.val_acc for b in session.scalars(select(Baseline).where(Baseline.dataset_id == dataset.id))}
    return summarize_baselines(rows, dataset.summary, draws)


def trial_view(session: Session, trial: Trial, *, epoch_limit: int, draws: int, queue_ahead: int | None) -> dict:
    """Everything the trial page needs in one answer (the page polls it while an epoch runs)."""
    dataset = session.get(Dataset, trial.dataset_id)
    chain = lineage(session, trial)
    current = chain[-1] if chain else None
    history = [{"epoch": c.epoch, "checkpoint_id": c.id, "seconds": c.seconds, "hparams": c.hparams, **_metrics(c)}
               for c in chain if c.kind == "epoch"]
    view = {
        "id": trial.id, "state": trial.state, "epoch": trial.epoch, "epoch_limit": epoch_limit,
        "epochs_trained": trial.epochs_trained, "hparams": trial.hparams, "network": trial.network,
        "queue_ahead": queue_ahead, "last_error": trial.last_error, "dataset": dataset_view(dataset),
        "history": history,
        "checkpoints": [{"id": c.id, "epoch": c.epoch, "kind": c.kind, "note": c.note, "val_acc": c.val_acc,
                         "diverged": c.diverged, "current": c is current} for c in chain],
        "architecture": current.architecture if current else None,
        "layers": current.layers if current else None,
        "final": None, "baselines": None,
    }
    if trial.state == "finished":
        view["final"] = {"val_acc": trial.final_val_acc, "diverged": trial.final_diverged,
                         "reason": trial.stop_reason, "skill": skill(trial.final_val_acc, dataset.summary)}
        view["baselines"] = baselines_of(session, dataset, draws)
    return view


def skill(val_acc: float | None, summary: dict | None) -> float | None:
    """Accuracy rescaled so that data sets compare: 0 = no better than the majority class, 1 = perfect."""
    if val_acc is None or not summary:
        return None
    floor = majority_accuracy(summary)
    return (val_acc - floor) / (1.0 - floor) if floor < 1.0 else 0.0


def leaderboard(session: Session, draws: int, dataset_id: int | None = None, limit: int = 100) -> dict:
    """Finished trials overall (ranked by skill, since raw accuracies of different data sets do not compare) and
    per data set (ranked by validation accuracy, beside that data set's baselines). Players appear by name only."""
    query = (select(Trial, Player.name, Dataset).join(Player, Trial.player_id == Player.id)
             .join(Dataset, Trial.dataset_id == Dataset.id).where(Trial.state == "finished"))
    entries = []
    for trial, name, dataset in session.execute(query):
        entries.append({"trial_id": trial.id, "player": name, "dataset_id": dataset.id,
                        "pool_index": dataset.pool_index, "dataset": dataset.spec["name"],
                        "val_acc": trial.final_val_acc, "skill": skill(trial.final_val_acc, dataset.summary),
                        "diverged": trial.final_diverged, "epochs": trial.epoch,
                        "finished_at": iso_utc(trial.finished_at) if trial.finished_at else None})
    overall = sorted(entries, key=lambda e: (-(e["skill"] if e["skill"] is not None else -1e9), e["trial_id"]))
    shown_ids = {dataset_id} if dataset_id is not None else {e["dataset_id"] for e in entries}
    per_dataset = []
    for dataset in session.scalars(select(Dataset).where(Dataset.id.in_(shown_ids)).order_by(Dataset.pool_index)):
        mine = sorted((e for e in entries if e["dataset_id"] == dataset.id),
                      key=lambda e: (-(e["val_acc"] or 0.0), e["trial_id"]))
        per_dataset.append({**dataset_view(dataset), "entries": mine[:limit],
                            "baselines": baselines_of(session, dataset, draws)})
    return {"overall": overall[:limit], "datasets": per_dataset}


def export_rows(session: Session, table: str) -> list[dict]:
    model = TABLES[table]
    return [row_dict(row) for row in session.scalars(select(model).order_by(model.id))]


def to_csv(rows: list[dict]) -> str:
    """One CSV table; nested values (payloads, hyperparameters, architectures) as JSON text in their cell."""
    buffer = io.StringIO()
    if not rows:
        return ""
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({key: json.dumps(value) if isinstance(value, (dict, list)) else value
                         for key, value in row.items()})
    return buffer.getvalue()
