"""HyperQuest's work on procrastinate: fast tests on its in-memory connector (the game on SQLite), then the real thing
on PostgreSQL - the job committed with the action, dead workers' jobs retried, worker processes that never outlive
their supervisor, several web processes on one port."""
from __future__ import annotations

import asyncio
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from detseg.bench.hyperquest_load import child_pids
from detseg.hyperquest import jobs, outcomes, schemas, work as pieces
from detseg.hyperquest.db import Trial
from detseg.hyperquest.game import Game
from detseg.hyperquest.pgqueue import MAINTENANCE_TASK, QUEUE, TASK, job_fields
from detseg.hyperquest.workers import Supervisor, make_app

from .hyperquest_support import POSTGRES_ENV, make_settings, reset_database, skip_unless_present, wait_until

procrastinate = pytest.importorskip("procrastinate")
from procrastinate.exceptions import AlreadyEnqueued  # noqa: E402
from procrastinate.testing import InMemoryConnector  # noqa: E402

SURVEY = {"experience": "beginner"}
TRAIN = schemas.TrainAction(action="train")
POSTGRES = os.environ.get(POSTGRES_ENV, "")
needs_postgres = skip_unless_present(bool(POSTGRES), f"{POSTGRES_ENV} not set (no PostgreSQL here)")
ROOT = Path(__file__).resolve().parents[1]


def ready_trial(settings) -> tuple[int, int]:
    """A player with a trial whose data set is generated (by an embedded game that is stopped afterwards)."""
    game = Game(settings)
    game.start()
    player = game.login("ann", "Ann")["id"]
    game.submit_survey(player, SURVEY)
    trial = game.new_trial(player)["id"]
    wait_until(lambda: game.view(player, trial)["state"] == "ready")
    game.stop()
    return player, trial


def defer(app, work: dict, waiting: int = 0):
    return app.configure_task(TASK, **job_fields(work, waiting)).defer(work=work)


def run_worker_until_idle(app) -> None:
    app.run_worker(queues=[QUEUE], wait=False, install_signal_handlers=False)


# ---- fast: procrastinate's in-memory connector -----------------------------------------------------------------
def test_the_job_of_a_dead_worker_is_retried_and_its_epoch_counted_once(tmp_path):
    settings = make_settings(tmp_path)
    player, trial_id = ready_trial(settings)
    held = Game(settings)                            # the action is written; its job goes to procrastinate here
    held.act(player, trial_id, TRAIN)
    with held.db.session() as session:
        trial = session.get(Trial, trial_id)
        work = pieces.epoch(session, trial, trial.pending_action_id, held.rules)
    connector = InMemoryConnector()
    context = outcomes.Context(held.db, None, settings.artifacts)
    app = make_app("", str(settings.artifacts), connector=connector, context=context)
    app.open()

    defer(app, work)
    with pytest.raises(AlreadyEnqueued):             # the same (trial, epoch) cannot wait twice
        defer(app, work)
    # A worker takes the job and dies: its heartbeat stops.
    dead = asyncio.run(connector.register_worker_one())["worker_id"]
    connector.jobs[1]["status"], connector.jobs[1]["worker_id"] = "doing", dead
    connector.workers[dead] -= datetime.timedelta(seconds=60)
    asyncio.run(app.tasks[MAINTENANCE_TASK].func(timestamp=0))        # the periodic task, once
    assert connector.jobs[1]["status"] == "todo"
    run_worker_until_idle(app)
    assert connector.jobs[1]["status"] == "succeeded"
    app.tasks[TASK].func(work=work)                  # the "dead" worker was only slow: it finishes too
    view = held.view(player, trial_id)
    assert view["state"] == "ready" and [row["epoch"] for row in view["history"]] == [1]
    epochs = [row for row in held.export("checkpoints") if row["kind"] == "epoch"]
    assert len(epochs) == 1 and held.export("trials")[0]["epochs_trained"] == 1
    held.stop()


