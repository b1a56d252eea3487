"""The queue on PostgreSQL: procrastinate's job table, shared by every web process and worker on every machine.

**Queueing.** A piece of work (:mod:`.work`) becomes a procrastinate job *in the game's own transaction*: the web
process calls procrastinate's SQL function ``procrastinate_defer_jobs_v1`` on the connection that writes the
action, so the action and its job are committed together or not at all (procrastinate's ``defer()`` would use its
own connection pool, and a crash between the two commits would lose the epoch or run one nobody asked for). Each
job carries

- ``lock`` = its lane (``player:7``, ``baseline:3:default_network``): procrastinate runs at most one job per lock at
  a time, in order - one epoch per player at once;
- ``queueing_lock`` = its key (``trial:12:epoch:3``): a second identical job cannot wait beside the first;
- ``priority`` = minus the number of jobs its lane already has waiting: workers take the highest priority first,
  so every lane's first waiting job goes before anybody's second - round-robin between players, and each baseline
  (a lane of its own) gets a turn per round, so a player who queues a lot cannot starve others, nor baselines.

**Running.** ``detseg hyperquest worker --db URL --processes N`` (or the server's own children, unless it runs with
``--no-local-workers``) runs N processes, each a procrastinate worker with one training thread, ``nice``-d below
the web processes. A worker records results itself (:mod:`.outcomes`), exactly once per epoch whatever is retried.

**Faults.** Workers beat every ``HEARTBEAT_S`` seconds; a periodic task (every 5 s, on any worker) asks for the
jobs of workers silent for ``STALLED_S`` (``get_stalled_jobs``) and retries them - a worker killed mid-epoch loses
nothing, another one trains the epoch again from the same checkpoint. A worker process dies with the process that
started it (``PR_SET_PDEATHSIG``), and its supervisor restarts one that dies (a database restart included).
"""
from __future__ import annotations

import json
import logging
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from .db import normalize_url

log = logging.getLogger("detseg.hyperquest")

TASK = "hyperquest.work"
MAINTENANCE_TASK = "hyperquest.retry_stalled"
QUEUE = "hyperquest"
MAINTENANCE_QUEUE = "hyperquest-maintenance"
MAINTENANCE_PRIORITY = 1_000_000         # ahead of every epoch: a dead worker's job must not wait behind 100 others
HEARTBEAT_S = 2.0
STALLED_S = 10.0                         # no heartbeat for this long: the worker is dead, its jobs are retried
SCHEMA_LOCK = 0x6465747365670001         # advisory lock: one process installs procrastinate's schema

DEFER = text("SELECT procrastinate_defer_jobs_v1(ARRAY[ROW(:queue, :task, :priority, :lock, :queueing_lock, "
             "CAST(:args AS jsonb), NULL)::procrastinate_job_to_defer_v1])")
WAITING_IN_LANE = text("SELECT count(*) FROM procrastinate_jobs WHERE lock = :lane AND status = 'todo'")
PLACE = text("""
    WITH mine AS (SELECT priority, id FROM procrastinate_jobs
                  WHERE lock = :lane AND status = 'todo' AND queue_name = :queue
                  ORDER BY priority DESC, id LIMIT 1)
    SELECT (SELECT count(DISTINCT other.lock) FROM procrastinate_jobs AS other
            WHERE other.status = 'todo' AND other.queue_name = :queue AND other.lock <> :lane
              AND (other.priority > mine.priority OR (other.priority = mine.priority AND other.id < mine.id)))
    FROM mine""")
STATS = text("""
    SELECT count(*) FILTER (WHERE status = 'doing'), count(*) FILTER (WHERE status = 'todo'),
           count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed'),
           (SELECT count(*) FROM procrastinate_workers
            WHERE last_heartbeat > now() - make_interval(secs => :stalled))
    FROM procrastinate_jobs WHERE queue_name = :queue""")


def conninfo(url: str) -> str:
    """The libpq connection string of a SQLAlchemy URL (``postgresql+psycopg://`` -> ``postgresql://``)."""
    return make_url(normalize_url(url)).set(drivername="postgresql").render_as_string(hide_password=False)


def ensure_schema(url: str) -> None:
    """Install procrastinate's tables and functions unless they are there (first start of the first process)."""
    import psycopg
    from procrastinate.schema import SchemaManager

    with psycopg.connect(conninfo(url), autocommit=True) as connection:
        connection.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
        try:
            if connection.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()[0] is None:
                connection.execute(SchemaManager.get_schema())
                log.info("installed procrastinate's schema")
        finally:
            connection.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))


def job_fields(work: dict, waiting_in_lane: int) -> dict:
    """The procrastinate job options of ``work`` whose lane has ``waiting_in_lane`` jobs waiting already."""
    return {"lock": work["lane"], "queueing_lock": work["key"], "priority": -int(waiting_in_lane)}


class PostgresQueue:
    """The game's face of procrastinate's queue (see the module docstring); ``workers`` local worker processes
    (or threads, ``mode='thread'``, for tests) start with it unless ``workers`` is 0."""

    local = False

    def __init__(self, db_url: str, artifacts, workers: int = 0, mode: str = "process"):
        self.db_url, self.artifacts, self.workers, self.mode = db_url, artifacts, workers, mode
        self._supervisor = None

    @classmethod
    def from_settings(cls, settings) -> "PostgresQueue":
        return cls(settings.db_url, settings.artifacts, settings.workers if settings.local_workers else 0,
                   settings.executor)

    def create_tables(self) -> None:
        ensure_schema(self.db_url)

    def start(self, _context=None) -> None:
        if self.workers:
            from .workers import Supervisor

            self._supervisor = Supervisor(self.db_url, str(self.artifacts), self.workers, self.mode)
            self._supervisor.start()

    def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.stop()
            self._supervisor = None

    def defer(self, session, work: dict) -> None:
        """Queue ``work`` in ``session``'s transaction (nothing if the same work, by key, already waits)."""
        fields = job_fields(work, session.scalar(WAITING_IN_LANE, {"lane": work["lane"]}))
        try:
            with session.begin_nested():           # a savepoint: a duplicate key must not undo the game's write
                session.execute(DEFER, {"queue": QUEUE, "task": TASK, **fields, "args": json.dumps({"work": work})})
        except IntegrityError:
            log.info("%s is queued already", work["key"])

    def place(self, session, lane: str) -> int | None:
        return session.scalar(PLACE, {"lane": lane, "queue": QUEUE})

    def stats(self, session) -> dict:
        running, waiting, completed, failed, workers = session.execute(
            STATS, {"queue": QUEUE, "stalled": STALLED_S}).one()
        return {"running": running, "waiting": waiting, "workers": workers, "completed": completed, "failed": failed}
