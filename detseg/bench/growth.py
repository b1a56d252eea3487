"""Net2Net: does growing a small network mid-training reach the big network's accuracy sooner than training the big
network from scratch?

Chen, Goodfellow & Shlens (2016) grow a trained *teacher* into a bigger *student* that computes the same function
(:mod:`detseg.growth`: Net2WiderNet and Net2DeeperNet), so the student starts where the teacher is instead of at
chance. The lecture's claim (CS231n, HyperQuest's "grow" button): this reaches the big network's accuracy in less
time than training the big network from its random initialisation. Measured here on one HyperQuest data set with
HyperQuest's own training pieces (:mod:`detseg.hyperquest.training`, default hyperparameters, one torch thread as in a
worker process). Arms, per seed:

* ``small`` - the small network (the teacher). It is grown after ``small_epochs`` epochs and then trained on to the
  same total epochs as the others, to show where it plateaus (its curve up to the growth is the teacher's).
* ``grown`` - the teacher after ``small_epochs`` epochs, widened to the big network's width (every hidden layer) and
  deepened by one identity layer to the big network's shape, then trained ``grown_epochs`` more epochs. Its clock
  includes the teacher's epochs and the growth itself.
* ``random_pad`` - Net2Net's baseline: the big network of the same shape randomly initialised, with the teacher's
  weights copied into the slots they have in it. It reuses the teacher's weights but not its function.
* ``scratch`` - the big network from random initialisation (the same init as ``random_pad``'s new weights), trained
  ``small_epochs + grown_epochs`` epochs.

The clock counts training passes only (plus the growth); validation is run after every epoch but not timed. The
target accuracy is the median final accuracy of ``scratch`` over the seeds minus ``tolerance``; an arm's
``seconds_to_target`` is the first cumulative time at which its validation accuracy reaches it.
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ..data.classification import make_classification_data
from ..growth import deepen, widen
from ..hyperquest.settings import DEFAULT_HPARAMS, DEFAULT_NETWORK
from ..hyperquest.training import WIDEN_NOISE, build_network, make_trainer
from ..io import write_json
from . import mean_std
from ..viz import save_figure, save_report   # importing viz selects matplotlib's file-only Agg backend

import matplotlib.pyplot as plt  # noqa: E402,I001
from matplotlib.ticker import MaxNLocator  # noqa: E402

ARMS = ("small", "grown", "random_pad", "scratch")
COLOURS = {"small": "tab:gray", "grown": "tab:blue", "random_pad": "tab:orange", "scratch": "tab:red"}
# Upscaled handwritten digits (3x32x32, ten classes), a HyperQuest data set on which a one-layer MLP of 64 units
# clearly underfits (a quick look: ~0.945 validation accuracy and a training loss ~5x that of the big one) while
# HyperQuest's default network (two layers of 256) reaches ~0.967. The input layer dominates an MLP's cost on 3,072
# inputs, so the small network's epochs are cheap - the time Net2Net means to save. 64 -> 256 is a x4 widening,
# HyperQuest's largest, and one deepening: the two clicks a player would make.
SMALL_NETWORK = {"arch": "mlp", "width": 64, "depth": 1}
SETTINGS = {
    True: {"data": {"name": "digits_images", "n_train": 8000, "n_val": 1500, "seed": 1, "classes": 10},
           "small": SMALL_NETWORK, "big": dict(DEFAULT_NETWORK), "hparams": dict(DEFAULT_HPARAMS),
           "small_epochs": 4, "grown_epochs": 10, "seeds": (0, 1, 2), "tolerance": 0.005, "threads": 1},
    False: {"data": {"name": "digits_images", "n_train": 10000, "n_val": 2000, "seed": 1, "classes": 10},
            "small": SMALL_NETWORK, "big": dict(DEFAULT_NETWORK), "hparams": dict(DEFAULT_HPARAMS),
            "small_epochs": 6, "grown_epochs": 18, "seeds": (0, 1, 2, 3, 4), "tolerance": 0.005, "threads": 1},
}
PRESERVATION_BATCH = 512     # validation inputs on which the grown network's logits are compared with the teacher's


# ---- the measurements ------------------------------------------------------------------------------------------
def seconds_to_target(epochs: list[dict], target: float) -> float | None:
    """The cumulative ``seconds`` of the first epoch whose ``val_acc`` reaches ``target``; None if none does."""
    for epoch in epochs:
        if epoch["val_acc"] is not None and epoch["val_acc"] >= target:
            return epoch["seconds"]
    return None


def train_for(trainer, epochs: int, seconds: float = 0.0) -> list[dict]:
    """``epochs`` more epochs, each timed (training pass only) and validated; ``seconds`` is the clock so far."""
    curve = []
    for _ in range(epochs):
        start = time.perf_counter()
        trainer.run_epoch()
        seconds += time.perf_counter() - start
        curve.append({"epoch": trainer.epoch, "seconds": seconds, "val_acc": float(trainer.evaluate()["top1"])})
    return curve


def net2net(teacher: nn.Module, big: dict, inputs: torch.Tensor, seed: int) -> nn.Module:
    """The teacher widened (every hidden layer to ``big["width"]``) and deepened (identity layers after the last one)
    to the big network's shape, computing the teacher's function. ``inputs``: a training batch, whose statistics the
    new layers' batch norms start from, so that training mode is (nearly) unchanged too."""
    generator = torch.Generator().manual_seed(seed)
    grown = teacher
    for layer in range(len(teacher.blocks)):
        if big["width"] > grown.blocks[layer][0].out_features:
            grown = widen(grown, layer, new_width=big["width"], generator=generator, noise=WIDEN_NOISE)
    while len(grown.blocks) < big["depth"]:
        grown = deepen(grown, len(grown.blocks) - 1, inputs=inputs)
    return grown


