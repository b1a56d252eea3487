"""The game's state machine and queue, on SQLite and on PostgreSQL: restarts, many players, fairness."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from detseg.hyperquest import jobs, schemas
from detseg.hyperquest.game import Conflict, Game, NotFound
from detseg.hyperquest.worker import FairQueue, Job

from .hyperquest_support import (database_params, exit_abruptly, make_settings, reset_database, square,
                                 torch_threads, wait_until)

SURVEY = {"experience": "beginner", "courses": 0, "frameworks": [], "trained_before": False, "comments": ""}
TRAIN = schemas.TrainAction(action="train")


@pytest.fixture(params=database_params())
def db_url(request):
    reset_database(request.param)
    yield request.param
    reset_database(request.param)


def held_game(settings) -> Game:
    """A game whose queue never runs anything: what a server leaves behind when it dies with work queued."""
    game = Game(settings)
    game.create_tables()
    return game


def idle(game: Game, player: int, trial: int, timeout: float = 60) -> dict:
    return wait_until(lambda: (view := game.view(player, trial))["state"] not in ("preparing", "queued", "running")
                      and view, timeout)


def test_a_restart_resumes_data_sets_and_epochs_from_the_last_checkpoint(tmp_path, db_url):
    settings = make_settings(tmp_path, db_url)
    crashed = held_game(settings)
    player = crashed.login("ann", "Ann")["id"]
    crashed.submit_survey(player, SURVEY)
    trial = crashed.new_trial(player)["id"]
    assert crashed.view(player, trial)["state"] == "preparing"            # the data set never got generated
    crashed.stop()

    first = Game(settings)
    first.start()                                                          # recovers: generates it now
    assert idle(first, player, trial)["state"] == "ready"
    first.act(player, trial, TRAIN)
    after_one = idle(first, player, trial)
    first.stop()

    crashed = held_game(settings)                                          # epoch 2 queued, server dies
    assert crashed.act(player, trial, TRAIN)["state"] == "queued"
    crashed.stop()

    second = Game(settings)
    second.start()
    view = idle(second, player, trial)
    second.stop()
    assert view["state"] == "ready" and [row["epoch"] for row in view["history"]] == [1, 2]
    assert view["history"][0] == after_one["history"][0]                  # epoch 1 untouched
    assert view["checkpoints"][1]["id"] != view["checkpoints"][0]["id"]
    actions = second.export("actions")
    epochs = [row for row in actions if row["kind"] == "train"]
    assert [row["status"] for row in epochs] == ["done", "done"]           # nothing lost


def test_many_players_at_once_lose_nothing_and_never_run_two_epochs_each(tmp_path, db_url, monkeypatch):
    settings = make_settings(tmp_path, db_url, workers=3, dataset_pool=2)
    game = Game(settings)
    running: dict[str, int] = {}
    most_at_once: dict[str, int] = {}
    guard = threading.Lock()
    real_run = jobs.run

    def counted(work: dict, artifacts: str):
        # Every job of every queue goes through jobs.run: count how many of one lane run at the same moment.
        lane = work["lane"]
        with guard:
            running[lane] = running.get(lane, 0) + 1
            most_at_once[lane] = max(most_at_once.get(lane, 0), running[lane])
        try:
            time.sleep(0.01)
            return real_run(work, artifacts)
        finally:
            with guard:
                running[lane] -= 1

    monkeypatch.setattr(jobs, "run", counted)
    game.start()
    players, errors = [], []

    def play(index: int) -> None:
        try:
            player = game.login(f"p{index}", f"Player {index}")["id"]
            game.submit_survey(player, SURVEY)
            trials = [game.new_trial(player)["id"] for _ in range(2)]     # two trials: still one epoch at a time
            for trial in trials:
                idle(game, player, trial)
            for _ in range(3):
                for trial in trials:
                    game.act(player, trial, TRAIN)
                for trial in trials:
                    idle(game, player, trial)
            players.append((player, trials))
        except Exception as error:  # surfaced below with the thread's context
            errors.append(repr(error))

    threads = [threading.Thread(target=play, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    game.stop()
    assert errors == [] and len(players) == 6
    for player, trials in players:
        for trial in trials:
            assert [row["epoch"] for row in game.view(player, trial)["history"]] == [1, 2, 3]
    assert max(count for lane, count in most_at_once.items()) == 1
    actions = game.export("actions")
    assert sum(1 for row in actions if row["kind"] == "train" and row["status"] == "done") == 6 * 2 * 3
    assert not [row for row in actions if row["status"] in ("failed", "queued", "running")]


def test_players_only_see_their_own_trials(tmp_path, db_url):
    game = held_game(make_settings(tmp_path, db_url))
    ann, bob = game.login("ann", "Ann")["id"], game.login("bob", "Bob")["id"]
    for player in (ann, bob):
        game.submit_survey(player, SURVEY)
    trial = game.new_trial(ann)["id"]
    with pytest.raises(NotFound):
        game.view(bob, trial)
    with pytest.raises(NotFound):
        game.act(bob, trial, schemas.StopAction(action="stop"))
    with pytest.raises(Conflict):                      # ann's own trial: still generating its data
        game.act(ann, trial, TRAIN)
    assert game.trials(bob) == []
    game.stop()


def test_the_epoch_limit_finishes_a_trial(tmp_path):
    game = Game(make_settings(tmp_path, epoch_limit=2, baseline_draws=5))
    game.start()
    player = game.login("ann", "Ann")["id"]
    game.submit_survey(player, SURVEY)
    trial = game.new_trial(player)["id"]
    idle(game, player, trial)
    for _ in range(2):
        game.act(player, trial, TRAIN)
        view = idle(game, player, trial)
    game.stop()
    assert view["state"] == "finished" and view["final"]["reason"] == "epoch_limit"
    assert view["final"]["val_acc"] == view["history"][-1]["val_acc"]


# ---- the fair queue on its own ---------------------------------------------------------------------------------
def _record(order: list, name: str, gate: threading.Event | None = None) -> str:
    if gate is not None:
        gate.wait(10)
    order.append(name)
    return name


def test_the_queue_takes_turns_between_players():
    queue = FairQueue(workers=1, kind="thread")
    queue.start()
    order, gate, finished = [], threading.Event(), []

    def job(lane: str, name: str, blocker: threading.Event | None = None) -> Job:
        return Job(lane, _record, (order, name, blocker), on_done=lambda result, error: finished.append(result))

    queue.submit(job("x", "x1", gate))                 # holds the only worker while the others queue up
    for name in ("a1", "a2", "a3"):
        queue.submit(job("a", name))
    queue.submit(job("b", "b1"))
    queue.submit(job("c", "c1"))
    assert queue.lanes_ahead("c") == 2 and queue.lanes_ahead("zzz") is None
    gate.set()
    wait_until(lambda: len(finished) == 6, timeout=10)
    queue.shutdown()
    assert order == ["x1", "a1", "b1", "c1", "a2", "a3"]


def test_a_dead_worker_process_fails_its_job_and_the_pool_recovers():
    queue = FairQueue(workers=1, kind="process")
    queue.start()
    outcomes = []
    queue.submit(Job("a", exit_abruptly, (), on_done=lambda result, error: outcomes.append(type(error).__name__)))
    queue.submit(Job("b", square, (7,), on_done=lambda result, error: outcomes.append(result)))
    queue.submit(Job("c", torch_threads, (), on_done=lambda result, error: outcomes.append(result)))
    wait_until(lambda: len(outcomes) == 3, timeout=90, interval=0.1)
    queue.shutdown()
    assert outcomes == ["BrokenProcessPool", 49, 1]       # one torch thread per worker process


def test_worker_processes_exit_when_their_server_dies():
    script = """
import os, threading
from detseg.hyperquest.worker import FairQueue, Job
queue, answered = FairQueue(workers=1, kind="process"), threading.Event()
queue.start()
queue.submit(Job("a", os.getpid, (), on_done=lambda pid, error: (print(pid, flush=True), answered.set())))
answered.wait(60)
os._exit(1)   # the server dies without shutting its pool down
"""
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    worker = int(ran.stdout.split()[0])
    wait_until(lambda: not Path(f"/proc/{worker}").exists() or "zombie" in _state(worker), timeout=15)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0].lower()
    except (FileNotFoundError, IndexError):
        return "zombie"
