"""Classification + localization: what to train, and how to weigh the two losses.

Two questions of the lecture, measured with ``loc/classify_localize`` on the scenes' single-object images, every run
through :func:`detseg.api.train` with the registry defaults otherwise:

1. **Frozen features vs fine-tuning, from random and from pre-trained features.** ``frozen``: only the two heads
   train, on a backbone that stays at its random initialisation for every epoch (``freeze_epochs`` = all epochs,
   the lower bound of "features from elsewhere"); ``joint``: everything trains from the start (``freeze_epochs=0``);
   ``schedule``: heads alone for the first half of the epochs, then everything. The lecture's setting is transfer:
   features of a network pre-trained for classification. No weights are downloaded, so each seed first pre-trains
   one: the same model with the class loss only (``box_weight=0``), the same epochs and image count, on *other*
   images (``data_seed`` = :data:`PRETRAIN_DATA_SEED` + seed; the localization runs use ``data_seed`` 0). Its
   convolutional backbone - weights and batch-norm statistics, nothing of the heads - is saved as ``backbone.pt``
   and loaded through ``api.train(init=...)`` into ``pretrained_frozen`` (heads only on those features) and
   ``pretrained_joint`` (everything fine-tunes from them). The pre-training's top-1 and seconds are recorded: its
   cost comes on top of the pretrained rows' own training seconds.
2. **The multi-task weight.** Training minimises ``cls + box_weight * box``. Sweeping ``box_weight`` changes the
   *loss itself*: the total grows with the weight whatever the model does, so totals of different weights cannot be
   compared. The table shows the magnitudes (class loss, the box loss before and after weighting, the total) and lets
   the validation metric decide: ``loc_acc`` (class right and box IoU >= 0.5), with top-1 and mean box IoU beside.

Loss magnitudes are the means over the last training epoch (history.csv); metrics are those of best.pt. With more
than one seed, every number is the median over seeds; each row's ``per_seed`` keeps the seeds' own metrics.
"""
from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

from .. import api, registry
from ..engine.checkpoint import load_checkpoint, save_checkpoint
from ..io import write_json
from ..viz import save_figure, save_report   # importing viz selects matplotlib's file-only Agg backend

import matplotlib.pyplot as plt  # noqa: E402,I001

MODEL = "loc/classify_localize"
BOX_WEIGHTS = (0.1, 1.0, 10.0, 100.0)
# Quick: 64 px images (a quarter of the pixels) so that each run sees 10,000 images in well under a minute on one
# thread - fewer and the runs are still guessing. One torch thread keeps a shared machine from slowing the runs down
# unevenly (oversubscribed OpenMP threads wait for each other); the full study uses the machine's cores.
SETTINGS = {
    True: {"train_size": 2000, "val_size": 200, "epochs": 5, "seeds": (0,), "knobs": {"image_size": 64, "threads": 1}},
    False: {"train_size": 4000, "val_size": 300, "epochs": 10, "seeds": (0, 1, 2), "knobs": {}},
}
METRICS = ("loc_acc", "top1", "box_iou")
# Pre-training images: data_seed PRETRAIN_DATA_SEED + seed, never the localization runs' default data_seed 0, so the
# pre-trained features come from elsewhere (scenes are a pure function of (data_seed, split, index)).
PRETRAIN_DATA_SEED = 1000
BACKBONE_PREFIX = "features.backbone."   # what is transferred: the convolutional trunk, not the pooled MLP or heads
PRETRAINED = ("frozen", "joint")         # the schedules also run from the pre-trained backbone, as pretrained_NAME


