"""Real-data readiness: train on a COCO-format set too large to hold in memory, and watch start-up time and memory.

The set is the scenes at 512 x 512 px written to disk as COCO json + PNG (5,000 training images, 200 validation;
``--quick``: 500 / 50), made once and kept in the output directory. ``detseg train det/faster_rcnn`` runs on it as
a user would launch it - a separate process, ``--time-budget 120``, two DataLoader workers - while this study
samples every process of the run (the trainer and its workers) from ``/proc`` four times a second:

- start-up: seconds from launching the command to the line the trainer prints after its first step;
- memory: the largest resident set (RSS) of any one process, and the largest sum of proportional set sizes (PSS,
  shared pages divided among the processes sharing them - what the run really costs the machine).

Targets (issue 10): first step within 30 s of launch; no process above 3 GB resident; PSS sum at most 4 GB.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..io import write_json
from .detection_runs import prepare_scenes

TARGETS = {"first_step_s": 30.0, "max_rss_gb": 3.0, "max_pss_sum_gb": 4.0}
GIB = 1024 ** 3


def _settings(quick: bool) -> dict:
    return {"train": 500 if quick else 5000, "val": 50 if quick else 200, "size": 512,
            "time_budget": 30 if quick else 120, "num_workers": 2}


def prepare_files(out: Path, settings: dict) -> Path:
    """The COCO-format set on disk, written once (kept while its image counts match)."""
    root = out / f"scenes{settings['size']}-{settings['train']}"
    prepare_scenes(root, {"train": settings["train"], "val": settings["val"], "image_size": settings["size"]})
    return root


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _memory_of(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process, from /proc/PID/smaps_rollup; (0, 0) once it has gone."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def watch_run(command: list[str], log: Path, interval: float = 0.25) -> dict:
    """Run ``command``; return its start-up time, peak memory and exit status (output copied to ``log``)."""
    launched = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    first_step: list[float] = []
    lines: list[str] = []

    def read_output() -> None:
        for line in process.stdout:
            lines.append(line)
            if not first_step and line.startswith("first training step done"):
                first_step.append(time.perf_counter() - launched)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    peak_rss, peak_pss, most_processes = 0, 0, 0
    while process.poll() is None:
        tree = [process.pid]
        for pid in tree:            # grows while it is walked: children of children
            tree += _children(pid)
        sizes = [_memory_of(pid) for pid in tree]
        peak_rss = max(peak_rss, max(rss for rss, _ in sizes))
        peak_pss = max(peak_pss, sum(pss for _, pss in sizes))
        most_processes = max(most_processes, len(tree))
        time.sleep(interval)
    reader.join(timeout=10)
    log.write_text("".join(lines))
    return {"returncode": process.returncode, "first_step_s": first_step[0] if first_step else None,
            "wall_s": time.perf_counter() - launched, "max_rss_gb": peak_rss / GIB,
            "max_pss_sum_gb": peak_pss / GIB, "processes": most_processes}


def run(out: Path, quick: bool = False) -> dict:
    settings = _settings(quick)
    root = prepare_files(out, settings)
    command = [sys.executable, "-m", "detseg.cli", "train", "det/faster_rcnn", "--data", str(root / "train.json"),
               "--val", str(root / "val.json"), "--time-budget", str(settings["time_budget"]), "--epochs", "100",
               "--out", str(out / "run"), f"num_workers={settings['num_workers']}"]
    env_note = f"{os.cpu_count()} cores"
    print("launching: " + " ".join(command), flush=True)
    measured = watch_run(command, out / "train.log")
    checks = {key: measured[key] is not None and measured[key] <= limit for key, limit in TARGETS.items()}
    metrics_file = out / "run" / "metrics.json"
    measured["metrics"] = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    result = {"settings": settings, "command": " ".join(command[3:]), "machine": env_note, **measured,
              "targets": TARGETS, "met": checks}
    rows = [["first step after launch (s)", _shown(measured["first_step_s"]), f"<= {TARGETS['first_step_s']:.0f}",
             _verdict(checks["first_step_s"])],
            ["largest process RSS (GB)", _shown(measured["max_rss_gb"], 2), f"<= {TARGETS['max_rss_gb']:.0f}",
             _verdict(checks["max_rss_gb"])],
            ["sum of PSS over the run's processes (GB)", _shown(measured["max_pss_sum_gb"], 2),
             f"<= {TARGETS['max_pss_sum_gb']:.0f}", _verdict(checks["max_pss_sum_gb"])]]
    report = [f"# Streaming a COCO-format set: {settings['train']:,} training images of {settings['size']} px",
              "", f"`detseg {result['command']}` on {env_note}; exit status {measured['returncode']}, "
              f"{measured['processes']} processes at most, {measured['wall_s']:.0f} s in all; the run's AP "
              f"{_shown(measured['metrics'].get('ap'), 3)} after {settings['time_budget']} s of training.", "",
              "| measure | value | target | |", "|---|---:|---:|---|",
              *[f"| {' | '.join(row)} |" for row in rows], ""]
    (out / "report.md").write_text("\n".join(report))
    write_json(out / "results.json", result)
    print("\n".join(report), flush=True)
    return result


def _shown(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"
