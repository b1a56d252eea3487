"""HyperQuest under load: real web and worker processes, simulated players, and (optionally) faults.

A :class:`Cluster` starts what a course's staff would run: with PostgreSQL, W web processes (``hyperquest serve
--no-local-workers``, sharing one port) and one ``hyperquest worker --processes K``; with SQLite, one server with K
training processes. It runs in a scratch PostgreSQL *schema* of the given database (made and dropped by the bench),
so the bench never touches the tables already there.

Players (threads, each its own session) act like people: log in, answer the survey, start a trial, then train,
change the learning rate, grow, revert and stop, thinking 2-5 s between actions, and polling a busy trial as often as
the page does (0.8 s, slower the further back its epoch waits: :func:`poll_delay`). A 503 (database restarting) or a
broken connection (web process killed) is retried as the page does. When time is up players stop acting and the bench waits for the queue to empty (their last epochs and
every baseline), then reconciles what players were told with the research export: lost actions (accepted, not
recorded), epochs (each accepted epoch done exactly once), baselines (computed for every data set played).
"""
from __future__ import annotations

import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..hyperquest.settings import Settings

BUSY = ("preparing", "queued", "running")
POLL_S, POLL_MAX_S = 0.8, 5.0
THINK_S = (2.0, 5.0)
TOKEN = "bench-token"
# The server's own defaults (the bench runs `hyperquest serve` without overriding them).
DEFAULTS = Settings(db_url="", data_dir=Path("."))


def poll_delay(trial: dict) -> float:
    """The page's poll interval (app.js ``pollDelay``): 0.8 s when next or running, longer the more are ahead."""
    return min(POLL_MAX_S, POLL_S * (1 + max(0, trial.get("queue_ahead") or 0) / 2))


