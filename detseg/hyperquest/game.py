"""The trial state machine: what a player may do when, what it changes, and the log of all of it.

A trial moves through these states::

    preparing --(data set generated)--> ready --train--> queued --(a worker takes it)--> running
    running --(epoch done)--> ready | diverged (a NaN/inf loss) | finished (the epoch limit)
    ready --grow--> ready        ready | diverged --revert--> ready | diverged        ready | diverged --stop--> finished

Every request that changes something is an :class:`~.db.Action` row; a refused one is logged as ``rejected`` with
its reason, because what players *try* is research data too. Epochs are the only slow action: they are queued (in
the same transaction as the action that asked for them, see :mod:`.queue`) and recorded by :mod:`.outcomes` when a
worker is done. Growing is a Net2Net transform of one checkpoint (milliseconds), reverting and stopping only move
pointers, so those answer at once.

Concurrency: a trial's row is locked (``SELECT ... FOR UPDATE`` on PostgreSQL, where several web processes and
workers share it; an in-process lock per trial in the embedded server) while an action or an epoch result changes
it. State only ever changes in the database: a restarted embedded server picks up every trial where it was
(:func:`.outcomes.recover`), and PostgreSQL's queue outlives any one process.
"""
from __future__ import annotations

import random
import threading
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from . import outcomes, schemas, work as pieces
from .db import Action, Checkpoint, Database, Dataset, Player, Trial, utcnow
from .jobs import grow_job, warm_up
from .queue import make_queue
from .settings import DEFAULT_HPARAMS, DEFAULT_NETWORK, MAX_BLOCKS, MAX_WIDTH, Settings
from .tasks import cache_path, pool_spec
from .views import export_rows, leaderboard, lineage, trial_view
from .worker import log


class GameError(Exception):
    """A request the game refuses; ``status`` is the HTTP status the API answers with."""

    status = 400


class NotFound(GameError):
    status = 404


class Forbidden(GameError):
    status = 403


class Conflict(GameError):
    """Not possible in the trial's current state (an epoch is running, the trial is finished, ...)."""

    status = 409


class Invalid(GameError):
    """Well-formed but impossible for this trial (a layer index it does not have, a width over the cap)."""

    status = 422


# Which states allow which action, and how to explain a refusal.
ALLOWED = {"train": {"ready"}, "grow": {"ready"}, "revert": {"ready", "diverged"}, "stop": {"ready", "diverged"}}
WHY_NOT = {
    "preparing": "the data set is still being generated",
    "queued": "an epoch is queued; wait for it to finish",
    "running": "an epoch is running; wait for it to finish",
    "diverged": "the last epoch diverged (NaN/inf loss): revert to an earlier epoch, or stop",
    "finished": "this trial is finished; start a new one",
    "failed": "this trial's data set could not be generated; start a new one",
    "ready": "",
}


