"""HyperQuest's records, as SQLAlchemy 2 models: players, data sets, trials, checkpoints, actions, baselines.

The tables are the research record as much as the game's state: every action a player takes is a row of
:class:`Action` (what was asked, when, what came of it), and every trained epoch a row of :class:`Checkpoint`
(hyperparameters, architecture, metrics). The same code runs on SQLite (a file, the default) and PostgreSQL.
Model weights are not in the database: a checkpoint row names a file in the server's data directory.
"""
from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

from ..errors import ConfigError

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint,
                        create_engine, event, text)
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON, datetime: DateTime(timezone=True)}


class Player(Base):
    """Someone playing: a self-chosen player ID (unique) with a display name, and their survey answers."""

    __tablename__ = "players"
    id: Mapped[int] = mapped_column(primary_key=True)
    handle: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(80))
    survey: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    survey_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dataset(Base):
    """One data set of the pool: the arguments that generate it, its statistics once generated, its cache file."""

    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    pool_index: Mapped[int] = mapped_column(Integer, unique=True)
    spec: Mapped[dict] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="new")    # new | preparing | ready | failed
    summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    path: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Trial(Base):
    """One game: a player, a data set, the current point of training and, once stopped, the final score.

    ``current_checkpoint_id`` is where training continues from; the epochs shown are its ancestors (a revert moves
    it back, and the abandoned branch stays in the record). ``pending_action_id`` is the epoch waiting in the queue or
    running, which a restarted server queues again.
    """

    __tablename__ = "trials"
    id: Mapped[int] = mapped_column(primary_key=True)
    player_id: Mapped[int] = mapped_column(ForeignKey("players.id"), index=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    # preparing -> ready -> queued -> running -> ready | diverged | finished ; ready | diverged -> finished
    state: Mapped[str] = mapped_column(String(16), default="preparing")
    seed: Mapped[int] = mapped_column(Integer)
    network: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    hparams: Mapped[dict] = mapped_column(JSON)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    epochs_trained: Mapped[int] = mapped_column(Integer, default=0)
    current_checkpoint_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pending_action_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    final_val_acc: Mapped[float | None] = mapped_column(Float, nullable=True)
    final_diverged: Mapped[bool] = mapped_column(Boolean, default=False)
    stop_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class Checkpoint(Base):
    """A saved training state: after an epoch (``kind='epoch'``, with its metrics) or after growing (``'grow'``)."""

    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id"), index=True)
    parent_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    kind: Mapped[str] = mapped_column(String(16))
    epoch: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    architecture: Mapped[dict] = mapped_column(JSON)
    layers: Mapped[list] = mapped_column(JSON, default=list)        # growth.describe() of the network, for the page
    hparams: Mapped[dict] = mapped_column(JSON)
    note: Mapped[str] = mapped_column(Text, default="")
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_acc: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_acc: Mapped[float | None] = mapped_column(Float, nullable=True)
    diverged: Mapped[bool] = mapped_column(Boolean, default=False)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Action(Base):
    """Everything a player did, in order: login, survey, new trial, train, grow, revert, stop.

    ``status``: done, queued, running (an epoch), failed (the worker raised) or rejected (not allowed now).
    """

    __tablename__ = "actions"
    id: Mapped[int] = mapped_column(primary_key=True)
    player_id: Mapped[int] = mapped_column(ForeignKey("players.id"), index=True)
    trial_id: Mapped[int | None] = mapped_column(ForeignKey("trials.id"), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="done")
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Baseline(Base):
    """A baseline score the server computed for a data set (``name``: majority, logistic_regression,
    default_network, random_draw_<i>)."""

    __tablename__ = "baselines"
    __table_args__ = (UniqueConstraint("dataset_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    val_acc: Mapped[float | None] = mapped_column(Float, nullable=True)
    details: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BaselineRun(Base):
    """A baseline being trained, one epoch per job: how far it is and the checkpoint it continues from.

    It lives in the database, not in a server's memory, so that any worker may train its next epoch and a restart
    continues where it stopped. ``epochs_done`` is also what makes an epoch count once: a job whose epoch is not
    the next one (a retry of an epoch already recorded) changes nothing.
    """

    __tablename__ = "baseline_runs"
    __table_args__ = (UniqueConstraint("dataset_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    epochs_done: Mapped[int] = mapped_column(Integer, default=0)
    checkpoint: Mapped[str | None] = mapped_column(Text, nullable=True)     # relative to the artifact store
    history: Mapped[list] = mapped_column(JSON, default=list)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


TABLES = {"players": Player, "datasets": Dataset, "trials": Trial, "checkpoints": Checkpoint, "actions": Action,
          "baselines": Baseline, "baseline_runs": BaselineRun}


AFTER_COMMIT = "detseg_after_commit"
TABLES_LOCK = 0x6465747365670002         # advisory lock: one process creates the tables at a time


def after_commit(session: Session, callback) -> None:
    """Run ``callback()`` after ``session``'s transaction (a :meth:`Database.session` block) commits; never if it
    rolls back."""
    session.info.setdefault(AFTER_COMMIT, []).append(callback)


def is_postgresql(url: str) -> bool:
    return normalize_url(url).startswith("postgresql")


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (the driver we depend on), not SQLAlchemy's default psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


class Database:
    """An engine and its sessions. SQLite gets WAL mode and a busy timeout, so that the request threads and the
    worker callbacks can write at the same time without 'database is locked'."""

    def __init__(self, url: str):
        self.url = normalize_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        if self.is_sqlite:
            # Request threads (FastAPI's pool has 40) and worker callbacks share the engine: enough connections.
            self.engine = create_engine(self.url, connect_args={"check_same_thread": False, "timeout": 30},
                                        pool_size=10, max_overflow=40)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(self.url, pool_pre_ping=True, pool_size=10, max_overflow=40)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_all(self) -> None:
        """Create the missing tables. On PostgreSQL under an advisory lock held for the transaction: several web
        processes starting at once (``serve --db postgresql://...`` twice) would otherwise race on CREATE TABLE,
        and the loser fails with a duplicate ``pg_type`` row and never serves."""
        if self.is_sqlite:
            Base.metadata.create_all(self.engine)
            return
        with self.engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": TABLES_LOCK})
            Base.metadata.create_all(connection)

    def drop_all(self) -> None:
        Base.metadata.drop_all(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back if it raises.

        Work that must only happen once the transaction is committed (handing a job to an in-process queue,
        deleting a file the database no longer names) is registered with :func:`after_commit`.
        """
        with self._sessions.begin() as session:
            yield session
        for callback in session.info.pop(AFTER_COMMIT, []):
            callback()

    def dispose(self) -> None:
        self.engine.dispose()


def check_connection(url: str) -> None:
    """Fail early, in one line, on a malformed URL or a database that cannot be reached."""
    try:
        database = Database(url)
    except (ArgumentError, NoSuchModuleError) as error:
        raise ConfigError(f"--db {url}: not a usable database URL ({error})") from None
    try:
        with database.engine.connect():
            pass
    except OperationalError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        raise ConfigError(f"--db: cannot connect to the database ({reason})") from None
    finally:
        database.dispose()


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def iso_utc(value: datetime) -> str:
    """A stored time as ISO 8601 with its UTC offset: SQLite drops the time zone, PostgreSQL keeps it."""
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()


def row_dict(row: Base) -> dict:
    """A row as a JSON-ready dict (timestamps as ISO strings), for the admin export."""
    out = {}
    for column in row.__table__.columns:
        value = getattr(row, column.key)
        out[column.key] = iso_utc(value) if isinstance(value, datetime) else value
    return out