@dataclass
class Tally:
    """Thread-safe counts of what the simulated players saw."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    status: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)        # (player, kind) -> actions answered 200
    latency: dict = field(default_factory=dict)               # "page", "poll" and each action -> seconds
    transport_errors: int = 0
    server_errors: list = field(default_factory=list)         # 5xx other than 503
    unavailable: int = 0                                      # 503: database down, nothing changed, retried
    client_errors: list = field(default_factory=list)

    def request(self, client, method: str, path: str, kind: str, **kwargs):
        """One request, retried like the page: after a 503 (Retry-After) or a broken connection (GETs, and POSTs
        whose connection failed before any answer: a killed web process never answered them)."""
        import httpx

        for attempt in range(30):
            start = time.perf_counter()
            try:
                response = client.request(method, path, timeout=60, **kwargs)
            except httpx.HTTPError:
                with self.lock:
                    self.transport_errors += 1
                time.sleep(1.0)
                continue
            elapsed = time.perf_counter() - start
            with self.lock:
                self.status[response.status_code] += 1
                if response.status_code == 503:
                    self.unavailable += 1
                elif response.status_code >= 500:
                    self.server_errors.append(f"{method} {path}: {response.status_code} {response.text[:200]}")
                else:
                    self.latency.setdefault(kind, []).append(elapsed)
            if response.status_code != 503:
                return response
            time.sleep(float(response.headers.get("Retry-After", 2)))
        return None


def play(url: str, index: int, deadline: float, tally: Tally, seed: int) -> None:
    try:
        _play_until(url, index, deadline, tally, random.Random(seed))
    except Exception as error:  # a bug of the simulated player, not of the server: reported separately
        with tally.lock:
            tally.client_errors.append(f"player {index}: {type(error).__name__}: {error}")


def _play_until(url: str, index: int, deadline: float, tally: Tally, rng: random.Random) -> None:
    import httpx

    handle = f"bench{index:03d}"
    with httpx.Client(base_url=url) as client:
        def call(method, path, kind=None, **kwargs):
            kind = kind or ("poll" if method == "GET" else (kwargs.get("json", {}).get("action")
                                                            or path.rsplit("/", 1)[-1]))
            response = tally.request(client, method, path, kind, **kwargs)
            if response is not None and response.status_code == 200 and method == "POST":
                with tally.lock:
                    tally.accepted[(handle, kind)] += 1
            return response

        def think():
            time.sleep(rng.uniform(*THINK_S))

        def act(trial, body):                # the new view, or the old one when refused (409/422)
            think()
            response = call("POST", f"/api/trials/{trial['id']}/actions", json=body)
            return response.json() if response is not None and response.status_code == 200 else trial

        def settle(trial):
            while trial["state"] in BUSY:
                time.sleep(poll_delay(trial))
                response = call("GET", f"/api/trials/{trial['id']}")
                if response is not None and response.status_code == 200:
                    trial = response.json()
            return trial

        time.sleep(rng.uniform(0, 10))       # players arrive over the first seconds, not at one instant
        call("GET", "/", kind="page")
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
                if time.monotonic() >= deadline or trial["state"] not in ("ready", "diverged"):
                    break
                if trial["state"] == "diverged":
                    trial = act(trial, {"action": "revert", "epoch": 1})
                    if trial["state"] == "diverged":
                        break
                if rng.random() < 0.3:
                    lr = 10 ** rng.uniform(-3, 0)
                trial = settle(act(trial, {"action": "train", "hparams": {"lr": lr,
                                                                          "dropout": round(rng.uniform(0, 0.5), 2)}}))
                roll = rng.random()
                if trial["state"] == "ready" and roll < 0.2:
                    how = rng.choice(["wider", "deeper"])
                    body = {"action": "grow", "how": how, "layer": rng.randrange(len(trial["layers"]) - 1)}
                    trial = act(trial, {**body, "factor": 1.5} if how == "wider" else body)
                elif trial["state"] in ("ready", "diverged") and roll < 0.3 and trial["epoch"] > 1:
                    trial = act(trial, {"action": "revert", "epoch": rng.randint(1, trial["epoch"] - 1)})
                if rng.random() < 0.2:
                    think()
                    call("GET", "/api/leaderboard")
            if trial["state"] in ("ready", "diverged") and trial["history"]:
                act(trial, {"action": "stop"})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _up(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class Cluster:
    """The processes of one load run, and the faults that can be done to them."""

    def __init__(self, work_dir: Path, db_url: str | None, web: int, workers: int, pool: int, epoch_limit: int):
        self.work_dir, self.base_url, self.web_count, self.worker_count = work_dir, db_url, web, workers
        self.pool, self.epoch_limit = pool, epoch_limit
        self.data_dir = work_dir / "server"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.schema = f"bench_{uuid.uuid4().hex[:10]}"
        self.db_url = _with_schema(db_url, self.schema) if db_url else None
        self.web: list[subprocess.Popen] = []
        self.worker: subprocess.Popen | None = None
        self.logs = []
        self.env = {**os.environ, "DETSEG_HYPERQUEST_ADMIN_TOKEN": TOKEN,
                    "DETSEG_HYPERQUEST_SECRET": "bench-cookie-secret-" + "x" * 40}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.work_dir / f"{name}.log", "a")
        self.logs.append(log)
        return subprocess.Popen([sys.executable, "-m", "detseg.cli", "hyperquest", *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def _serve_args(self) -> list[str]:
        args = ["serve", "--port", str(self.port), "--data-dir", str(self.data_dir), "--dataset-pool",
                str(self.pool), "--epoch-limit", str(self.epoch_limit)]
        if self.db_url:
            return [*args, "--db", self.db_url, "--no-local-workers"]
        return [*args, "--workers", str(self.worker_count)]

    def start(self) -> None:
        if self.db_url:
            _execute(self.base_url, f"CREATE SCHEMA {self.schema}")
        for index in range(self.web_count if self.db_url else 1):
            self.web.append(self._spawn(f"web{index}", self._serve_args()))
            if index == 0:                   # the first one creates the tables; the others find them
                self.wait_up()
        if self.db_url:
            self.worker = self._spawn("worker", ["worker", "--db", self.db_url, "--processes",
                                                 str(self.worker_count), "--artifacts", str(self.data_dir)])
        self.wait_up()

    def wait_up(self, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while not _up(self.url):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the HyperQuest server did not start; see {self.work_dir}/web0.log")
            time.sleep(0.2)

    def status(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/api/status", timeout=30).json()

    def export(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/admin/export", headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=300).json()

    # ---- faults -------------------------------------------------------------------------------------------------
    def kill_a_worker(self) -> str:
        children = child_pids(self.worker.pid) if self.worker else []
        if not children:
            return "no worker process to kill"
        os.kill(children[0], signal.SIGKILL)
        return f"SIGKILL to worker process {children[0]} (its supervisor starts another)"

    def kill_a_web_process(self) -> str:
        victim = self.web[0]
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        self.web[0] = self._spawn("web0", self._serve_args())
        return f"SIGKILL to web process {victim.pid}; a new one started on the same port"

    def restart_database(self) -> str:
        command = _restart_command(self.base_url)
        if command is None:
            return "no local PostgreSQL cluster found for this URL: database not restarted"
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        return " ".join(command)

    def stop(self) -> None:
        processes = [*self.web, *([self.worker] if self.worker else [])]
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for log in self.logs:
            log.close()
        if self.db_url:
            _execute(self.base_url, f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


def _with_schema(url: str, schema: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


def _execute(url: str, statement: str) -> None:
    """One statement on its own autocommit connection (the scratch schema's CREATE and DROP)."""
    import psycopg

    from ..hyperquest.pgqueue import conninfo

    with psycopg.connect(conninfo(url), autocommit=True) as connection:
        connection.execute(statement)


def _restart_command(url: str) -> list[str] | None:
    """``pg_ctlcluster VERSION NAME restart`` for the local cluster on the URL's port, if there is one."""
    from sqlalchemy.engine import make_url

    port = make_url(url).port or 5432
    if shutil.which("pg_lsclusters") is None:
        return None
    for line in subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True).stdout.splitlines():
        version, name, cluster_port, *_ = line.split()
        if int(cluster_port) == port:
            return ["pg_ctlcluster", version, name, "restart"]
    return None