def random_pad(teacher: nn.Module, fresh: nn.Module) -> nn.Module:
    """Net2Net's baseline: ``fresh`` (a randomly initialised network of the big shape) with every tensor of the teacher
    copied into the leading slots of the same-named tensor - the first units of each widened layer, the inputs of
    those units in the next layer, the batch norms' statistics. The new units and the new layer stay random, so the
    function is not preserved. New layers go after the teacher's last block, so names match up to it."""
    padded = copy.deepcopy(fresh)
    target = padded.state_dict()                       # tensors that share storage with the parameters
    with torch.no_grad():
        for name, value in teacher.state_dict().items():
            if name in target:
                target[name][tuple(slice(0, size) for size in value.shape)].copy_(value)
    return padded


@torch.no_grad()
def max_logit_diff(teacher: nn.Module, student: nn.Module, inputs: torch.Tensor) -> float:
    """Largest |logit difference| between the two networks on ``inputs``, both in eval mode."""
    modes = [(network, network.training) for network in (teacher, student)]
    for network, _ in modes:
        network.eval()
    difference = float((teacher(inputs) - student(inputs)).abs().max())
    for network, mode in modes:
        network.train(mode)
    return difference


def finished(seed: int, arm: str, epochs: list[dict], growth: dict | None = None) -> dict:
    """A run's row, its progress line printed."""
    row = {"seed": seed, "arm": arm, "epochs": epochs, "final_acc": epochs[-1]["val_acc"], "growth": growth}
    shown = f"  grown at {growth['seconds']:.1f} s, max |Δlogit| {growth['max_logit_diff']:.1e}" if growth else ""
    print(f"seed {seed}  {arm:10s}  {len(epochs)} epochs  val_acc {row['final_acc']:.3f}  "
          f"train {epochs[-1]['seconds']:.1f} s{shown}", flush=True)
    return row


