"""Worker processes for the PostgreSQL queue: procrastinate workers that train, and the supervisor that keeps them.

:func:`worker_main` is one worker process: it dies with its parent (``PR_SET_PDEATHSIG``), runs at a lower CPU
priority than the web processes (``nice`` +10) with one torch thread, and runs one procrastinate worker that takes
one job at a time from the game's queue - and, ahead of any epoch, the periodic task that retries the jobs of dead
workers. :class:`Supervisor` starts N of them (``detseg hyperquest worker --processes N``, or a server's own), starts
a new one when one dies, and stops them all - SIGTERM, then SIGKILL after ``STOP_GRACE_S`` - when it is stopped.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import jobs, outcomes
from .pgqueue import (HEARTBEAT_S, MAINTENANCE_PRIORITY, MAINTENANCE_QUEUE, MAINTENANCE_TASK, QUEUE, STALLED_S,
                      TASK, PostgresQueue, conninfo)

log = logging.getLogger("detseg.hyperquest")
NICE = 10
STOP_GRACE_S = 4.0
RESTART_DELAY_S = 1.0
PR_SET_PDEATHSIG = 1


def make_app(db_url: str, artifacts: str, connector=None, context: outcomes.Context | None = None):
    """A procrastinate app whose work task trains and records results in the game's database.

    ``connector`` and ``context`` default to PostgreSQL at ``db_url`` for both the queue and the game; the fast
    tests give procrastinate's in-memory connector and an SQLite game instead.
    """
    from procrastinate import App, PsycopgConnector, RetryStrategy
    from sqlalchemy.exc import InterfaceError, OperationalError

    from .db import Database

    app = App(connector=connector or PsycopgConnector(conninfo=conninfo(db_url), min_size=1, max_size=3))
    context = context or outcomes.Context(Database(db_url), PostgresQueue(db_url, artifacts), Path(artifacts))
    # A database that goes away while a result is being written: the job is tried again once it is back.
    database_down = RetryStrategy(max_attempts=30, wait=2, retry_exceptions={OperationalError, InterfaceError})

    @app.task(name=TASK, queue=QUEUE, retry=database_down)
    def work_task(work: dict) -> None:
        outcomes.started(context, work)
        try:
            result, error = jobs.run(work, artifacts), None
        except Exception as failure:  # the job's own failure is the game's business: recorded, not retried
            result, error = None, failure
        outcomes.finished(context, work, result, error)

    @app.periodic(cron=f"* * * * * */{max(1, int(STALLED_S // 2))}", periodic_id="stalled")
    @app.task(name=MAINTENANCE_TASK, queue=MAINTENANCE_QUEUE, priority=MAINTENANCE_PRIORITY)
    async def retry_stalled(timestamp: int) -> None:
        for job in await app.job_manager.get_stalled_jobs(queue=QUEUE, seconds_since_heartbeat=STALLED_S):
            log.warning("retrying job %s (%s): its worker stopped answering", job.id, job.queueing_lock)
            await app.job_manager.retry_job(job)
        await app.job_manager.delete_old_jobs(nb_hours=1, queue=MAINTENANCE_QUEUE)

    app.context = context
    return app


async def run_worker(app, name: str, install_signal_handlers: bool) -> None:
    async with app.open_async():
        await app.run_worker_async(queues=[QUEUE, MAINTENANCE_QUEUE], concurrency=1, name=name,
                                   update_heartbeat_interval=HEARTBEAT_S, stalled_worker_timeout=STALLED_S,
                                   install_signal_handlers=install_signal_handlers,
                                   shutdown_graceful_timeout=STOP_GRACE_S)


def die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process when its parent dies; elsewhere a thread watches the parent."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "prctl failed")
    except (OSError, AttributeError):
        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent:               # it died before the line above took effect
        os._exit(1)


def worker_main(db_url: str, artifacts: str, name: str, parent: int) -> None:
    """One worker process (the target of the supervisor's children)."""
    die_with_parent(parent)
    os.nice(NICE)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    try:
        asyncio.run(run_worker(make_app(db_url, artifacts), name, install_signal_handlers=True))
    except Exception:  # the database went away under the worker, ...: the supervisor starts a fresh one
        log.exception("worker %s stopped", name)
        sys.exit(1)


class Supervisor:
    """``count`` workers kept running: processes (``mode='process'``) or, for tests, threads in this process."""

    def __init__(self, db_url: str, artifacts: str, count: int, mode: str = "process"):
        self.db_url, self.artifacts, self.count, self.mode = db_url, artifacts, max(1, int(count)), mode
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.processes: list[multiprocessing.Process | None] = [None] * self.count
        self.restarts = 0
        self._loops: list[tuple[asyncio.AbstractEventLoop, asyncio.Task]] = []

    # ---- processes ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.mode == "thread":
            return self._start_threads()
        # One long-lived thread starts every child: PR_SET_PDEATHSIG fires when the *thread* that forked exits.
        self._thread = threading.Thread(target=self._keep, name="hyperquest-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self, index: int) -> multiprocessing.Process:
        context = multiprocessing.get_context("spawn")
        process = context.Process(target=worker_main, name=f"hyperquest-worker-{index}",
                                  args=(self.db_url, self.artifacts, f"worker-{os.getpid()}-{index}", os.getpid()))
        process.start()
        return process

    def _keep(self) -> None:
        while not self._stop.is_set():
            for index, process in enumerate(self.processes):
                if process is None or not process.is_alive():
                    if process is not None:
                        log.warning("worker process %s exited (%s); starting another", process.pid, process.exitcode)
                        self.restarts += 1
                    self.processes[index] = self._spawn(index)
            self._stop.wait(RESTART_DELAY_S)
        self._terminate()

    def _terminate(self) -> None:
        alive = [p for p in self.processes if p is not None and p.is_alive()]
        for process in alive:
            process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)

    def wait(self) -> None:
        """Block until :meth:`stop` (the ``worker`` command: until SIGTERM / Ctrl+C)."""
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_GRACE_S + 10)
        for loop, task in self._loops:
            loop.call_soon_threadsafe(task.cancel)
        for thread in getattr(self, "_threads", []):
            thread.join(STOP_GRACE_S + 10)

    # ---- threads (tests) ----------------------------------------------------------------------------------------
    def _start_threads(self) -> None:
        self._threads, ready = [], threading.Semaphore(0)
        for index in range(self.count):
            thread = threading.Thread(target=self._thread_worker, args=(index, ready), daemon=True,
                                      name=f"hyperquest-worker-{index}")
            thread.start()
            self._threads.append(thread)
        for _ in range(self.count):
            ready.acquire(timeout=30)

    def _thread_worker(self, index: int, ready: threading.Semaphore) -> None:
        loop = asyncio.new_event_loop()
        task = loop.create_task(run_worker(make_app(self.db_url, self.artifacts), f"thread-{index}", False))
        self._loops.append((loop, task))
        ready.release()
        try:
            loop.run_until_complete(task)
        except (asyncio.CancelledError, Exception):  # stopped, or the database went away (a test's business)
            pass
        finally:
            loop.close()


def run_supervisor(db_url: str, artifacts: str, processes: int) -> None:
    """The ``detseg hyperquest worker`` command: ``processes`` workers until SIGTERM or Ctrl+C."""
    from sqlalchemy.engine import make_url

    from .pgqueue import ensure_schema

    ensure_schema(db_url)
    artifacts = str(Path(artifacts).resolve())
    supervisor = Supervisor(db_url, artifacts, processes)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: supervisor._stop.set())
    supervisor.start()
    database = make_url(db_url).render_as_string(hide_password=True)
    print(f"HyperQuest: {processes} worker process(es) on {database}, artifacts in {artifacts}; "
          "SIGTERM or Ctrl+C stops them", flush=True)
    supervisor.wait()
    supervisor.stop()
    print(f"stopped ({supervisor.restarts} worker restart(s))", flush=True)