def child_pids(pid: int) -> list[int]:
    """The process IDs whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]  # noqa: E731
    return {"count": len(values), "p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99), "max": ordered[-1]}


# ---- one load run ------------------------------------------------------------------------------------------------
def load_run(work_dir: Path, players: int, seconds: float, db_url: str | None, web: int, workers: int, pool: int,
             epoch_limit: int, faults: bool = False, drain_s: float = 900.0) -> dict:
    """Start a cluster, let ``players`` play for ``seconds``, drain the queue, reconcile; the numbers."""
    from ..hyperquest.tasks import cache_path, pool_spec, prepare_dataset

    work_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(work_dir, db_url, web, workers, pool, epoch_limit)
    for index in range(pool):                # generate the pool first: the load test is about playing
        spec = pool_spec(DEFAULTS.pool_seed, index, DEFAULTS.train_range, DEFAULTS.val_range)
        prepare_dataset(spec, str(cache_path(cluster.data_dir, index, spec)))
    events: list[dict] = []
    cluster.start()
    try:
        tally = Tally()
        start = time.monotonic()
        deadline = start + seconds
        completed_before = cluster.status()["completed"]
        threads = [threading.Thread(target=play, args=(cluster.url, i, deadline, tally, i), daemon=True)
                   for i in range(players)]
        for thread in threads:
            thread.start()
        if faults:
            plan = [(0.3, cluster.kill_a_worker), (0.5, cluster.kill_a_web_process), (0.7, cluster.restart_database)]
            for share, fault in plan:
                time.sleep(max(0.0, start + share * seconds - time.monotonic()))
                events.append({"at_s": round(time.monotonic() - start, 1), "fault": fault()})
        time.sleep(max(0.0, deadline - time.monotonic()))
        completed_in_play = _retry(cluster.status)["completed"] - completed_before
        for thread in threads:
            thread.join(max(1.0, deadline + 120 - time.monotonic()))
        stuck = sum(thread.is_alive() for thread in threads)
        drained_at = _drain(cluster, drain_s)
        drain = drained_at - deadline if drained_at else None
        export = _retry(cluster.export)
    finally:
        cluster.stop()
    result = reconcile(tally, export)
    result.update({"players": players, "play_seconds": seconds, "web_processes": web if db_url else 1,
                   "worker_processes": workers, "database": "postgresql" if db_url else "sqlite",
                   "dataset_pool": pool, "epoch_limit": epoch_limit, "stuck_players": stuck,
                   "jobs_done_in_play": completed_in_play,
                   "jobs_per_minute": completed_in_play / (seconds / 60.0),
                   "drain_seconds": drain, "faults": events})
    return result


def _retry(function, tries: int = 30):
    for attempt in range(tries):
        try:
            return function()
        except Exception:  # a web process restarting, the database coming back
            if attempt == tries - 1:
                raise
            time.sleep(2)


def _drain(cluster: Cluster, seconds: float) -> float | None:
    """Wait until nothing is queued or running (the last epochs, the baselines); when, or None if it never did."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = _retry(cluster.status)
        if status["running"] == 0 and status["waiting"] == 0:
            return time.monotonic()
        time.sleep(2)
    return None


