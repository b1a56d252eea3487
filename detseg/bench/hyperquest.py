"""HyperQuest under load: how long one epoch takes, and whether 20 players at once lose anything.

1. **Epoch time.** The default network (MLP, two 256-unit layers, SGD lr 0.05, batch 128) on 8,500 training images
   of 3x32x32 (upscaled digits) and 1,500 validation images, on one torch thread as in a worker process. Reported:
   the training pass alone, training + validation, and the whole worker job (load checkpoint, train, validate,
   save checkpoint) - median over several epochs. The aim is <= 2 s.
2. **Many players.** A real server (``detseg hyperquest`` in its own process, real data-set sizes, one worker
   process on this 2-core machine) and 20 simulated players, each a thread with its own session, playing for a fixed
   time: new trial, epochs with random hyperparameter changes, sometimes growing, reverting, stopping. Every request
   is counted by status; when time is up the players let their last epoch finish, and every action the server
   accepted is looked up in the research export. Lost = accepted but not recorded as done; server errors = 5xx.
"""
from __future__ import annotations

import math
import os
import signal
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from ..hyperquest import require_web_extra
from ..hyperquest.jobs import epoch_job
from ..hyperquest.settings import DEFAULT_HPARAMS, DEFAULT_NETWORK
from ..hyperquest.tasks import cache_path, pool_spec, prepare_dataset
from ..io import write_json, write_text

AIM_EPOCH_SECONDS = 2.0
PLAYERS = 20
BUSY = ("preparing", "queued", "running")


# ---- 1. one epoch ----------------------------------------------------------------------------------------------
def epoch_timing(work_dir: Path, epochs: int) -> dict:
    torch.set_num_threads(1)
    spec = {"name": "digits_images", "n_train": 8500, "n_val": 1500, "seed": 0}
    data_path = str(work_dir / "epoch-bench.pt")
    summary = prepare_dataset(spec, data_path)
    jobs, passes = [], []
    source = None
    for epoch in range(epochs):
        target = str(work_dir / f"epoch{epoch}.pt")
        start = time.perf_counter()
        result = epoch_job(data_path, source, target, DEFAULT_NETWORK, DEFAULT_HPARAMS, seed=0)
        jobs.append(time.perf_counter() - start)
        passes.append(result["seconds"])
        source = target
    # The training pass alone, for the same network and data (what the aim is about).
    from ..hyperquest.tasks import load_dataset
    from ..hyperquest.training import build_network, make_trainer
    data = load_dataset(data_path)
    trainer = make_trainer(build_network(DEFAULT_NETWORK, data.input_shape, data.num_classes, 0.0, 0), data,
                           DEFAULT_HPARAMS, 0)
    train_only = []
    for _ in range(epochs):
        start = time.perf_counter()
        trainer.run_epoch()
        train_only.append(time.perf_counter() - start)
    return {"train_size": summary["train_size"], "val_size": summary["val_size"],
            "input_shape": summary["input_shape"], "epochs": epochs, "torch_threads": 1,
            "train_pass_median_s": statistics.median(train_only), "train_and_validate_median_s":
            statistics.median(passes), "worker_job_median_s": statistics.median(jobs),
            "final_val_acc": result["val_acc"], "all_job_seconds": jobs}


# ---- 2. many players -------------------------------------------------------------------------------------------
class Tally:
    """Thread-safe counts of what the simulated players saw."""

    def __init__(self):
        self.lock = threading.Lock()
        self.status = Counter()
        self.accepted = Counter()          # (player, kind) -> actions the server answered 200
        self.latency: dict[str, list[float]] = {}     # "poll" and each action kind -> seconds
        self.transport_errors = 0
        self.server_errors: list[str] = []
        self.client_errors: list[str] = []

    def request(self, client, method: str, path: str, kind: str, **kwargs):
        import httpx

        start = time.perf_counter()
        try:
            response = client.request(method, path, timeout=60, **kwargs)
        except httpx.HTTPError as error:
            with self.lock:
                self.transport_errors += 1
            return None, str(error)
        with self.lock:
            self.latency.setdefault(kind, []).append(time.perf_counter() - start)
            self.status[response.status_code] += 1
            if response.status_code >= 500:
                self.server_errors.append(f"{method} {path}: {response.status_code} {response.text[:200]}")
        return response, None


def _play(url: str, index: int, deadline: float, tally: Tally, rng: random.Random) -> None:
    try:
        _play_until(url, index, deadline, tally, rng)
    except Exception as error:  # a bug in the simulated player, not in the server: reported separately
        with tally.lock:
            tally.client_errors.append(f"player {index}: {type(error).__name__}: {error}")