def test_every_lane_goes_once_before_any_lane_goes_twice(tmp_path, monkeypatch):
    order = []
    monkeypatch.setattr(jobs, "run", lambda work, artifacts: order.append(work["key"]))
    monkeypatch.setattr(outcomes, "finished", lambda *args: None)
    monkeypatch.setattr(outcomes, "started", lambda *args: None)
    app = make_app("", str(tmp_path), connector=InMemoryConnector(),
                   context=outcomes.Context(None, None, tmp_path))
    app.open()
    waiting: dict[str, int] = {}
    for lane, key in (("player:1", "a1"), ("player:1", "a2"), ("player:1", "a3"), ("player:2", "b1"),
                      ("baseline:1:default_network", "c1"), ("player:2", "b2")):
        defer(app, {"kind": "epoch", "lane": lane, "key": key, "args": {}}, waiting.get(lane, 0))
        waiting[lane] = waiting.get(lane, 0) + 1
    run_worker_until_idle(app)
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]


# ---- PostgreSQL --------------------------------------------------------------------------------------------------
@pytest.fixture
def postgres():
    reset_database(POSTGRES)
    yield POSTGRES
    reset_database(POSTGRES)


def jobs_table(game: Game) -> list[tuple]:
    with game.db.engine.connect() as connection:
        return connection.execute(text("SELECT lock, queueing_lock, status FROM procrastinate_jobs "
                                       f"WHERE queue_name = '{QUEUE}' ORDER BY id")).all()


@needs_postgres
def test_a_job_is_committed_with_its_action_or_not_at_all(tmp_path, postgres):
    settings = make_settings(tmp_path, postgres, local_workers=False)
    game = Game(settings)
    game.create_tables()
    player = game.login("ann", "Ann")["id"]
    game.submit_survey(player, SURVEY)
    game.new_trial(player)
    assert [row[1:] for row in jobs_table(game)] == [("dataset:1", "todo")]
    with pytest.raises(RuntimeError):
        with game.db.session() as session:           # a transaction that fails after queueing: no job stays
            game.queue.defer(session, {"kind": "prepare", "lane": "player:9", "key": "dataset:9", "args": {}})
            raise RuntimeError("the game's write failed")
    assert len(jobs_table(game)) == 1
    with game.db.session() as session:
        assert game.queue.place(session, f"player:{player}") == 0
        assert game.queue.stats(session)["waiting"] == 1
    game.stop()


@needs_postgres
def test_a_worker_thread_retries_a_dead_workers_epoch_on_postgresql(tmp_path, postgres):
    settings = make_settings(tmp_path, postgres, local_workers=False)
    game = Game(settings)
    game.start()
    workers = Supervisor(postgres, str(settings.artifacts), 1, mode="thread")
    workers.start()
    player = game.login("ann", "Ann")["id"]
    game.submit_survey(player, SURVEY)
    trial = game.new_trial(player)["id"]
    wait_until(lambda: game.view(player, trial)["state"] == "ready")
    workers.stop()                                   # no live worker: the epoch waits
    game.act(player, trial, TRAIN)
    with game.db.engine.begin() as connection:       # a worker took it and died (no heartbeat for a minute)
        dead = connection.execute(text("INSERT INTO procrastinate_workers (last_heartbeat) "
                                       "VALUES (now() - interval '1 minute') RETURNING id")).scalar()
        connection.execute(text("UPDATE procrastinate_jobs SET status = 'doing', worker_id = :dead "
                                "WHERE queueing_lock LIKE 'trial:%'"), {"dead": dead})
    assert game.view(player, trial)["state"] == "queued"
    workers = Supervisor(postgres, str(settings.artifacts), 1, mode="thread")
    workers.start()
    view = wait_until(lambda: (v := game.view(player, trial))["state"] == "ready" and v, timeout=60)
    workers.stop()
    game.stop()
    assert [row["epoch"] for row in view["history"]] == [1]
    assert len([row for row in game.export("checkpoints") if row["kind"] == "epoch"]) == 1