def run_seed(data, settings: dict, seed: int) -> list[dict]:
    """The four arms of one seed: a row each with its per-epoch curve (and, for the grown arms, the growth)."""
    hparams, big = settings["hparams"], settings["big"]
    first, more = settings["small_epochs"], settings["grown_epochs"]
    val_batch, train_batch = data.x_val[:PRESERVATION_BATCH], data.x_train[:PRESERVATION_BATCH]

    def fresh(network: dict):
        return build_network(network, data.input_shape, data.num_classes, hparams["dropout"], seed)

    small = make_trainer(fresh(settings["small"]), data, hparams, seed)
    teacher_curve = train_for(small, first)
    teacher_state, teacher = small.snapshot(), copy.deepcopy(small.model)
    teacher_seconds = teacher_curve[-1]["seconds"] if teacher_curve else 0.0

    rows = []
    for arm in ("grown", "random_pad"):
        # The teacher's trainer state (optimiser, epoch counters, RNG) in a trainer of its own, grown there as
        # HyperQuest grows a checkpoint: the network replaced, the optimiser rebuilt for the new parameters.
        trainer = make_trainer(copy.deepcopy(teacher), data, hparams, seed)
        trainer.revert(teacher_state)
        start = time.perf_counter()
        network = trainer.model.network
        student = (net2net(network, big, train_batch, seed) if arm == "grown"
                   else random_pad(network, fresh(big).network))
        trainer.model.network = student
        trainer.rebuild_optimizer()
        growth_seconds = time.perf_counter() - start
        growth = {"epoch": first, "seconds": teacher_seconds + growth_seconds, "growth_seconds": growth_seconds,
                  "max_logit_diff": max_logit_diff(teacher.network, student, val_batch),
                  "val_acc": float(trainer.evaluate()["top1"])}          # right after growing (not timed)
        curve = [dict(epoch) for epoch in teacher_curve] + train_for(trainer, more, growth["seconds"])
        rows.append(finished(seed, arm, curve, growth))
    rows.insert(0, finished(seed, "small", teacher_curve + train_for(small, more, teacher_seconds)))
    scratch = make_trainer(fresh(big), data, hparams, seed)
    rows.append(finished(seed, "scratch", train_for(scratch, first + more)))
    return rows


# ---- over the seeds --------------------------------------------------------------------------------------------
def summarize(rows: list[dict], target: float) -> dict:
    """Per arm: mean / std over seeds of seconds to target (seeds that reached it), final accuracy, training time;
    the speed-up of growing (scratch / grown seconds to target, mean over seeds where both reached it)."""
    seeds = sorted({row["seed"] for row in rows})
    summary = {"seeds": len(seeds), "target_acc": target}
    for arm in ARMS:
        arm_rows = [row for row in rows if row["arm"] == arm]
        reached = [row["seconds_to_target"] for row in arm_rows if row["seconds_to_target"] is not None]
        summary[f"{arm}_seconds_mean"], summary[f"{arm}_seconds_std"] = mean_std(reached)
        summary[f"{arm}_final_mean"], summary[f"{arm}_final_std"] = mean_std([row["final_acc"] for row in arm_rows])
        summary[f"{arm}_train_seconds_mean"], summary[f"{arm}_train_seconds_std"] = \
            mean_std([row["epochs"][-1]["seconds"] for row in arm_rows])
        summary[f"{arm}_reached"] = len(reached)
    by_seed = {(row["seed"], row["arm"]): row["seconds_to_target"] for row in rows}
    speedups = [by_seed[seed, "scratch"] / by_seed[seed, "grown"] for seed in seeds
                if by_seed.get((seed, "scratch")) and by_seed.get((seed, "grown"))]
    summary["speedups"] = speedups
    summary["speedup_mean"] = statistics.fmean(speedups) if speedups else None
    for arm, key in (("grown", "function_preserved_max_diff"), ("random_pad", "random_pad_max_diff")):
        diffs = [row["growth"]["max_logit_diff"] for row in rows if row["arm"] == arm]
        summary[key] = max(diffs) if diffs else None
    return summary


def verdict(summary: dict) -> str:
    """The claim's verdict, one sentence (two when the data set cannot tell the sizes apart)."""
    n, speedup = summary["seeds"], summary["speedup_mean"]
    supported = (speedup is not None and speedup > 1 and summary["grown_reached"] == n
                 and summary["grown_reached"] >= summary["scratch_reached"])
    if supported:
        text = (f"**Supported**: the grown network reached the big network's accuracy "
                f"(≥ {summary['target_acc']:.3f}) in every seed, {speedup:.2f}× sooner than the big network trained "
                "from scratch (mean over seeds, the small network's epochs and the growth included).")
    elif summary["grown_reached"] == 0:
        text = (f"**Not supported**: the grown network never reached the big network's accuracy "
                f"(≥ {summary['target_acc']:.3f}) within the epoch budget.")
    else:
        shown = f"{speedup:.2f}×" if speedup is not None else "no"
        text = (f"**Not supported**: the grown network reached the target (≥ {summary['target_acc']:.3f}) in "
                f"{summary['grown_reached']} of {n} seeds, scratch in {summary['scratch_reached']}; mean speed-up "
                f"{shown} (scratch / grown seconds, where both reached it).")
    if summary["small_reached"] * 2 > n:
        text += (f" But the small network reached the target by itself in {summary['small_reached']} of {n} seeds: "
                 "on this data set the sizes barely differ, so it does not test the claim.")
    return text