def _play_until(url: str, index: int, deadline: float, tally: Tally, rng: random.Random) -> None:
    """One player: trials of 2-6 epochs with random learning-rate changes, growth and reverts, until ``deadline``."""
    import httpx

    handle = f"bench{index:02d}"
    with httpx.Client(base_url=url) as client:
        def call(method, path, **kwargs):
            key = "poll" if method == "GET" else (kwargs.get("json", {}).get("action") or path.rsplit("/", 1)[-1])
            response, _ = tally.request(client, method, path, key, **kwargs)
            if response is not None and response.status_code == 200 and method == "POST":
                with tally.lock:
                    tally.accepted[(handle, key)] += 1
            return response

        def act(trial, body):                # the new trial view, or the old one when refused (409/422)
            response = call("POST", f"/api/trials/{trial['id']}/actions", json=body)
            return response.json() if response is not None and response.status_code == 200 else trial

        def settle(trial):
            while True:                      # ends when the server finishes the epoch (or the join times out)
                time.sleep(0.5 + rng.random() * 0.5)
                response = call("GET", f"/api/trials/{trial['id']}")
                if response is not None and response.status_code == 200 and response.json()["state"] not in BUSY:
                    return response.json()

        call("POST", "/api/login", json={"player_id": handle, "name": f"Bench player {index}"})
        call("POST", "/api/survey", json={"experience": rng.choice(["none", "beginner", "advanced"])})
        while time.monotonic() < deadline:
            response = call("POST", "/api/trials")
            if response is None or response.status_code != 200:
                time.sleep(1)
                continue
            trial = settle(response.json())
            lr = 10 ** rng.uniform(-3, 0)
            for _ in range(rng.randint(2, 6)):
                if time.monotonic() >= deadline:
                    break
                if trial["state"] == "diverged":
                    trial = act(trial, {"action": "revert", "epoch": 1})
                if rng.random() < 0.3:
                    lr = 10 ** rng.uniform(-3, 0)
                trial = settle(act(trial, {"action": "train", "hparams": {"lr": lr,
                                                                          "dropout": round(rng.uniform(0, 0.5), 2)}}))
                roll = rng.random()
                if trial["state"] == "ready" and roll < 0.25:
                    how = rng.choice(["wider", "deeper"])
                    body = {"action": "grow", "how": how, "layer": rng.randrange(len(trial["layers"]) - 1)}
                    trial = act(trial, {**body, "factor": 1.5} if how == "wider" else body)
                elif trial["state"] in ("ready", "diverged") and roll < 0.35 and trial["epoch"] > 1:
                    trial = act(trial, {"action": "revert", "epoch": rng.randint(1, trial["epoch"] - 1)})
            if trial["state"] in ("ready", "diverged") and trial["history"]:
                act(trial, {"action": "stop"})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def many_players(work_dir: Path, seconds: float, pool: int) -> dict:
    import httpx

    data_dir = work_dir / "server"
    for index in range(pool):                # generate the pool first: the load test is about playing
        spec = pool_spec(0, index, (5000, 10000), (1000, 2000))
        prepare_dataset(spec, str(cache_path(data_dir, index, spec)))
    port, token = _free_port(), "bench-token"
    log = open(work_dir / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "detseg.cli", "hyperquest", "--port", str(port), "--data-dir",
                               str(data_dir), "--dataset-pool", str(pool)],
                              env={**os.environ, "DETSEG_HYPERQUEST_ADMIN_TOKEN": token}, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        tally = Tally()
        start = time.monotonic()
        players = [threading.Thread(target=_play, args=(url, i, start + seconds, tally, random.Random(i)),
                                    daemon=True) for i in range(PLAYERS)]
        for player in players:
            player.start()
        for player in players:
            player.join(seconds + 600)       # the last epochs of 20 players may queue for a while
        wall = time.monotonic() - start
        export = httpx.get(f"{url}/admin/export", headers={"Authorization": f"Bearer {token}"}, timeout=120).json()
    finally:
        # The whole process group: the server's epoch workers are its children, and one still writing a
        # checkpoint into the scratch directory would outlive a plain terminate() (and break its clean-up).
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        _wait_for_group_exit(server.pid)
        log.close()
    return _reconcile(tally, export, seconds, wall, sum(p.is_alive() for p in players))