def reconcile(tally: Tally, export: dict) -> dict:
    """Compare what the players were told with what the server recorded."""
    from datetime import datetime

    handles = {p["id"]: p["handle"] for p in export["players"]}
    # A stop the player asked for is logged with reason "stopped" (the epoch limit logs "epoch_limit").
    recorded = Counter((handles[a["player_id"]], a["kind"]) for a in export["actions"] if a["status"] == "done"
                       and not (a["kind"] == "stop" and a["payload"].get("reason") != "stopped"))
    lost = sum(max(0, count - recorded[(handle, {"trials": "new_trial"}.get(kind, kind))])
               for (handle, kind), count in tally.accepted.items())
    trains = [a for a in export["actions"] if a["kind"] == "train"]
    done = [a for a in trains if a["status"] == "done"]
    epochs = [c for c in export["checkpoints"] if c["kind"] == "epoch"]
    pointed = Counter(a["result"]["checkpoint_id"] for a in done)
    per_trial = Counter(a["trial_id"] for a in done)
    once = (len(pointed) == len(done) == len(epochs) and max(pointed.values(), default=1) == 1
            and all(t["epochs_trained"] == per_trial[t["id"]] for t in export["trials"]))
    waits = [(datetime.fromisoformat(a["started_at"]) - datetime.fromisoformat(a["created_at"])).total_seconds()
             for a in done if a["started_at"]]
    ready = [d for d in export["datasets"] if d["state"] == "ready"]
    api = [value for kind, values in tally.latency.items() if kind != "page" for value in values]
    return {
        "requests": sum(tally.status.values()), "status_counts": dict(sorted(tally.status.items())),
        "server_errors": len(tally.server_errors), "server_error_samples": tally.server_errors[:5],
        "unavailable_503": tally.unavailable, "transport_errors": tally.transport_errors,
        "client_errors": tally.client_errors[:5], "accepted_actions": sum(tally.accepted.values()),
        "lost_actions": lost, "epochs_accepted": len(trains), "epochs_done": len(done),
        "epochs_not_done": len(trains) - len(done), "epochs_counted_exactly_once": once,
        "trials_finished": sum(t["state"] == "finished" for t in export["trials"]),
        "baselines_done": len(export["baselines"]), "baselines_expected": len(ready) * (2 + DEFAULTS.baseline_draws),
        "queue_wait_seconds": percentiles(waits), "api_latency_seconds": percentiles(api),
        "latency_seconds": {kind: percentiles(values) for kind, values in sorted(tally.latency.items())},
    }