def comparison(summary: dict) -> str:
    """Where the grown network ended beside the small one and Net2Net's random-pad baseline."""
    grown, small, padded = summary["grown_final_mean"], summary["small_final_mean"], summary["random_pad_final_mean"]
    text = (f"Final accuracy: grown {grown:.3f}, small {small:.3f}, random pad {padded:.3f}, scratch "
            f"{summary['scratch_final_mean']:.3f}.")
    if grown < padded:
        text += (" The function-preserving start did worse than random padding here: a widened unit's copies start "
                 "identical and are told apart only by the unequal split of their outgoing weights "
                 f"(noise {WIDEN_NOISE}), a likely reason why it stays close to the small network.")
    return text


# ---- report and figure -----------------------------------------------------------------------------------------
def _drawn_curve(row: dict) -> list[dict]:
    """A row's curve as drawn: a grown arm from the growth on (its first epochs are the small network's)."""
    growth = row["growth"]
    return row["epochs"] if growth is None else [growth] + row["epochs"][growth["epoch"]:]


def plot(out: Path, rows: list[dict], target: float) -> None:
    """growth.png: validation accuracy against cumulative training seconds (left) and epochs (right); thin lines per
    seed, the mean over seeds bold, the growth moment marked (dots: each seed's accuracy right after growing)."""
    figure, (by_time, by_epoch) = plt.subplots(1, 2, figsize=(14, 5))
    for arm in ARMS:
        curves = [_drawn_curve(row) for row in rows if row["arm"] == arm]
        for curve in curves:
            accuracy = [epoch["val_acc"] for epoch in curve]
            by_time.plot([epoch["seconds"] for epoch in curve], accuracy, color=COLOURS[arm], alpha=0.3, lw=0.8)
            by_epoch.plot([epoch["epoch"] for epoch in curve], accuracy, color=COLOURS[arm], alpha=0.3, lw=0.8)
        length = min(len(curve) for curve in curves)
        mean_acc = [statistics.fmean(curve[i]["val_acc"] for curve in curves) for i in range(length)]
        by_time.plot([statistics.fmean(curve[i]["seconds"] for curve in curves) for i in range(length)], mean_acc,
                     color=COLOURS[arm], lw=2.5, label=arm)
        by_epoch.plot([curves[0][i]["epoch"] for i in range(length)], mean_acc, color=COLOURS[arm], lw=2.5, label=arm)
    moments = [row for row in rows if row["growth"] is not None]
    for row in moments:
        by_time.plot(row["growth"]["seconds"], row["growth"]["val_acc"], "o", color=COLOURS[row["arm"]], ms=4)
    if moments:
        by_time.axvline(statistics.fmean(row["growth"]["seconds"] for row in moments), color="k", ls=":", lw=1,
                        label="growth (mean)")
        by_epoch.axvline(moments[0]["growth"]["epoch"], color="k", ls=":", lw=1, label="growth")
    accuracies = [epoch["val_acc"] for row in rows for epoch in _drawn_curve(row)] + [target]
    for axis, xlabel in ((by_time, "cumulative training seconds (one thread)"), (by_epoch, "epoch")):
        axis.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:.3f}")
        axis.set(xlabel=xlabel, ylabel="validation accuracy",
                 ylim=(max(0.0, min(accuracies) - 0.02), min(1.0, max(accuracies) + 0.01)))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_time.set_title("Net2Net: grow the small network vs train the big one")
    by_epoch.set_title("the same runs by epoch")
    save_figure(figure, out / "growth.png")


