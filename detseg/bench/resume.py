"""Kill -9 at random moments, then ``--resume``: is the result the uninterrupted run's, and is every file whole?

One reference run trains without interruption. Then each trial starts the same ``detseg train`` as a fresh process,
SIGKILLs it after a random delay drawn uniformly over the reference run's wall time (so kills land in start-up,
data generation, steps, mid-epoch and epoch-end checkpoint writes, evaluation and the final files alike), looks
at what the kill left on disk, and resumes. A trial is exact when the resumed run's metrics.json and history.csv
equal the reference's in every value except wall-clock ones (seconds, images/s, ms per image).

What counts as damage: a file under its final name that does not read back (a checkpoint that does not load, JSON
that does not parse, a PNG that does not verify). A temporary file (``.NAME.XXXX.tmp``) left by a kill mid-write is
not damage - the target beside it is whole - but it must be gone once the resumed run is done.
A kill before the first last.pt leaves nothing to resume: the trial then restarts the run from scratch, as a user
would, and says so.
"""
from __future__ import annotations

import csv
import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from ..engine.checkpoint import load_checkpoint
from ..errors import DetsegError
from ..io import write_json
from ..viz import save_report

WALL_CLOCK_KEYS = {"train_seconds", "train_images_per_second", "infer_ms_per_image"}
# (model, knobs): a detector, whose training draws from the RNG (anchor sampling) and whose evaluation is COCO AP;
# mid-epoch checkpoints every half second so that kills land between them too.
SETTINGS = {
    False: {"kills": 20, "args": ["det/faster_rcnn", "train_size=96", "val_size=16", "batch_size=8",
                                  "checkpoint_seconds=0.5", "--epochs", "3", "--seed", "3", "threads=2"]},
    True: {"kills": 5, "args": ["cls/mlp", "--data", "gaussians", "train_size=3000", "val_size=300", "width=64",
                                "batch_size=8", "checkpoint_seconds=0.2", "--epochs", "2", "--seed", "5",
                                "threads=2"]},
}


def comparable(run: Path) -> tuple[dict, list[dict]]:
    """A finished run's metrics and history, without the wall-clock quantities."""
    metrics = json.loads((run / "metrics.json").read_text())
    with open(run / "history.csv", newline="") as handle:
        history = [{key: value for key, value in row.items() if key != "seconds"} for row in csv.DictReader(handle)]
    return {key: value for key, value in metrics.items() if key not in WALL_CLOCK_KEYS}, history


def temporaries(run: Path) -> list[str]:
    return sorted(path.name for path in run.glob(".*.tmp")) if run.is_dir() else []


