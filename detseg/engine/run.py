"""A training run on disk: the loop of ``detseg train`` and the files it writes into the run directory:

RUN_DIR/config.yaml, last.pt, best.pt, history.csv, curves.png, val_predictions.png, metrics.json (and what a task
adds, e.g. predictions.json for detectors). Only process 0 writes; every write is atomic.
"""
from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

import torch

from ..io import atomic_write_bytes, write_json
from ..viz import grid, plot_curves, save_png
from ..tasks.base import predict_arrays
from .checkpoint import load_checkpoint
from .trainer import Trainer


def write_history(path: Path, history: list[dict]) -> None:
    columns: list[str] = []
    for row in history:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()})
    atomic_write_bytes(path, buffer.getvalue().encode())


def write_progress(run_dir: Path, history: list[dict], main: str) -> None:
    """history.csv and curves.png, rewritten whole from the trainer's history after every epoch."""
    write_history(run_dir / "history.csv", history)
    plot_curves(run_dir / "curves.png", history, main)


def _log(message: str, enabled: bool) -> None:
    if enabled:
        print(message, flush=True)


def fit(trainer: Trainer, run_dir: Path, verbose: bool = True) -> None:
    """Train until ``epochs`` or the time budget is used up, saving after every epoch."""
    config, main = trainer.config, trainer.task.main_metric
    writes = trainer.rank == 0
    epochs_at_start = trainer.epoch
    while trainer.epoch < config["epochs"] and not trainer.stopped_by_budget:
        started = time.perf_counter()
        stats = trainer.run_epoch(checkpoint_path=run_dir / "last.pt")
        last = trainer.epoch >= config["epochs"] or trainer.stopped_by_budget
        metrics = None
        if writes and (trainer.epoch % config["eval_every"] == 0 or last):
            metrics = trainer.evaluate()
        previous_best = trainer.best_metric
        row = trainer.record_epoch(stats, metrics, trainer.train_seconds)
        if writes:
            if trainer.best_metric > previous_best:
                trainer.save(run_dir / "best.pt")
            trainer.save(run_dir / "last.pt")
            write_progress(run_dir, trainer.history, main)
            shown = f"{main} {row[main]:.4f}" if not math.isnan(row[main]) else ""
            _log(f"epoch {row['epoch']:>3}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
                 f"{shown}  ({time.perf_counter() - started:.1f} s)", verbose)
        if trainer.world > 1:
            torch.distributed.barrier()
    if writes and trainer.epoch == epochs_at_start:
        # Nothing left to train: a run killed between last.pt and these files of its final epoch gets them now.
        write_progress(run_dir, trainer.history, main)
    if trainer.stopped_by_budget:
        _log(f"time budget of {config['time_budget']:g} s reached after {trainer.train_seconds:.1f} s of training",
             verbose and writes)


def finish(trainer: Trainer, run_dir: Path, build_model, params: int, verbose: bool = True) -> dict:
    """Evaluate best.pt (or the current weights when no epoch was evaluated) and write the final files.

    This evaluation runs without the models' result caches (Selective Search's disk cache), so that
    ``infer_ms_per_image`` counts all the work a new image costs.
    """
    task, bundle = trainer.task, trainer.bundle
    model = trainer.model
    best = run_dir / "best.pt"
    if best.is_file():
        model = build_model().to(trainer.device)
        model.load_state_dict(load_checkpoint(best)["model"])
    scorer = task.scorer(bundle)
    with model.without_caches():
        metrics = trainer.evaluate(model, scorer)
    metrics.update({
        "epochs": trainer.epoch,
        "best_epoch": trainer.best_epoch,
        "train_seconds": round(trainer.train_seconds, 3),
        "train_images_per_second": trainer.images_seen / trainer.train_seconds if trainer.train_seconds else 0.0,
        "params": params,
    })
    write_json(run_dir / "metrics.json", metrics)
    task.write_outputs(scorer, run_dir)
    images = task.validation_images(bundle, 8)
    if images:
        predictions = predict_arrays(model, task, images, bundle.info, trainer.device)
        pictures = [task.draw(image, prediction, bundle.info) for image, prediction in zip(images, predictions)]
        largest = max(max(picture.shape[1:]) for picture in pictures)
        save_png(run_dir / "val_predictions.png", grid(pictures, side=min(512, max(256, largest))))
    _log(f"metrics of {'best.pt' if best.is_file() else 'the final weights'}: "
         + "  ".join(f"{key} {value:.4g}" for key, value in metrics.items() if isinstance(value, float)), verbose)
    return metrics