def _pm(mean: float | None, std: float | None, digits: int) -> str:
    return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_report(out: Path, results: dict) -> str:
    settings, summary = results["settings"], results["summary"]
    data, small, big = settings["data"], settings["small"], settings["big"]
    n = summary["seeds"]
    default = " (HyperQuest's default)" if big == DEFAULT_NETWORK else ""
    compared = min(PRESERVATION_BATCH, results["data"]["val_size"])
    hparams = ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in settings["hparams"].items())
    table = ["| arm | final val acc | seconds to target | reached | training seconds |", "|---|---:|---:|---:|---:|"]
    for arm in ARMS:
        table.append(f"| {arm} | {_pm(summary[f'{arm}_final_mean'], summary[f'{arm}_final_std'], 3)} "
                     f"| {_pm(summary[f'{arm}_seconds_mean'], summary[f'{arm}_seconds_std'], 1)} "
                     f"| {summary[f'{arm}_reached']}/{n} "
                     f"| {_pm(summary[f'{arm}_train_seconds_mean'], summary[f'{arm}_train_seconds_std'], 1)} |")
    speedups = ", ".join(f"{value:.2f}×" for value in summary["speedups"]) or "none"
    lines = [
        "# Net2Net: growing a network mid-training vs training the big one from scratch", "",
        f"HyperQuest data set `{data['name']}` ({results['data']['train_size']:,} training, "
        f"{results['data']['val_size']:,} validation inputs of {'x'.join(map(str, results['data']['input_shape']))}, "
        f"{results['data']['num_classes']} classes). Small network: {small['arch']} {small['depth']} x "
        f"{small['width']}; big network: {big['arch']} {big['depth']} x {big['width']}{default}. "
        f"HyperQuest's default hyperparameters ({hparams}), {settings['threads']} torch thread. The small "
        f"network trains {settings['small_epochs']} epochs, is grown (Net2WiderNet to width {big['width']}, "
        f"Net2DeeperNet to depth {big['depth']}) and trains {settings['grown_epochs']} more; scratch trains "
        f"{settings['small_epochs'] + settings['grown_epochs']} epochs. Seeds {list(settings['seeds'])}; "
        f"{results['wall_seconds']:.0f} s in all.", "",
        f"Target: the median final accuracy of scratch minus {settings['tolerance']}: **{summary['target_acc']:.3f}**. "
        "Seconds count training passes only (the grown arms: the small network's epochs and the growth included); "
        "means ± std over seeds, seconds to target over the seeds that reached it.", "",
        *table, "",
        verdict(summary), comparison(summary), "",
        f"Speed-up per seed (scratch / grown seconds to target): {speedups}. Right after growing, the grown network's "
        f"logits differ from the small network's by at most **{summary['function_preserved_max_diff']:.1e}** "
        f"(eval mode, {compared} validation inputs): the function is preserved. Net2Net's random-pad "
        f"baseline, which reuses the same weights without preserving the function, changes them by up to "
        f"{summary['random_pad_max_diff']:.2f}.", "",
        "The timing ran on a shared machine; each arm ran on one thread, one after another, so the arms of a seed "
        "saw similar load.", "",
        "![growth](growth.png)", "",
    ]
    return save_report(out / "report.md", lines)


def run(out: Path, quick: bool = False) -> dict:
    started = time.perf_counter()
    settings = SETTINGS[quick]
    threads = torch.get_num_threads()
    torch.set_num_threads(settings["threads"])
    try:
        data = make_classification_data(**settings["data"])
        rows = [row for seed in settings["seeds"] for row in run_seed(data, settings, seed)]
    finally:
        torch.set_num_threads(threads)
    target = statistics.median(row["final_acc"] for row in rows if row["arm"] == "scratch") - settings["tolerance"]
    for row in rows:
        row["target_acc"] = target
        row["seconds_to_target"] = seconds_to_target(row["epochs"], target)
    summary = summarize(rows, target)
    plot(out, rows, target)
    described = data.summary()
    results = {"settings": {**settings, "seeds": list(settings["seeds"])},
               "data": {key: described[key] for key in ("name", "input_shape", "num_classes", "train_size",
                                                         "val_size")},
               "rows": rows, "summary": summary, "wall_seconds": time.perf_counter() - started}
    write_json(out / "results.json", results)
    print(write_report(out, results))
    return results
