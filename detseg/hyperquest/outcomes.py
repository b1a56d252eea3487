"""What a finished piece of work means for the game, written to the database wherever the work ran.

With the in-process queue these run in the server (a worker's answer arrives in a callback); with PostgreSQL they
run in the worker process that did the work, one transaction each. Either way a result is recorded *once*: the row
it changes is locked (``SELECT ... FOR UPDATE`` on PostgreSQL, the game's in-process locks in the embedded server) and checked against what the work was for - the trial still waits for this action, the data set is
still being generated, the baseline's next epoch is this one - so a job retried after its worker died, or run twice
by a retry racing a slow worker, changes nothing the second time.

Follow-up work (a baseline's next epoch, the baselines of a data set just generated) is queued in the same
transaction as the result, so it cannot be lost between the two.
"""
from __future__ import annotations

import logging
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
from sqlalchemy import select, update

from . import work as pieces
from .baselines import baseline_names
from .db import Action, Baseline, BaselineRun, Checkpoint, Database, Dataset, Trial, after_commit, utcnow

log = logging.getLogger("detseg.hyperquest")
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "diverged", "seconds")


@dataclass
class Context:
    """Where results go: the database, the queue for follow-up work, the artifact store (a directory)."""

    db: Database
    queue: object                                  # .queue.LocalQueue or .pgqueue.PostgresQueue: has defer()
    artifacts: Path
    trial_lock: Callable[[int], ContextManager] = field(default=lambda trial_id: nullcontext())
    datasets_lock: ContextManager = field(default_factory=nullcontext)   # the embedded server's: vs new trials


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def started(ctx: Context, work: dict) -> None:
    """A worker took ``work``: an epoch's trial shows ``running`` (if it still waits for that epoch)."""
    if work["kind"] != "epoch":
        return
    args = work["args"]
    with ctx.db.session() as session:
        session.execute(update(Trial).where(Trial.id == args["trial_id"], Trial.pending_action_id == args["action_id"])
                        .values(state="running"))
        session.execute(update(Action).where(Action.id == args["action_id"], Action.status.in_(("queued", "running")))
                        .values(status="running", started_at=utcnow()))


def finished(ctx: Context, work: dict, result: dict | None, error: BaseException | None) -> None:
    """Record the result (or the failure) of ``work``."""
    {"prepare": prepare_done, "epoch": epoch_done, "baseline": baseline_done}[work["kind"]](ctx, work, result, error)


# ---- data sets -------------------------------------------------------------------------------------------------
def prepare_done(ctx: Context, work: dict, summary: dict | None, error: BaseException | None) -> None:
    args = work["args"]
    with ctx.datasets_lock, ctx.db.session() as session:
        dataset = session.get(Dataset, args["dataset_id"], with_for_update=True)
        if dataset is None or dataset.state != "preparing":
            return                                  # recorded already (a retried job)
        waiting = session.scalars(select(Trial).where(Trial.dataset_id == dataset.id, Trial.state == "preparing"))
        if error is not None:
            log.error("generating data set %s failed: %s", dataset.id, error)
            dataset.state = "failed"
            for trial in waiting:
                trial.state, trial.last_error = "failed", f"generating the data set failed: {error}"
            return
        dataset.state, dataset.summary = "ready", summary
        for trial in waiting:
            trial.state = "ready"
        queue_missing_baselines(ctx, session, dataset, args["rules"])


def queue_missing_baselines(ctx: Context, session, dataset: Dataset, rule: dict) -> int:
    """Queue the next epoch of every baseline of ``dataset`` not computed yet; how many were queued."""
    done = set(session.scalars(select(Baseline.name).where(Baseline.dataset_id == dataset.id)))
    runs = {run.name: run for run in session.scalars(select(BaselineRun).where(BaselineRun.dataset_id == dataset.id))}
    queued = 0
    for name in baseline_names(rule["baseline_draws"]):
        if name in done:
            continue
        run = runs.get(name)
        if run is None:
            run = BaselineRun(dataset_id=dataset.id, name=name, epochs_done=0, history=[])
            session.add(run)
            session.flush()
        ctx.queue.defer(session, pieces.baseline(dataset, name, run.epochs_done + 1, run.checkpoint, rule))
        queued += 1
    return queued