def schedules(epochs: int) -> dict[str, int]:
    """``freeze_epochs`` of each training schedule for a run of ``epochs`` epochs."""
    return {"frozen": epochs, "joint": 0, "schedule": max(1, epochs // 2)}


def read_history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as handle:
        return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(handle)]


def run_overrides(settings: dict, **knobs) -> dict:
    """A run's overrides: the study's data sizes and ``knobs`` for every run, then this run's own ``knobs``."""
    return {"train_size": settings["train_size"], "val_size": settings["val_size"], **settings.get("knobs", {}),
            **knobs}


def pretrain_knobs(settings: dict) -> dict:
    """The pre-training's knobs besides its data_seed: classification only, evaluated once, after the last epoch.

    With ``box_weight=0`` the task's main metric (loc_acc, which picks best.pt) says nothing; evaluating only at the
    end makes best.pt the final weights, and the returned top-1 theirs."""
    return {"box_weight": 0.0, "freeze_epochs": 0, "eval_every": settings["epochs"]}


def pretrain(out: Path, settings: dict, seed: int) -> dict:
    """Pre-train for one seed; its top-1 (own validation images), seconds, and the saved backbone checkpoint.

    ``backbone.pt`` holds the pre-training's ``model_name``, ``config`` and ``info`` with only the backbone's tensors,
    so ``api.train(init=...)`` loads those (matched by name and shape) and the heads keep their fresh initialisation.
    """
    run_dir = out / "runs" / f"pretrain-seed{seed}"
    overrides = run_overrides(settings, **pretrain_knobs(settings), data_seed=PRETRAIN_DATA_SEED + seed)
    metrics = api.train(MODEL, epochs=settings["epochs"], seed=seed, out=run_dir, overrides=overrides,
                        progress=False, verbose=False)
    payload = load_checkpoint(run_dir / "best.pt")
    backbone = {name: tensor for name, tensor in payload["model"].items() if name.startswith(BACKBONE_PREFIX)}
    checkpoint = run_dir / "backbone.pt"
    save_checkpoint(checkpoint, {**{key: payload[key] for key in ("model_name", "config", "info")}, "model": backbone})
    print(f"{'pretrain':16s} seed {seed}  top1 {metrics['top1']:.3f}  {metrics['train_seconds']:.0f} s", flush=True)
    return {"seed": seed, "data_seed": PRETRAIN_DATA_SEED + seed, "top1": metrics["top1"],
            "train_seconds": metrics["train_seconds"], "checkpoint": str(checkpoint)}


def pretraining_summary(runs: list[dict], settings: dict) -> dict:
    """results.json's ``pretraining``: medians over seeds, the total cost, and each seed's own numbers."""
    return {"model": MODEL, "knobs": pretrain_knobs(settings), "data_seed_offset": PRETRAIN_DATA_SEED,
            "epochs": settings["epochs"], "train_size": settings["train_size"],
            "top1": statistics.median(run["top1"] for run in runs),
            "train_seconds": statistics.median(run["train_seconds"] for run in runs),
            "total_seconds": sum(run["train_seconds"] for run in runs), "seeds": len(runs),
            "per_seed": {key: [run[key] for run in runs]
                         for key in ("seed", "data_seed", "top1", "train_seconds", "checkpoint")}}


def train_run(run_dir: Path, settings: dict, seed: int, init: Path | str | None = None, **knobs) -> dict:
    """One training run; its metrics, last-epoch loss magnitudes and per-epoch loc_acc.

    ``settings``: train_size, val_size, epochs, seeds, and ``knobs`` applied to every run (empty in the study; tests
    shrink the model with it). ``init``: a checkpoint whose matching tensors start the model (the pre-trained
    backbone)."""
    metrics = api.train(MODEL, epochs=settings["epochs"], seed=seed, out=run_dir,
                        overrides=run_overrides(settings, **knobs), progress=False, verbose=False, init=init)
    history = read_history(run_dir)
    last = history[-1]
    box_weight = knobs.get("box_weight", registry.get(MODEL).options["box_weight"].default)
    return {
        **{key: metrics[key] for key in METRICS}, "train_seconds": metrics["train_seconds"],
        "cls_loss": last["train_cls"], "box_loss_weighted": last["train_box"],
        "box_loss": last["train_box"] / box_weight if box_weight else float("nan"),
        "total_loss": last["train_loss"], "val_loss": last["val_loss"],
        "loc_acc_per_epoch": [row["loc_acc"] for row in history],
        "train_loss_per_epoch": [row["train_loss"] for row in history],
    }


def median_over_seeds(runs: list[dict]) -> dict:
    """Per-key median of the seeds' numbers (curves: per epoch)."""
    merged = {}
    for key, value in runs[0].items():
        if isinstance(value, list):
            merged[key] = [statistics.median(run[key][i] for run in runs) for i in range(len(value))]
        else:
            merged[key] = statistics.median(run[key] for run in runs)
    return merged


def sweep(out: Path, settings: dict, cases: dict[str, dict], inits: dict[int, str] | None = None) -> dict[str, dict]:
    """Every case (name -> knobs) over every seed, medians kept, each seed's run directory under ``out``.

    ``inits``: seed -> checkpoint every case of that seed starts from (the pre-trained backbone); none: random init.
    Each row keeps ``per_seed`` lists (seed, the METRICS, train_seconds) beside its medians."""
    results = {}
    for name, knobs in cases.items():
        runs = [train_run(out / "runs" / f"{name}-seed{seed}", settings, seed,
                          init=None if inits is None else inits[seed], **knobs) for seed in settings["seeds"]]
        results[name] = {"knobs": knobs, "init": "random" if inits is None else "pretrained",
                         **median_over_seeds(runs), "seeds": len(runs),
                         "per_seed": {"seed": list(settings["seeds"]),
                                      **{key: [run[key] for run in runs] for key in (*METRICS, "train_seconds")}}}
        shown = "  ".join(f"{key} {results[name][key]:.3f}" for key in METRICS)
        print(f"{name:16s} {shown}  cls {results[name]['cls_loss']:.3f}  box×w {results[name]['box_loss_weighted']:.3f}"
              f"  total {results[name]['total_loss']:.3f}", flush=True)
    return results


def plot(out: Path, schedule_results: dict, weight_results: dict) -> None:
    """localization.png: loc_acc per epoch by schedule; loss magnitudes and metrics against box_weight."""
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, result in schedule_results.items():
        curve = result["loc_acc_per_epoch"]
        style = "s--" if result.get("init") == "pretrained" else "o-"
        left.plot(range(1, len(curve) + 1), curve, style, label=f"{name} (freeze {result['knobs']['freeze_epochs']})")
    left.set(xlabel="epoch", ylabel="validation loc_acc", title="frozen vs joint, random vs pre-trained")
    left.legend()
    weights = [result["knobs"]["box_weight"] for result in weight_results.values()]
    for key, label in (("cls_loss", "class loss"), ("box_loss", "box loss (unweighted)"),
                       ("box_loss_weighted", "box_weight × box loss"), ("total_loss", "total")):
        middle.plot(weights, [result[key] for result in weight_results.values()], "o-", label=label)
    middle.set(xscale="log", yscale="log", xlabel="box_weight", ylabel="last-epoch training loss",
               title="the loss changes with its weight")
    middle.legend(fontsize=8)
    for key in METRICS:
        right.plot(weights, [result[key] for result in weight_results.values()], "s-", label=key)
    right.set(xscale="log", xlabel="box_weight", ylabel="validation metric", title="the metric decides",
              ylim=(0, 1.02))
    right.legend()
    for axis in (left, middle, right):
        axis.grid(alpha=0.3)
    save_figure(figure, out / "localization.png")


def _row(name: str, result: dict) -> str:
    spread = ", ".join(f"{value:.3f}" for value in result.get("per_seed", {}).get("loc_acc", []))
    return (f"| {name} | {result['loc_acc']:.3f} | {result['top1']:.3f} | {result['box_iou']:.3f} "
            f"| {result['cls_loss']:.4f} | {result['box_loss']:.4f} | {result['box_loss_weighted']:.4f} "
            f"| {result['total_loss']:.4f} | {result['train_seconds']:.0f} | {spread} |")


def _pretraining_lines(results: dict) -> list[str]:
    """The pre-training's cost and what its features bought, against the same schedules from random init."""
    pretraining, by_schedule = results.get("pretraining"), results["schedules"]
    if not pretraining:
        return []
    per_seed = ", ".join(f"{value:.3f}" for value in pretraining["per_seed"]["top1"])

    def versus(name: str) -> str:    # pretrained_NAME against NAME from random init, every metric
        pretrained, random_init = by_schedule[f"pretrained_{name}"], by_schedule[name]
        return f"pretrained_{name} vs {name}: " + ", ".join(
            f"{key} {pretrained[key]:.3f} vs {random_init[key]:.3f}" for key in METRICS)

    comparisons = "; ".join(versus(name) for name in PRETRAINED
                            if name in by_schedule and f"pretrained_{name}" in by_schedule)
    return [
        f"Pre-training, once per seed: `{pretraining['model']}` with the class loss only (box_weight=0), "
        f"{pretraining['epochs']} epochs on {pretraining['train_size']} *other* single-object images (data_seed "
        f"{pretraining['data_seed_offset']} + seed; the runs above use data_seed 0): top-1 "
        f"**{pretraining['top1']:.3f}** on its own validation images (per seed: {per_seed}), "
        f"{pretraining['train_seconds']:.0f} s per seed, {pretraining['total_seconds']:.0f} s in all. Its backbone - "
        "weights and batch-norm statistics, not the heads - starts the `pretrained_*` rows of its seed "
        "(`api.train(init=backbone.pt)`, heads freshly initialised); their train s leave it out: with it, a seed's "
        f"pretrained rows cost {pretraining['train_seconds']:.0f} s more between them. {comparisons}.", "",
    ]


def write_report(out: Path, results: dict) -> str:
    settings, by_schedule, by_weight = results["settings"], results["schedules"], results["box_weights"]
    header = ["| run | loc_acc | top-1 | box IoU | class loss | box loss | box_weight × box | total | train s "
              "| loc_acc per seed |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    best_weight = max(by_weight, key=lambda name: by_weight[name]["loc_acc"])
    lowest_total = min(by_weight, key=lambda name: by_weight[name]["total_loss"])
    best_schedule = max(by_schedule, key=lambda name: by_schedule[name]["loc_acc"])
    lightest, heaviest = by_weight[min(by_weight, key=lambda n: by_weight[n]["knobs"]["box_weight"])], \
        by_weight[max(by_weight, key=lambda n: by_weight[n]["knobs"]["box_weight"])]
    schedule = by_schedule["schedule"]
    released, curve = schedule["knobs"]["freeze_epochs"], schedule["train_loss_per_epoch"]
    if 0 < released < len(curve):
        jump = curve[released] / curve[released - 1]
        release_note = (f"Here the training loss of the first joint epoch was {jump:.2f}× that of the last frozen one, "
                        f"and the schedule ended at loc_acc {schedule['loc_acc']:.3f} against "
                        f"{by_schedule['joint']['loc_acc']:.3f} for joint training from the start.")
    else:
        release_note = ""
    losses_by_epoch = "; ".join(f"{name}: " + ", ".join(f"{loss:.2f}" for loss in result["train_loss_per_epoch"])
                                for name, result in by_schedule.items())
    lines = [
        "# Classification + localization: frozen features, fine-tuning, and the multi-task weight", "",
        f"`{MODEL}` on single-object scenes at {results['image_size']} px: {settings['train_size']} training and "
        f"{settings['val_size']} validation images, {settings['epochs']} epochs, seeds {list(settings['seeds'])} "
        f"(medians); {results['wall_seconds']:.0f} s in all, pre-training included. Losses: means over the last "
        "training epoch.", "",
        "## Frozen features vs joint fine-tuning, from random and from pre-trained features", "", *header,
        *(_row(f"{name} (freeze_epochs={result['knobs']['freeze_epochs']})", result)
          for name, result in by_schedule.items()), "",
        f"Best: **{best_schedule}**. `frozen` keeps the backbone's random initialisation, so its heads read random "
        "features; frozen runs train fastest per epoch because no gradient reaches the backbone. Freezing also keeps "
        "batch norm on its running statistics, which for a random backbone are the initial (0, 1): when the schedule "
        "releases the backbone, batch norm switches to batch statistics and the features the heads were fitted to "
        f"change scale at once. {release_note} Training loss per epoch - {losses_by_epoch}.", "",
        *_pretraining_lines(results),
        "## box_weight sweep (joint training)", "", *header,
        *(_row(f"box_weight={result['knobs']['box_weight']:g}", result) for result in by_weight.values()), "",
        f"The total loss grows with the weight (lowest total: {lowest_total}), so it says nothing about which run is "
        f"better; the validation metric decides: best loc_acc at **{best_weight}**. At the smallest weight the boxes "
        f"lag (box IoU {lightest['box_iou']:.3f} vs {by_weight[best_weight]['box_iou']:.3f}); at the largest the box "
        f"term is {heaviest['box_loss_weighted'] / max(heaviest['cls_loss'], 1e-9):.1f}× the class loss and "
        f"classification lags (top-1 {heaviest['top1']:.3f} vs {by_weight[best_weight]['top1']:.3f}).", "",
        "![localization](localization.png)", "",
    ]
    return save_report(out / "report.md", lines)


def run(out: Path, quick: bool) -> dict:
    started = time.perf_counter()
    settings = SETTINGS[quick]
    pretrainings = [pretrain(out, settings, seed) for seed in settings["seeds"]]
    freeze_epochs = schedules(settings["epochs"])
    by_schedule = sweep(out, settings, {name: {"freeze_epochs": freeze} for name, freeze in freeze_epochs.items()})
    by_schedule |= sweep(out, settings, {f"pretrained_{name}": {"freeze_epochs": freeze_epochs[name]}
                                         for name in PRETRAINED},
                         inits={done["seed"]: done["checkpoint"] for done in pretrainings})
    by_weight = sweep(out, settings, {f"box_weight={weight:g}": {"box_weight": weight, "freeze_epochs": 0}
                                      for weight in BOX_WEIGHTS})
    plot(out, by_schedule, by_weight)
    image_size = settings.get("knobs", {}).get("image_size", registry.get(MODEL).all_options()["image_size"].default)
    results = {"settings": {**settings, "seeds": list(settings["seeds"])}, "image_size": image_size,
               "pretraining": pretraining_summary(pretrainings, settings), "schedules": by_schedule,
               "box_weights": by_weight, "wall_seconds": time.perf_counter() - started}
    write_json(out / "results.json", results)
    print(write_report(out, results))
    return results