def damaged_files(run: Path) -> list[str]:
    """The files of ``run`` under their final names that do not read back whole."""
    damaged = []
    for path in sorted(run.iterdir()) if run.is_dir() else []:
        if path.name.startswith("."):
            continue
        try:
            if path.suffix == ".pt":
                load_checkpoint(path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix in (".csv", ".yaml"):
                path.read_text(encoding="utf-8")
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.verify()
        except (DetsegError, ValueError, OSError, SyntaxError):
            damaged.append(path.name)
    return damaged


def _train(args: list[str], run: Path, resume: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "detseg.cli", "train", *args, "--out", str(run), "--quiet"]
    return subprocess.run(command + (["--resume"] if resume else []), capture_output=True, text=True, timeout=3600)


def _kill_after(args: list[str], run: Path, delay: float) -> bool:
    """Start a run and SIGKILL it after ``delay`` seconds; False when it had already finished."""
    process = subprocess.Popen([sys.executable, "-m", "detseg.cli", "train", *args, "--out", str(run), "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True


def _state_at_kill(run: Path) -> str:
    if not (run / "last.pt").is_file():
        return "no last.pt yet"
    try:
        state = load_checkpoint(run / "last.pt")["trainer"]
    except DetsegError:
        return "last.pt unreadable"
    if (run / "metrics.json").is_file():
        return "finished files written"
    return f"epoch {state['epoch']} step {state['step_in_epoch']}"


def trial(args: list[str], run: Path, delay: float, reference: tuple) -> dict | None:
    """One kill and its resume; None when the run finished before the kill."""
    shutil.rmtree(run, ignore_errors=True)
    if not _kill_after(args, run, delay):
        return None
    row = {"kill_s": round(delay, 2), "state": _state_at_kill(run), "temporaries": temporaries(run),
           "damaged": damaged_files(run)}
    resumable = (run / "last.pt").is_file()
    result = _train(args, run, resume=resumable)
    row["resumed"] = "resume" if resumable else "restart"
    row["exit"] = result.returncode
    row["exact"] = result.returncode == 0 and comparable(run) == reference
    row["left_after"] = temporaries(run) + damaged_files(run)
    if result.returncode != 0:
        row["error"] = result.stderr.strip().splitlines()[-1:] or [""]
    return row


def run(out: Path, quick: bool = False, seed: int = 0) -> dict:
    settings = SETTINGS[quick]
    args = settings["args"]
    started = time.perf_counter()
    reference_run = out / "reference"
    shutil.rmtree(reference_run, ignore_errors=True)
    result = _train(args, reference_run)
    if result.returncode != 0:
        raise RuntimeError(f"the reference run failed: {result.stderr.strip()[-500:]}")
    reference_seconds = time.perf_counter() - started
    reference = comparable(reference_run)
    draw = random.Random(seed)
    rows, finished_first = [], 0
    while len(rows) < settings["kills"] and finished_first < 3 * settings["kills"]:
        delay = draw.uniform(0.05, 0.98) * reference_seconds
        row = trial(args, out / "killed", delay, reference)
        if row is None:
            finished_first += 1
            continue
        rows.append(row)
        print(f"kill {len(rows):>2} at {row['kill_s']:6.2f} s ({row['state']}): {row['resumed']} "
              f"{'exact' if row['exact'] else 'NOT EXACT'}", flush=True)
    results = {
        "model": args[0], "args": args, "reference_seconds": round(reference_seconds, 2),
        "reference_metrics": reference[0], "kills": len(rows), "finished_before_kill": finished_first,
        "exact": sum(row["exact"] for row in rows),
        "damaged_files_at_kill": sum(len(row["damaged"]) for row in rows),
        "temporaries_at_kill": sum(len(row["temporaries"]) for row in rows),
        "left_after_resume": sum(len(row["left_after"]) for row in rows),
        "median_kill_s": statistics.median(row["kill_s"] for row in rows) if rows else None,
        "trials": rows,
    }
    write_json(out / "results.json", results)
    save_report(out / "report.md", report_lines(results))
    return results


def report_lines(results: dict) -> list[str]:
    lines = [
        "# Kill -9 at random moments, then --resume",
        "",
        f"`detseg train {' '.join(results['args'])}`; the uninterrupted run took {results['reference_seconds']} s "
        f"(process start to exit). Kill moments uniform over 5-98% of that.",
        "",
        f"- **{results['exact']} / {results['kills']}** resumed runs equal the uninterrupted run (metrics.json and "
        "history.csv, every value but wall-clock ones)",
        f"- damaged files (final name, does not read back) right after the kills: {results['damaged_files_at_kill']}",
        f"- temporary files left by kills mid-write: {results['temporaries_at_kill']} (all removed by the resume: "
        f"{results['left_after_resume']} left)",
        f"- runs that finished before their kill (not counted): {results['finished_before_kill']}",
        "",
        "| # | kill at s | on disk at the kill | temporaries | then | exact |",
        "|--:|--:|---|--:|---|---|",
    ]
    for index, row in enumerate(results["trials"], 1):
        lines.append(f"| {index} | {row['kill_s']} | {row['state']} | {len(row['temporaries'])} | {row['resumed']} | "
                     f"{'yes' if row['exact'] else 'NO ' + ' '.join(row.get('error', []))} |")
    return lines + [""]
