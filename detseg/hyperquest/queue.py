"""Where the game's work waits: the embedded queue (one server, its own worker processes) or PostgreSQL's.

Both have the same face, which is all :class:`~.game.Game` and :mod:`.outcomes` use::

    queue.defer(session, work)      # queue a piece of work (see .work) when session's transaction commits
    queue.place(session, lane)      # lanes ahead of this lane's next waiting job (0: next), None if nothing waits
    queue.stats(session)            # running / waiting / workers / completed / failed, for GET /api/status

:class:`LocalQueue` is the default with SQLite, exactly as simple as a single server should be: the round-robin
:class:`~.worker.FairQueue` in the server's memory, its worker processes the server's children, results recorded in
the server; what it held when the server stopped is rebuilt from the database at the next start
(:func:`.outcomes.recover`). :class:`~.pgqueue.PostgresQueue` keeps the queue in PostgreSQL (procrastinate), so that
web processes and workers on any number of machines share it and nothing depends on one process staying alive.
"""
from __future__ import annotations

import threading
from functools import partial

from . import jobs, outcomes
from .db import after_commit, is_postgresql
from .work import describe
from .worker import FairQueue, Job


class LocalQueue:
    """The in-process queue; jobs are handed to the pool only once the transaction that queued them commits."""

    local = True

    def __init__(self, settings):
        self.settings = settings
        self.fair = FairQueue(settings.workers, settings.executor)
        self.context: outcomes.Context | None = None
        self._keys: set[str] = set()                 # waiting or running: one job per key
        self._lock = threading.Lock()

    def create_tables(self) -> None:
        """Nothing to create: this queue lives in memory."""

    def start(self, context: outcomes.Context) -> None:
        self.context = context
        self.fair.start()

    def stop(self) -> None:
        self.fair.shutdown()
        with self._lock:
            self._keys.clear()

    def defer(self, session, work: dict) -> None:
        after_commit(session, partial(self._submit, work))

    def _submit(self, work: dict) -> None:
        with self._lock:
            if work["key"] in self._keys:
                return
            self._keys.add(work["key"])
        # jobs.run is looked up now, not at import: the tests wrap it to watch what runs when.
        self.fair.submit(Job(work["lane"], jobs.run, (work, str(self.settings.artifacts)), name=describe(work),
                             on_start=partial(self._started, work), on_done=partial(self._done, work)))

    def _started(self, work: dict) -> None:
        outcomes.started(self.context, work)

    def _done(self, work: dict, result: dict | None, error: BaseException | None) -> None:
        with self._lock:
            self._keys.discard(work["key"])
        outcomes.finished(self.context, work, result, error)

    def place(self, _session, lane: str) -> int | None:
        return self.fair.lanes_ahead(lane)

    def stats(self, _session) -> dict:
        return self.fair.stats()


def make_queue(settings):
    """The queue ``settings`` ask for: ``queue='auto'`` is PostgreSQL's for a postgresql:// database."""
    kind = settings.queue
    if kind == "auto":
        kind = "postgresql" if is_postgresql(settings.db_url) else "local"
    if kind == "postgresql":
        from .pgqueue import PostgresQueue

        return PostgresQueue.from_settings(settings)
    return LocalQueue(settings)
