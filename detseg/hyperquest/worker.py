"""The fair queue: epochs run in background worker processes, one per player at a time, players taking turns.

Training an epoch holds a CPU core for a second or more; done inside the web server it would stall every other
player's page. So the server only *queues* work, and a pool of worker processes runs it. Fairness is round-robin
over *lanes* - one lane per player, plus one for the server's own baseline computations - with at most one running
job per lane: a player who queues a lot cannot starve the others, and the baselines get one turn per round like
anybody else.

Jobs are top-level functions with picklable arguments (see :mod:`.jobs`), so a process pool can run them; the
``"thread"`` executor runs the same jobs in threads, which keeps the tests free of process start-up.
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("detseg.hyperquest")
_job_ids = itertools.count(1)


@dataclass
class Job:
    """One unit of background work. ``on_start()`` runs when a worker takes it; ``on_done(result, error)`` after."""

    lane: str
    function: Callable
    args: tuple
    on_done: Callable[[Any, BaseException | None], None]
    on_start: Callable[[], None] | None = None
    name: str = ""
    id: int = field(default_factory=lambda: next(_job_ids))


def init_worker(threads: int) -> None:
    """Worker-process start: ``threads`` torch threads each (one by default), so N workers use N cores and the
    server keeps its own. Set through the environment, which torch reads when a job first imports it: starting a
    worker stays cheap."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    # A worker outlives a server that was killed (or exited while it trained): it would wait for work forever.
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


class FairQueue:
    """Round-robin over lanes, at most one running job per lane and ``workers`` jobs at once."""

    def __init__(self, workers: int = 1, kind: str = "process", threads_per_worker: int = 1):
        if kind not in ("process", "thread"):
            raise ValueError(f"executor kind must be 'process' or 'thread', got {kind!r}")
        self.workers, self.kind, self.threads = max(1, int(workers)), kind, threads_per_worker
        self._lock = threading.Lock()
        self._lanes: dict[str, deque[Job]] = {}
        self._turns: deque[str] = deque()      # lanes with waiting jobs, in the order they get their next turn
        self._running: dict[str, Job] = {}     # lane -> its running job
        self._executor: Executor | None = None
        self._generation = 0                   # bumped when a broken process pool is replaced
        self._closed = False
        self.completed = 0
        self.failed = 0

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def _make_executor(self) -> Executor:
        if self.kind == "thread":
            return ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="hyperquest-worker")
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=init_worker, initargs=(self.threads,))

    def start(self) -> None:
        with self._lock:
            self._closed = False
            if self._executor is None:
                self._executor = self._make_executor()

    def shutdown(self) -> None:
        """Stop taking jobs; waiting jobs are dropped (their trials are queued again when the server restarts)."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
            self._lanes.clear()
            self._turns.clear()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    # ---- queueing -----------------------------------------------------------------------------------------------
    def submit(self, job: Job, front: bool = False) -> None:
        """Queue ``job`` at the end of its lane (``front``: next in its lane, e.g. the next step of a chain)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the queue is shut down")
            lane = self._lanes.setdefault(job.lane, deque())
            lane.appendleft(job) if front else lane.append(job)
            if job.lane not in self._turns:
                self._turns.append(job.lane)
        self._dispatch()

    def lanes_ahead(self, lane: str) -> int | None:
        """How many other lanes get a turn before ``lane``'s next waiting job: 0 = next; None = nothing waits."""
        with self._lock:
            if not self._lanes.get(lane):
                return None
            ahead = 0
            for other in self._turns:
                if other == lane:
                    return ahead
                ahead += 1
            return ahead

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self._running), "waiting": sum(len(jobs) for jobs in self._lanes.values()),
                    "workers": self.workers, "completed": self.completed, "failed": self.failed}

    def _take_startable(self) -> list[tuple[Job, Executor, int]]:
        """Under the lock: the jobs to start now, each lane's first job, in turn order, while workers are free."""
        started = []
        if self._executor is None or self._closed:
            return started
        for lane in list(self._turns):
            if len(self._running) >= self.workers:
                break
            if lane in self._running:
                continue
            job = self._lanes[lane].popleft()
            self._turns.remove(lane)
            if self._lanes[lane]:
                self._turns.append(lane)       # its next job waits for everybody else's turn
            else:
                del self._lanes[lane]
            self._running[lane] = job
            started.append((job, self._executor, self._generation))
        return started

    def _dispatch(self) -> None:
        with self._lock:
            started = self._take_startable()
        for job, executor, generation in started:
            try:
                if job.on_start is not None:
                    job.on_start()
                future = executor.submit(job.function, *job.args)
            except Exception as error:  # the pool was shut down or broke between taking and submitting
                future = Future()
                future.set_exception(error)
            future.add_done_callback(lambda done, job=job, generation=generation: self._finish(job, generation, done))

    def _finish(self, job: Job, generation: int, future: Future) -> None:
        if future.cancelled() or self._closed:
            with self._lock:
                self._running.pop(job.lane, None)
            return
        error = future.exception()
        if isinstance(error, BrokenProcessPool):
            self._replace_broken_pool(generation)
        try:
            job.on_done(None if error else future.result(), error)
        except Exception:  # a bug in a result handler must not stop the queue
            log.exception("handling the result of job %s (%s) failed", job.id, job.name)
        with self._lock:
            self._running.pop(job.lane, None)
            if error is None:
                self.completed += 1
            else:
                self.failed += 1
        self._dispatch()

    def _replace_broken_pool(self, generation: int) -> None:
        """A worker process died (killed, out of memory): every job it had fails once; new ones get a new pool."""
        with self._lock:
            if generation != self._generation or self._closed:
                return
            log.error("a worker process died; starting a new pool")
            broken, self._executor = self._executor, self._make_executor()
            self._generation += 1
        if broken is not None:
            broken.shutdown(wait=False, cancel_futures=True)
