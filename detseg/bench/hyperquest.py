"""HyperQuest under load: how long one epoch takes, and what many players on many processes see.

Parts (``--only``): ``epoch``, ``load``, ``scaling``, ``faults``; all four by default.

1. **Epoch time** (``epoch``). The default network (MLP, two 256-unit layers, SGD lr 0.05, batch 128) on 8,500 training images
   of 3x32x32 (upscaled digits) and 1,500 validation images, on one torch thread as in a worker process. Reported:
   the training pass alone, training + validation, and the whole worker job (load checkpoint, train, validate,
   save checkpoint) - median over several epochs. The aim is <= 2 s.
2. **Load** (``load``): ``--players N`` for ``--minutes M`` on real processes (:mod:`.hyperquest_load`): with
   ``--db postgresql://...``, ``--web-processes W`` web processes on one port and ``--worker-processes K`` workers;
   without, the embedded server (SQLite) with K training processes. p50/p95/p99 latency of the page and of each API
   request, queue wait separately, epochs, errors, lost actions, baselines.
3. **Scaling** (``scaling``): the same players with 1 and with 2 worker processes: jobs done per minute, the ratio.
4. **Faults** (``faults``, PostgreSQL): a load run during which a worker process, a web process and the database
   are each killed (restarted) once: lost actions, epochs done exactly once, 5xx other than 503.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..hyperquest import require_web_extra
from ..hyperquest.jobs import epoch_job
from ..hyperquest.settings import DEFAULT_HPARAMS, DEFAULT_NETWORK
from ..hyperquest.tasks import prepare_dataset
from ..errors import ConfigError
from ..io import read_json, write_json, write_text
from .hyperquest_load import load_run

AIM_EPOCH_SECONDS = 2.0
PARTS = ("epoch", "load", "scaling", "faults")
# Baselines get the players' epoch budget: a small pool and limit let every one finish within a run.
LOAD_POOL, LOAD_EPOCH_LIMIT = 2, 8


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


# ---- 2-4. load, scaling, faults ---------------------------------------------------------------------------------
def run(out: Path, quick: bool, only: str | None = None, players: int | None = None, minutes: float | None = None,
        web_processes: int = 2, worker_processes: int = 2, db: str | None = None) -> dict:
    require_web_extra("httpx")               # the server and the simulated players' HTTP client
    parts = [part.strip() for part in (only or ",".join(PARTS)).split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ConfigError(f"--only: unknown part(s) {', '.join(unknown)} of the hyperquest study; parts: "
                          f"{', '.join(PARTS)}")
    if "faults" in parts and not db:
        raise ConfigError("--only faults needs --db postgresql://...: the faults are a PostgreSQL deployment's")
    players = players or (20 if quick else 100)
    seconds = 60.0 * (minutes or (1 if quick else 10))
    previous = out / "results.json"
    results = read_json(previous) if previous.is_file() else {}
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        scratch = Path(scratch)
        if "epoch" in parts:
            results["epoch"] = epoch_timing(scratch, epochs=3 if quick else 7)
        if "load" in parts:
            results["load"] = load_run(scratch / "load", players, seconds, db, web_processes, worker_processes,
                                       LOAD_POOL, LOAD_EPOCH_LIMIT)
        if "scaling" in parts:
            scaling_seconds = 60.0 if quick else 180.0
            runs = {str(k): load_run(scratch / f"scaling{k}", players, scaling_seconds, db, web_processes, k,
                                     LOAD_POOL, LOAD_EPOCH_LIMIT, drain_s=60) for k in (1, 2)}
            results["scaling"] = {"runs": runs, "ratio": runs["2"]["jobs_per_minute"] /
                                  max(1e-9, runs["1"]["jobs_per_minute"])}
        if "faults" in parts:
            results["faults"] = load_run(scratch / "faults", players, seconds, db, web_processes, worker_processes,
                                         LOAD_POOL, LOAD_EPOCH_LIMIT, faults=True)
    results["aim_epoch_seconds"] = AIM_EPOCH_SECONDS
    results["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write_json(out / "results.json", results)
    text = report(results)
    write_text(out / "report.md", text)
    print(text)
    return results


def _ms(row: dict, key: str) -> str:
    return f"{row[key] * 1000:.0f}" if row and key in row else "-"


def _load_lines(title: str, load: dict) -> list[str]:
    api, wait = load["api_latency_seconds"], load["queue_wait_seconds"]
    where = (f"{load['database']}, {load['web_processes']} web + {load['worker_processes']} worker process(es), "
             f"pool of {load['dataset_pool']} data sets, epoch limit {load['epoch_limit']}")
    drain = f"{load['drain_seconds']:.0f} s" if load["drain_seconds"] is not None else "did not empty"
    lines = [f"## {title}: {load['players']} players for {load['play_seconds'] / 60:.0f} min ({where})", "",
             f"- requests: {load['requests']:,} ({load['status_counts']}); 5xx other than 503: "
             f"**{load['server_errors']}**; 503 (database down, retried): {load['unavailable_503']}; broken "
             f"connections (retried): {load['transport_errors']}",
             f"- API latency: p50 {_ms(api, 'p50')} ms, **p95 {_ms(api, 'p95')} ms**, p99 {_ms(api, 'p99')} ms "
             f"({api.get('count', 0):,} requests); queue wait before an epoch starts: p50 "
             f"{wait.get('p50', 0):.1f} s, p95 {wait.get('p95', 0):.1f} s",
             f"- actions accepted: {load['accepted_actions']:,}; lost: **{load['lost_actions']}**; epochs accepted "
             f"{load['epochs_accepted']}, done {load['epochs_done']}, each exactly once: "
             f"**{load['epochs_counted_exactly_once']}**",
             f"- jobs done while playing: {load['jobs_done_in_play']} ({load['jobs_per_minute']:.1f} per minute); "
             f"queue empty {drain} after play ended; baselines computed: **{load['baselines_done']} of "
             f"{load['baselines_expected']}**; trials finished: {load['trials_finished']}"]
    for event in load.get("faults", []):
        lines.append(f"- fault at {event['at_s']:.0f} s: {event['fault']}")
    lines += ["", "| request | count | p50 ms | p95 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|---:|",
              *(f"| {kind} | {row['count']} | {_ms(row, 'p50')} | {_ms(row, 'p95')} | {_ms(row, 'p99')} | "
                f"{_ms(row, 'max')} |" for kind, row in load["latency_seconds"].items()), ""]
    return lines


def report(results: dict) -> str:
    lines = ["# HyperQuest under load", "", f"Measured {results.get('measured_at', '')}.", ""]
    timing = results.get("epoch")
    if timing:
        lines += [
            f"## One epoch of the default network ({timing['train_size']:,} x "
            f"{'x'.join(map(str, timing['input_shape']))} training, {timing['val_size']:,} validation images, "
            "one torch thread)", "", "| step | median seconds |", "|---|---:|",
            f"| training pass | {timing['train_pass_median_s']:.2f} |",
            f"| training + validation | {timing['train_and_validate_median_s']:.2f} |",
            f"| whole worker job (load, train, validate, save) | {timing['worker_job_median_s']:.2f} |", "",
            f"Aim ≤ {AIM_EPOCH_SECONDS:.0f} s: "
            f"{'met' if timing['train_and_validate_median_s'] <= AIM_EPOCH_SECONDS else 'NOT met'}"
            f" (median over {timing['epochs']} epochs).", ""]
    if results.get("load"):
        lines += _load_lines("Load", results["load"])
    if results.get("scaling"):
        runs = results["scaling"]["runs"]
        lines += ["## Scaling: 1 vs 2 worker processes (same players, same machine)", "",
                  "| workers | jobs per minute | API p95 ms | queue wait p50 s |", "|---:|---:|---:|---:|",
                  *(f"| {k} | {run['jobs_per_minute']:.1f} | {_ms(run['api_latency_seconds'], 'p95')} | "
                    f"{run['queue_wait_seconds'].get('p50', 0):.1f} |" for k, run in runs.items()), "",
                  f"Ratio 2 / 1 workers: **{results['scaling']['ratio']:.2f}x** (target ≥ 1.5x).", ""]
    if results.get("faults"):
        lines += _load_lines("Faults", results["faults"])
    return "\n".join(lines)