# ---- a player's epoch ------------------------------------------------------------------------------------------
def epoch_done(ctx: Context, work: dict, result: dict | None, error: BaseException | None) -> None:
    args = work["args"]
    trial_id, action_id = args["trial_id"], args["action_id"]
    with ctx.trial_lock(trial_id), ctx.db.session() as session:
        trial = session.get(Trial, trial_id, with_for_update=True)
        if trial is None or trial.pending_action_id != action_id:
            return                                  # recorded already (a retried job), or the trial moved on
        record = session.get(Action, action_id)
        trial.pending_action_id = None
        record.finished_at = utcnow()
        if error is not None:
            trial.state = "ready"
            trial.last_error = f"the epoch failed ({_error_text(error)}); try again"
            record.status, record.result = "failed", {"error": _error_text(error)}
            return
        metrics = {key: result[key] for key in EPOCH_METRICS}
        checkpoint = Checkpoint(trial_id=trial_id, parent_id=trial.current_checkpoint_id, kind="epoch",
                                epoch=result["epoch"], path=args["target"], architecture=result["architecture"],
                                layers=result["layers"], hparams=record.payload["hparams"], **metrics)
        session.add(checkpoint)
        session.flush()
        trial.current_checkpoint_id, trial.epoch = checkpoint.id, checkpoint.epoch
        trial.epochs_trained += 1
        trial.last_error = None
        trial.state = "diverged" if checkpoint.diverged else "ready"
        record.status, record.result = "done", {"checkpoint_id": checkpoint.id, "epoch": checkpoint.epoch, **metrics}
        if not checkpoint.diverged and trial.epoch >= args["rules"]["epoch_limit"]:
            finish_trial(session, trial, checkpoint, "epoch_limit")


def finish_trial(session, trial: Trial, checkpoint: Checkpoint, reason: str) -> None:
    """Record the final score: the current checkpoint's validation accuracy (what the player stopped on)."""
    trial.state, trial.stop_reason, trial.finished_at = "finished", reason, utcnow()
    trial.final_val_acc = checkpoint.val_acc if checkpoint.val_acc is not None else 0.0
    trial.final_diverged = checkpoint.diverged
    session.add(Action(player_id=trial.player_id, trial_id=trial.id, kind="stop", payload={"reason": reason},
                       result={"val_acc": trial.final_val_acc, "checkpoint_id": checkpoint.id,
                               "diverged": checkpoint.diverged}, finished_at=utcnow()))


# ---- a baseline's epoch ----------------------------------------------------------------------------------------
def baseline_done(ctx: Context, work: dict, result: dict | None, error: BaseException | None) -> None:
    args = work["args"]
    with ctx.db.session() as session:
        run = session.scalar(select(BaselineRun).where(BaselineRun.dataset_id == args["dataset_id"],
                                                       BaselineRun.name == args["name"]).with_for_update())
        if run is None or run.epochs_done != args["epoch"] - 1:
            return                                  # this epoch is recorded already (a retried job)
        if error is not None:                       # left where it is: a restart of the server queues it again
            log.error("baseline %s of data set %s failed: %s", args["name"], args["dataset_id"], error)
            return
        row = {key: result[key] for key in ("epoch", "train_loss", "val_loss", "val_acc", "diverged", "seconds")}
        previous = run.checkpoint
        run.history = [*run.history, row]
        run.epochs_done, run.checkpoint, run.updated_at = args["epoch"], args["target"], utcnow()
        if previous:
            after_commit(session, lambda: (ctx.artifacts / previous).unlink(missing_ok=True))
        if run.epochs_done < args["rules"]["epoch_limit"] and not result["diverged"]:
            dataset = session.get(Dataset, args["dataset_id"])
            ctx.queue.defer(session, pieces.baseline(dataset, run.name, run.epochs_done + 1, run.checkpoint,
                                                     args["rules"]))
            return
        scores = [item["val_acc"] for item in run.history if not item["diverged"]]
        details = {"network": args["network"], "hparams": args["hparams"], "epochs": len(run.history),
                   "diverged": run.history[-1]["diverged"],
                   "best_epoch": 1 + int(np.argmax(scores)) if scores else None,
                   "seconds": sum(item["seconds"] for item in run.history), "history": run.history}
        exists = session.scalar(select(Baseline.id).where(Baseline.dataset_id == run.dataset_id,
                                                          Baseline.name == run.name))
        if exists is None:
            session.add(Baseline(dataset_id=run.dataset_id, name=run.name, val_acc=max(scores, default=0.0),
                                 details=details))
        directory = ctx.artifacts / "baselines" / str(run.dataset_id) / run.name
        session.delete(run)
        after_commit(session, lambda: shutil.rmtree(directory, ignore_errors=True))


# ---- after a restart of the embedded server ---------------------------------------------------------------------
def recover(ctx: Context, rule: dict) -> tuple[int, int]:
    """Queue again what the in-process queue lost when the server stopped: data sets being generated, epochs queued
    or running (from their trial's last checkpoint), baselines not finished. (PostgreSQL keeps its queue.)"""
    with ctx.db.session() as session:
        preparing = session.scalars(select(Dataset).where(Dataset.state == "preparing")).all()
        for dataset in preparing:
            ctx.queue.defer(session, pieces.prepare(dataset, "server", rule))
        epochs = 0
        for trial in session.scalars(select(Trial).where(Trial.state.in_(("queued", "running")))):
            if trial.pending_action_id is None:
                trial.state = "ready"
                continue
            trial.state = "queued"
            session.get(Action, trial.pending_action_id).status = "queued"
            ctx.queue.defer(session, pieces.epoch(session, trial, trial.pending_action_id, rule))
            epochs += 1
        for dataset in session.scalars(select(Dataset).where(Dataset.state == "ready")):
            queue_missing_baselines(ctx, session, dataset, rule)
    return len(preparing), epochs