def _wait_for_group_exit(group: int, seconds: float = 30.0) -> None:
    """Until no process of ``group`` is left (SIGKILL for those still there after ``seconds``)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            os.killpg(group, signal.SIGKILL)
            deadline = time.monotonic() + seconds
        time.sleep(0.1)


def _reconcile(tally: Tally, export: dict, seconds: float, wall: float, stuck_players: int) -> dict:
    """Compare what the players were told with what the server recorded."""
    handles = {p["id"]: p["handle"] for p in export["players"]}
    # A stop the player asked for is logged with reason "stopped" (the epoch limit logs "epoch_limit").
    recorded = Counter((handles[a["player_id"]], a["kind"]) for a in export["actions"] if a["status"] == "done"
                       and not (a["kind"] == "stop" and a["payload"].get("reason") != "stopped"))
    lost = 0
    for (handle, kind), count in tally.accepted.items():
        lost += max(0, count - recorded[(handle, {"trials": "new_trial"}.get(kind, kind))])
    unfinished = [a for a in export["actions"] if a["status"] in ("queued", "running", "failed")]
    epochs = [c for c in export["checkpoints"] if c["kind"] == "epoch"]
    waits = []
    for action in export["actions"]:
        if action["kind"] == "train" and action["started_at"] and action["status"] == "done":
            waits.append(_seconds_between(action["created_at"], action["started_at"]))
    latency = {kind: _percentiles(values) for kind, values in tally.latency.items()}
    return {"players": PLAYERS, "play_seconds": seconds, "wall_seconds": wall, "stuck_players": stuck_players,
            "requests": sum(tally.status.values()), "status_counts": dict(sorted(tally.status.items())),
            "server_errors": len(tally.server_errors), "server_error_samples": tally.server_errors[:5],
            "client_errors": tally.client_errors,
            "transport_errors": tally.transport_errors, "accepted_actions": sum(tally.accepted.values()),
            "lost_actions": lost, "unfinished_or_failed_actions": len(unfinished),
            "epochs_trained": len(epochs), "trials_finished": sum(t["state"] == "finished" for t in export["trials"]),
            "baselines_done": len(export["baselines"]),
            "epoch_seconds_median_in_server": statistics.median([c["seconds"] for c in epochs]) if epochs else None,
            "queue_wait_seconds": _percentiles(waits), "latency_seconds": latency}


def _seconds_between(first: str, second: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(second) - datetime.fromisoformat(first)).total_seconds()


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]  # noqa: E731
    return {"count": len(values), "p50": pick(0.5), "p95": pick(0.95), "max": ordered[-1]}


def run(out: Path, quick: bool) -> dict:
    require_web_extra("httpx")               # the server and the simulated players' HTTP client
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        scratch = Path(scratch)
        timing = epoch_timing(scratch, epochs=3 if quick else 7)
        load = many_players(scratch, seconds=60 if quick else 300, pool=4 if quick else 8)
    results = {"epoch": timing, "load": load, "aim_epoch_seconds": AIM_EPOCH_SECONDS}
    write_json(out / "results.json", results)
    lat = load["latency_seconds"]
    lines = [
        "# HyperQuest under load", "",
        f"## One epoch of the default network ({timing['train_size']:,} x {'x'.join(map(str, timing['input_shape']))}"
        f" training, {timing['val_size']:,} validation images, one torch thread)", "",
        "| step | median seconds |", "|---|---:|",
        f"| training pass | {timing['train_pass_median_s']:.2f} |",
        f"| training + validation | {timing['train_and_validate_median_s']:.2f} |",
        f"| whole worker job (load, train, validate, save) | {timing['worker_job_median_s']:.2f} |", "",
        f"Aim ≤ {AIM_EPOCH_SECONDS:.0f} s: {'met' if timing['train_and_validate_median_s'] <= AIM_EPOCH_SECONDS else 'NOT met'}"
        f" (median over {timing['epochs']} epochs).", "",
        f"## {load['players']} players for {load['play_seconds']:.0f} s (then their last epochs finish: "
        f"{load['wall_seconds']:.0f} s in all)", "",
        f"- requests: {load['requests']:,} ({load['status_counts']}); server errors (5xx): **{load['server_errors']}**;"
        f" transport errors: {load['transport_errors']}",
        f"- actions accepted: {load['accepted_actions']:,}; lost: **{load['lost_actions']}**; left unfinished or "
        f"failed: {load['unfinished_or_failed_actions']}",
        f"- epochs trained: {load['epochs_trained']}; trials finished: {load['trials_finished']}; baselines computed:"
        f" {load['baselines_done']}; median epoch inside the server: {load['epoch_seconds_median_in_server']:.2f} s",
        f"- queue wait before an epoch starts: p50 {load['queue_wait_seconds'].get('p50', 0):.1f} s, p95 "
        f"{load['queue_wait_seconds'].get('p95', 0):.1f} s",
        "", "| request | count | p50 ms | p95 ms | max ms |", "|---|---:|---:|---:|---:|",
        *(f"| {kind} | {row['count']} | {row['p50'] * 1000:.0f} | {row['p95'] * 1000:.0f} | {row['max'] * 1000:.0f} |"
          for kind, row in sorted(lat.items())), ""]
    write_text(out / "report.md", "\n".join(lines))
    print("\n".join(lines))
    return results
