"""Prediction as a tool: images per second over a folder, one image per forward against batches of eight.

``detseg predict CHECKPOINT FOLDER`` decodes the folder's images in a DataLoader worker while the model runs, and
puts ``--batch-size`` images through each forward. This study times exactly that call (:func:`detseg.api.predict`,
in this process, model loading and the worker's start included, as a user waits for them) over folders of scenes
written to disk as PNG files:

- 200 scenes of 128 px, the size the detector was trained at;
- 200 photo-sized scenes of 640 x 480 px, which the square detector resizes to 128 px itself: decoding, resizing and
  drawing grow with the pixels, the network's work does not.

The detector is a ``det/faster_rcnn`` trained for a short time budget on the in-memory scenes (``--quick``: one
tiny epoch), so its scores, and with them the NMS work per image, are those of a detector that has learned
something rather than a random one's near-uniform scores. Every setting runs with drawings (PNG per image, the
default) and without (``--no-draw``); batch 1 and batch 8 alternate, and each number is the median of the repeats.

Target (issue 10): on the 200-image folder, batch 8 with one decoding worker reaches >= 1.3x the images per second
of batch 1.
"""
from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import torch

from .. import api
from ..data.export import write_scenes
from ..io import write_json
from ..viz import save_report

TARGET_RATIO = 1.3
BATCHES = (1, 8)
SETTINGS = {
    False: {"images": 200, "repeats": 5, "train": ["train_size=1000", "val_size=100"], "time_budget": 60.0,
            "epochs": 100},
    True: {"images": 16, "repeats": 1, "train": ["train_size=16", "val_size=8"], "time_budget": None, "epochs": 1},
}
FOLDERS = {"128 px": 128, "640x480 px": (640, 480)}


def prepare_folder(root: Path, size: int | tuple[int, int], count: int) -> Path:
    """``count`` validation scenes of ``size`` as PNG files in ``root/val`` (written once, kept across runs)."""
    folder = root / "val"
    if len(list(folder.glob("*.png"))) != count:
        shutil.rmtree(root, ignore_errors=True)
        write_scenes(root, train=0, val=count, size=size, seed=0, progress=False)
    return folder


def train_detector(out: Path, settings: dict) -> Path:
    """The short-trained det/faster_rcnn (kept across runs of the same settings)."""
    run = out / "detector"
    if not (run / "best.pt").is_file():
        api.train("det/faster_rcnn", epochs=settings["epochs"], time_budget=settings["time_budget"], out=run,
                  overrides=settings["train"], progress=False, verbose=False)
    return run / "best.pt"


def time_predict(checkpoint: Path, folder: Path, scratch: Path, batch_size: int, draw: bool) -> tuple[float, list]:
    """Seconds of one ``detseg predict`` over ``folder`` (one decoding worker), and its predictions."""
    shutil.rmtree(scratch, ignore_errors=True)
    started = time.perf_counter()
    results = api.predict(checkpoint, [folder], out=scratch, batch_size=batch_size, workers=1, draw=draw)
    return time.perf_counter() - started, results


def measure(checkpoint: Path, folder: Path, scratch: Path, repeats: int, draw: bool) -> dict:
    """Median seconds and images per second per batch size; batch sizes alternate so that drift hits both."""
    seconds = {batch: [] for batch in BATCHES}
    time_predict(checkpoint, folder, scratch, BATCHES[-1], draw)             # warm-up: first-call costs, disk cache
    for _ in range(repeats):
        for batch in BATCHES:
            elapsed, results = time_predict(checkpoint, folder, scratch, batch, draw)
            seconds[batch].append(elapsed)
    rows = {batch: {"seconds": statistics.median(times), "all_seconds": times,
                    "images_per_second": len(results) / statistics.median(times)} for batch, times in seconds.items()}
    detections = sum(len(entry["boxes"]) for entry in results) / max(1, len(results))
    return {"by_batch": rows, "ratio": rows[BATCHES[-1]]["images_per_second"] / rows[1]["images_per_second"],
            "images": len(results), "detections_per_image": detections}


def run(out: Path, quick: bool = False) -> dict:
    settings = SETTINGS[quick]
    checkpoint = train_detector(out, settings)
    measured = {}
    for name, size in FOLDERS.items():
        folder = prepare_folder(out / f"images-{name.split()[0]}", size, settings["images"])
        for draw in (True, False):
            label = f"{name}, {'drawings' if draw else 'no drawings'}"
            print(f"timing {label}", flush=True)
            measured[label] = measure(checkpoint, folder, out / "scratch", settings["repeats"], draw)
    shutil.rmtree(out / "scratch", ignore_errors=True)
    headline = measured[f"{next(iter(FOLDERS))}, drawings"]
    results = {"settings": {**settings, "batches": list(BATCHES), "workers": 1}, "threads": torch.get_num_threads(),
               "detector": "det/faster_rcnn, " + (f"{settings['time_budget']:.0f} s of training" if
                                                  settings["time_budget"] else f"{settings['epochs']} tiny epoch"),
               "measured": measured, "target_ratio": TARGET_RATIO, "met": headline["ratio"] >= TARGET_RATIO}
    write_json(out / "results.json", results)
    print(write_report(out, results), flush=True)
    return results


def write_report(out: Path, results: dict) -> str:
    settings, measured = results["settings"], results["measured"]
    rows = []
    for label, result in measured.items():
        for batch, row in result["by_batch"].items():
            ratio = f"{result['ratio']:.2f}x" if batch != 1 else ""
            rows.append(f"| {label} | {batch} | {row['seconds']:.2f} | {row['images_per_second']:.1f} | {ratio} | "
                        f"{result['detections_per_image']:.1f} |")
    headline = measured[f"{next(iter(FOLDERS))}, drawings"]
    lines = [
        "# detseg predict: batch 8 against batch 1", "",
        f"`api.predict` (what `detseg predict CHECKPOINT FOLDER --batch-size B --workers 1` runs) over "
        f"{settings['images']} scenes PNGs per folder, {results['detector']}, {results['threads']} torch threads; "
        f"medians of {settings['repeats']} runs, each including model loading and the decoding worker's start.", "",
        "| folder | batch | seconds | images/s | batch 8 / batch 1 | detections per image |",
        "|---|---:|---:|---:|---:|---:|", *rows, "",
        f"Target: batch 8 >= {TARGET_RATIO}x the images/s of batch 1 on the 128 px folder with drawings: "
        f"{headline['ratio']:.2f}x, {'met' if results['met'] else 'MISSED'}.", ""]
    return save_report(out / "report.md", lines)