class Game:
    """HyperQuest's rules on top of a database and a queue of background work (:func:`.queue.make_queue`)."""

    def __init__(self, settings: Settings, database: Database | None = None, queue=None):
        self.settings = settings
        self.db = database or Database(settings.db_url)
        self.queue = queue or make_queue(settings)
        self._trial_locks: dict[int, threading.RLock] = {}
        self._guard = threading.Lock()          # guards the lock table, player creation, data set creation
        self._random = random.SystemRandom()
        self.context = outcomes.Context(self.db, self.queue, settings.artifacts, trial_lock=self._lock,
                                        datasets_lock=self._guard)
        self.rules = pieces.rules(settings)

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def create_tables(self) -> None:
        """The game's tables, and the queue's where it has some (procrastinate's, on PostgreSQL)."""
        self.db.create_all()
        self.queue.create_tables()

    def start(self) -> None:
        self.create_tables()
        self.queue.start(self.context)
        if self.queue.local:
            self.recover()
        # Growing runs torch in this process: import it now, in the background, not in a player's first request.
        threading.Thread(target=warm_up, name="hyperquest-warm-up", daemon=True).start()

    def stop(self) -> None:
        self.queue.stop()
        self.db.dispose()

    def recover(self) -> None:
        """Queue again whatever the in-process queue held when the server stopped: data sets, epochs, baselines."""
        preparing, epochs = outcomes.recover(self.context, self.rules)
        if preparing or epochs:
            log.info("recovered %d data set(s) and %d epoch(s) from the last run", preparing, epochs)

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _path(self, relative: str) -> str:
        return str(self.settings.artifacts / relative)

    def _lock(self, trial_id: int) -> threading.RLock:
        with self._guard:
            return self._trial_locks.setdefault(trial_id, threading.RLock())

    @staticmethod
    def _player(session, player_id: int) -> Player:
        player = session.get(Player, player_id)
        if player is None:
            raise NotFound("unknown player: log in again")
        return player

    @staticmethod
    def _own_trial(session, player_id: int, trial_id: int, lock: bool = False) -> Trial:
        """The trial if it is this player's; someone else's trial is as absent as a missing one (404). ``lock``:
        hold its row until the transaction ends (PostgreSQL), so that an epoch result or another web process's
        request for the same trial waits for this one."""
        trial = session.get(Trial, trial_id, with_for_update=lock)
        if trial is None or trial.player_id != player_id:
            raise NotFound(f"no trial {trial_id} of yours")
        return trial

    @staticmethod
    def _require(trial: Trial, verb: str) -> None:
        if trial.state not in ALLOWED[verb]:
            raise Conflict(f"cannot {verb}: {WHY_NOT.get(trial.state, trial.state)}")

    @staticmethod
    def _current_checkpoint(session, trial: Trial, verb: str) -> Checkpoint:
        """The checkpoint the trial stands on; growing or stopping needs one (at least one trained epoch)."""
        if trial.current_checkpoint_id is None:
            raise Conflict(f"cannot {verb}: train at least one epoch first")
        return session.get(Checkpoint, trial.current_checkpoint_id)

    def _log_rejection(self, player_id: int, trial_id: int | None, kind: str, payload: dict, error: GameError):
        with self.db.session() as session:
            session.add(Action(player_id=player_id, trial_id=trial_id, kind=kind, payload=payload,
                               status="rejected", result={"status": error.status, "reason": str(error)},
                               finished_at=utcnow()))

    # ---- players ------------------------------------------------------------------------------------------------
    def login(self, handle: str, name: str) -> dict:
        """Log in as ``handle``, creating the player on first use; the name must match the one given then."""
        try:
            return self._login(handle, name)
        except IntegrityError:                  # another web process created this player a moment ago
            return self._login(handle, name)

    def _login(self, handle: str, name: str) -> dict:
        with self._guard, self.db.session() as session:
            player = session.scalar(select(Player).where(Player.handle == handle))
            if player is None:
                player = Player(handle=handle, name=name)
                session.add(player)
                session.flush()
            elif player.name.casefold() != name.casefold():
                raise Forbidden(f"player ID {handle!r} belongs to someone with another name")
            session.add(Action(player_id=player.id, kind="login", payload={"name": name}))
            return self._player_view(session, player)

    def player(self, player_id: int) -> dict:
        with self.db.session() as session:
            return self._player_view(session, self._player(session, player_id))

    @staticmethod
    def _player_view(session, player: Player) -> dict:
        trials = session.scalars(select(Trial).where(Trial.player_id == player.id).order_by(Trial.id)).all()
        open_trials = [t.id for t in trials if t.state not in ("finished", "failed")]
        return {"id": player.id, "player_id": player.handle, "name": player.name,
                "survey_done": player.survey is not None, "trials": [t.id for t in trials],
                "active_trial": open_trials[-1] if open_trials else None}

    def submit_survey(self, player_id: int, answers: dict) -> dict:
        with self.db.session() as session:
            player = self._player(session, player_id)
            player.survey, player.survey_at = dict(answers), utcnow()
            session.add(Action(player_id=player_id, kind="survey", payload=dict(answers)))
            return self._player_view(session, player)

    # ---- trials -------------------------------------------------------------------------------------------------
    def new_trial(self, player_id: int) -> dict:
        """Draw a data set from the pool (one this player has not played, while there are any) and start a trial."""
        try:
            return self._new_trial(player_id)
        except IntegrityError:                  # another web process created this data set's row a moment ago
            return self._new_trial(player_id)

    def _new_trial(self, player_id: int) -> dict:
        with self._guard, self.db.session() as session:
            player = self._player(session, player_id)
            if player.survey is None:
                error = Conflict("answer the survey before your first trial")
                self._log_rejection(player_id, None, "new_trial", {}, error)
                raise error
            played = set(session.scalars(select(Dataset.pool_index).join(Trial, Trial.dataset_id == Dataset.id)
                                         .where(Trial.player_id == player_id)))
            fresh = [i for i in range(self.settings.dataset_pool) if i not in played]
            pool_index = self._random.choice(fresh or list(range(self.settings.dataset_pool)))
            dataset = session.scalar(select(Dataset).where(Dataset.pool_index == pool_index))
            if dataset is None:
                spec = pool_spec(self.settings.pool_seed, pool_index, self.settings.train_range,
                                 self.settings.val_range)
                path = cache_path(self.settings.artifacts, pool_index, spec).relative_to(self.settings.artifacts)
                dataset = Dataset(pool_index=pool_index, spec=spec, path=str(path))
                session.add(dataset)
                session.flush()
            session.refresh(dataset, with_for_update=True)      # one web process at a time decides to generate it
            if dataset.state == "ready" and not Path(self._path(dataset.path)).is_file():
                dataset.state = "new"                # the cache file was deleted: generate it again
            prepare = dataset.state in ("new", "failed")
            if prepare:
                dataset.state = "preparing"
            trial = Trial(player_id=player_id, dataset_id=dataset.id, seed=self._random.randrange(2 ** 31),
                          state="ready" if dataset.state == "ready" else "preparing", hparams=dict(DEFAULT_HPARAMS))
            session.add(trial)
            session.flush()
            session.add(Action(player_id=player_id, trial_id=trial.id, kind="new_trial",
                               payload={"dataset_id": dataset.id, "pool_index": pool_index}))
            if prepare:
                self.queue.defer(session, pieces.prepare(dataset, pieces.player_lane(player_id), self.rules))
            trial_id = trial.id
        return self.view(player_id, trial_id)

    def view(self, player_id: int, trial_id: int) -> dict:
        with self.db.session() as session:
            trial = self._own_trial(session, player_id, trial_id)
            ahead = self.queue.place(session, pieces.player_lane(player_id)) if trial.state == "queued" else None
            return trial_view(session, trial, epoch_limit=self.settings.epoch_limit,
                              draws=self.settings.baseline_draws, queue_ahead=ahead)

    def trials(self, player_id: int) -> list[dict]:
        with self.db.session() as session:
            rows = session.scalars(select(Trial).where(Trial.player_id == player_id).order_by(Trial.id))
            return [{"id": t.id, "state": t.state, "epoch": t.epoch, "final_val_acc": t.final_val_acc} for t in rows]

    def act(self, player_id: int, trial_id: int, action: schemas.BaseModel) -> dict:
        """Apply one of the trial actions (train, grow, revert, stop) and return the updated trial."""
        handlers = {"train": self._train, "grow": self._grow, "revert": self._revert, "stop": self._stop}
        with self._lock(trial_id):
            try:
                handlers[action.action](player_id, trial_id, action)
            except (Conflict, Invalid) as error:
                self._log_rejection(player_id, trial_id, action.action, action.model_dump(), error)
                raise
        return self.view(player_id, trial_id)

    # ---- training -----------------------------------------------------------------------------------------------
    def _train(self, player_id: int, trial_id: int, action: schemas.TrainAction) -> None:
        with self.db.session() as session:
            trial = self._own_trial(session, player_id, trial_id, lock=True)
            self._require(trial, "train")
            if trial.current_checkpoint_id is None:
                network = action.network.model_dump() if action.network else (trial.network or DEFAULT_NETWORK)
                kind = session.get(Dataset, trial.dataset_id).summary["kind"]
                if network["arch"] == "convnet" and kind != "image":
                    raise Invalid("a convnet needs image data; this data set is vectors (use mlp)")
                trial.network = dict(network)
            elif action.network is not None:
                raise Invalid("the network is set before the first epoch; after that it changes by growing")
            hparams = {**trial.hparams, **action.hparams.changes()}
            record = Action(player_id=player_id, trial_id=trial_id, kind="train", status="queued",
                            payload={"hparams": hparams, "network": trial.network, "epoch": trial.epoch + 1,
                                     "from_checkpoint": trial.current_checkpoint_id})
            session.add(record)
            session.flush()
            trial.hparams, trial.state, trial.pending_action_id = hparams, "queued", record.id
            self.queue.defer(session, pieces.epoch(session, trial, record.id, self.rules))

    # ---- growing, reverting, stopping ---------------------------------------------------------------------------
    def _grow(self, player_id: int, trial_id: int, action: schemas.GrowAction) -> None:
        with self.db.session() as session:        # no lock while torch grows the network: it is checked after
            trial = self._own_trial(session, player_id, trial_id)
            self._require(trial, "grow")
            source = self._current_checkpoint(session, trial, "grow")
            arch, hparams, seed = source.architecture, dict(trial.hparams), trial.seed + source.id
            source_path, source_id, epoch = source.path, source.id, source.epoch
            metrics = {key: getattr(source, key) for key in ("train_loss", "train_acc", "val_loss", "val_acc")}
        widths = arch["widths"]
        if action.layer >= len(widths):
            raise Invalid(f"layer must be one of 0..{len(widths) - 1} (the network has {len(widths)} hidden layers)")
        if action.how == "wider":
            new_width, cap = round(widths[action.layer] * action.factor), MAX_WIDTH[arch["kind"]]
            if new_width <= widths[action.layer]:
                raise Invalid(f"factor {action.factor} adds no unit to a layer of width {widths[action.layer]}")
            if new_width > cap:
                raise Invalid(f"layer {action.layer} would have {new_width} units; the {arch['kind']} cap is {cap}")
            note = f"layer {action.layer} wider x{action.factor:g} ({widths[action.layer]} -> {new_width})"
        else:
            if len(widths) >= MAX_BLOCKS:
                raise Invalid(f"the network already has {len(widths)} hidden layers, the cap is {MAX_BLOCKS}")
            note = f"new layer after layer {action.layer} (width {widths[action.layer]})"
        target = pieces.new_checkpoint_path(trial_id)
        try:
            grown = grow_job(self._path(source_path), self._path(target), action.how, action.layer, action.factor,
                             hparams, seed)
        except ValueError as error:              # detseg.growth.GrowthError: a request this network cannot take
            raise Invalid(str(error)) from None
        with self.db.session() as session:
            trial = session.get(Trial, trial_id, with_for_update=True)
            if trial.current_checkpoint_id != source_id or trial.state != "ready":
                raise Conflict("cannot grow: the trial changed while the network grew (another request); try again")
            checkpoint = Checkpoint(trial_id=trial_id, parent_id=source_id, kind="grow", epoch=epoch, path=target,
                                    architecture=grown["architecture"], layers=grown["layers"], hparams=hparams,
                                    note=note, **metrics)
            session.add(checkpoint)
            session.flush()
            trial.current_checkpoint_id = checkpoint.id
            session.add(Action(player_id=player_id, trial_id=trial_id, kind="grow", payload=action.model_dump(),
                               result={"checkpoint_id": checkpoint.id, "note": note,
                                       "widths": grown["architecture"]["widths"]}, finished_at=utcnow()))

    def _revert(self, player_id: int, trial_id: int, action: schemas.RevertAction) -> None:
        with self.db.session() as session:
            trial = self._own_trial(session, player_id, trial_id, lock=True)
            self._require(trial, "revert")
            if action.checkpoint_id is not None:
                target = session.get(Checkpoint, action.checkpoint_id)
                if target is None or target.trial_id != trial_id:
                    raise Invalid(f"checkpoint {action.checkpoint_id} is not part of this trial")
            else:
                shown = [c for c in lineage(session, trial) if c.epoch == action.epoch]
                if not shown:
                    raise Invalid(f"epoch {action.epoch} is not in this trial's history (epochs 1..{trial.epoch})")
                target = shown[-1]                # after growing, the grown network of that epoch
            session.add(Action(player_id=player_id, trial_id=trial_id, kind="revert", payload=action.model_dump(),
                               result={"from_checkpoint": trial.current_checkpoint_id, "to_checkpoint": target.id,
                                       "epoch": target.epoch}, finished_at=utcnow()))
            trial.current_checkpoint_id, trial.epoch = target.id, target.epoch
            trial.state = "diverged" if target.diverged else "ready"

    def _stop(self, player_id: int, trial_id: int, action: schemas.StopAction) -> None:
        with self.db.session() as session:
            trial = self._own_trial(session, player_id, trial_id, lock=True)
            self._require(trial, "stop")
            outcomes.finish_trial(session, trial, self._current_checkpoint(session, trial, "stop"), "stopped")

    # ---- read-only ----------------------------------------------------------------------------------------------
    def status(self) -> dict:
        with self.db.session() as session:
            return self.queue.stats(session)

    def leaderboard(self, dataset_id: int | None = None) -> dict:
        with self.db.session() as session:
            return leaderboard(session, self.settings.baseline_draws, dataset_id)

    def export(self, table: str) -> list[dict]:
        with self.db.session() as session:
            return export_rows(session, table)