@needs_postgres
def test_processes_starting_together_create_the_tables_once_without_error(postgres):
    """Two web processes start at once: both create the missing tables; without a lock the second CREATE TABLE
    fails on a duplicate pg_type row and that process never serves (seen in CI)."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from detseg.hyperquest.db import Database

    for _ in range(3):
        reset_database(postgres)
        databases = [Database(postgres) for _ in range(6)]
        barrier = Barrier(len(databases))

        def create(database):
            barrier.wait()
            database.create_all()

        with ThreadPoolExecutor(len(databases)) as pool:
            list(pool.map(create, databases))            # re-raises the first error of any thread
        with databases[0].engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM players")).scalar() == 0
        for database in databases:
            database.dispose()


def _gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "status").read_text()
        except OSError:
            continue
        if "zombie" not in state.split("State:")[1].splitlines()[0].lower():
            return False
    return True


@needs_postgres
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_worker_processes_never_outlive_their_supervisor_by_5_s(tmp_path, postgres, how):
    command = [sys.executable, "-m", "detseg.cli", "hyperquest", "worker", "--db", postgres, "--processes", "2",
               "--artifacts", str(tmp_path)]
    supervisor = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        children = wait_until(lambda: len(found := child_pids(supervisor.pid)) >= 2 and found, timeout=60)
        database = Game(make_settings(tmp_path / "web", postgres, local_workers=False))
        wait_until(lambda: database.status()["workers"] >= 2, timeout=60)         # they really run
        supervisor.send_signal(getattr(signal, how))
        start = time.monotonic()
        wait_until(lambda: _gone(children), timeout=10)
        assert time.monotonic() - start <= 5.0
        database.stop()
    finally:
        supervisor.kill()
        supervisor.wait(10)


@needs_postgres
def test_two_web_processes_share_one_port_and_a_kill_loses_nothing(tmp_path, postgres):
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "DETSEG_HYPERQUEST_TINY": "1", "DETSEG_HYPERQUEST_ADMIN_TOKEN": "t"}
    serve = [sys.executable, "-m", "detseg.cli", "hyperquest", "serve", "--db", postgres, "--port", str(port),
             "--data-dir", str(tmp_path), "--dataset-pool", "1", "--epoch-limit", "3"]
    web = [subprocess.Popen([*serve, "--no-local-workers"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL) for _ in range(2)]
    worker = subprocess.Popen([sys.executable, "-m", "detseg.cli", "hyperquest", "worker", "--db", postgres,
                               "--artifacts", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url), timeout=60, interval=0.2)
        client = httpx.Client(base_url=url, timeout=30)
        assert client.post("/api/login", json={"player_id": "ann", "name": "Ann"}).status_code == 200
        client.post("/api/survey", json=SURVEY)
        trial = client.post("/api/trials").json()["id"]
        idle = lambda: (v := client.get(f"/api/trials/{trial}").json())["state"] in ("ready", "finished") and v  # noqa: E731
        wait_until(idle, timeout=60)
        assert client.post(f"/api/trials/{trial}/actions", json={"action": "train"}).status_code == 200
        assert [process.poll() for process in web] == [None, None], "a web process exited at start"
        web[0].kill()                                 # one web process dies; the other answers the same cookie
        web[0].wait(10)
        # The second process may still be starting (importing torch) when the first answered: wait for it.
        wait_until(lambda: _up(url), timeout=60, interval=0.2)
        client = httpx.Client(base_url=url, timeout=30, cookies=client.cookies)
        view = wait_until(idle, timeout=60)
        assert [row["epoch"] for row in view["history"]] == [1]
    finally:
        for process in (*web, worker):
            process.terminate()
        for process in (*web, worker):
            process.wait(20)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
