"""Speed against accuracy across every detector: Huang et al. (CVPR 2017) on one data set and one budget.

The lecture closes its tour of detectors with Huang et al.'s study: with the backbone, the input size and the
number of proposals all changing the answer, "Faster R-CNN style methods tend to be slower but more accurate",
single-shot ones (YOLO, SSD) "much faster but not as accurate" - especially on small objects. This study puts every
``det/<method>`` of detseg on the same scenes COCO files, the same tiny backbone, the same input size, batch size and
time budget (through :func:`detseg.api.train`, what a user gets), plus torchvision's own SSD on det/ssd's backbone
as a reference row, and measures per detector:

* **accuracy**: pycocotools' AP, AP50, AP75, AP_small/medium/large (COCO's 32² / 96² px limits, under which nearly
  every object of a 128 px scene is "small") and ``ap_*_scenes`` with the scenes' own limits rescaled to the image
  size (:func:`detseg.data.scenes.area_thresholds`: 16² / 48² px at 128 px), from the run's ``predictions.json``;
* **speed**: test milliseconds per image at batch 1 on validation images, with the backbone's share (forward hooks
  on the shared trunk); training images per second;
* **size**: parameters and GFLOPs of one test-time forward.

Two sweeps of Faster R-CNN draw its lines on the plot, as in the paper's Figure 2: the number of test-time
proposals (the same checkpoint evaluated at 10 / 50 / 100 / 300) and the input size (one training run per size).
``speed_accuracy.png`` puts test time on a log axis against AP; report.md holds the tables and the targets;
results.json the rows. ``only`` runs a subset and keeps the other rows of an earlier results.json made with the same
settings, so the full study (about two hours here) can be run in parts.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import traceback
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402
import torch  # noqa: E402

from .. import __version__, api, registry  # noqa: E402
from ..data.scenes import area_thresholds  # noqa: E402
from ..io import write_json  # noqa: E402
from ..metrics import coco_eval  # noqa: E402
from ..viz import save_figure, save_report  # noqa: E402
from .detection_runs import (load_images, plot_detections, prepare_scenes, merge_rows,  # noqa: E402
                             previous_results, run_detector, select_methods, time_test_stages)

# (row name, model), in the lecture's order; the last rows are references and later models when they exist.
METHODS = (("sliding_window", "det/sliding_window"), ("rcnn", "det/rcnn"), ("spp", "det/spp"),
           ("fast_rcnn", "det/fast_rcnn"), ("faster_rcnn", "det/faster_rcnn"), ("rfcn", "det/rfcn"),
           ("yolo", "det/yolo"), ("ssd", "det/ssd"), ("torchvision_ssd", "det/torchvision_ssd"),
           ("mask_rcnn", "inst/mask_rcnn"))
SINGLE_SHOT = ("yolo", "ssd")
PROPOSAL_SWEEP = (10, 50, 100, 300)
SIZE_SWEEP = (64, 128, 256)
SWEEP_METHOD = "faster_rcnn"

# Targets of the issue: single-shot test time at most half of Faster R-CNN's with AP within 0.1; det/ssd at least
# torchvision's SSD in AP at 1.5x its training throughput.
TARGET_TEST_RATIO, TARGET_AP_GAP = 0.5, 0.1
TARGET_SSD_THROUGHPUT = 1.5

# Validation limits for the methods that run a CNN per region (as in the rcnn study): their evaluation would
# otherwise take most of the budget. Threads: the whole machine, measured with nothing else running.
SETTINGS = {
    True: {"threads": os.cpu_count() or 1, "train": 400, "val": 50, "image_size": 128, "batch_size": 8,
           "budget": 60.0, "timing_images": 10, "picture_images": 3,
           "val_limit": {"sliding_window": 8, "rcnn": 25}, "timing_limit": {"sliding_window": 3}},
    False: {"threads": os.cpu_count() or 1, "train": 3000, "val": 300, "image_size": 128, "batch_size": 8,
            "budget": 600.0, "timing_images": 20, "picture_images": 4,
            "val_limit": {"sliding_window": 50}, "timing_limit": {"sliding_window": 5}},
}


# ---- measurements ------------------------------------------------------------------------------------------------
def scenes_area_aps(run_dir: Path, val_json: Path, image_size: int) -> dict[str, float]:
    """AP by object size with the scenes' own limits, from the run's predictions.json (pycocotools, rescaled
    ranges: every other stat as in metrics.json)."""
    with open(run_dir / "predictions.json") as handle:
        results = json.load(handle)
    with open(val_json) as handle:
        ground_truth = json.load(handle)
    stats = coco_eval(ground_truth, results, "bbox", area_thresholds=area_thresholds(image_size))
    return {f"{key}_scenes": stats[key] for key in ("ap_small", "ap_medium", "ap_large")}


def proposal_sweep(row: dict, files: dict, settings: dict) -> list[dict]:
    """The same Faster R-CNN checkpoint with 10 ... 300 test-time proposals: AP and test time at each."""
    checkpoint = Path(row["run_dir"]) / "best.pt"
    images = load_images(files["val"], settings["timing_images"])
    points = []
    for count in PROPOSAL_SWEEP:
        overrides = {"rpn_post_nms_test": count}
        metrics = api.evaluate(checkpoint, data=str(files["val"]), val=str(files["val"]), overrides=overrides)
        torch.set_num_threads(settings["threads"])
        model, _ = api.load(checkpoint, overrides=overrides)
        timing = time_test_stages(model, images)
        points.append({"proposals": count, "ap": metrics["ap"], "ap50": metrics["ap50"],
                       "ap_small": metrics["ap_small"], **timing})
        print(f"  {count} proposals: AP {metrics['ap']:.3f}, {timing['test_ms_per_image']:.1f} ms/img", flush=True)
    return points


def measure(method: str, model_name: str, files: dict, settings: dict, out: Path,
            overrides: dict | None = None) -> tuple[dict, list]:
    """One detector's row: :func:`run_detector`'s, plus AP by the scenes' own size ranges."""
    row, pictures = run_detector(method, model_name, files, settings, out, overrides)
    row.update(scenes_area_aps(Path(row["run_dir"]), Path(row["val_json"]), settings["image_size"]))
    return row, pictures


# ---- verdicts (pure functions of the rows) -----------------------------------------------------------------------
def _by_method(rows: list[dict]) -> dict[str, dict]:
    return {row["method"]: row for row in rows if "train_seconds" in row}


def targets(rows: list[dict]) -> dict[str, dict]:
    """Each single-shot detector against Faster R-CNN, and det/ssd against torchvision's SSD."""
    found, verdicts = _by_method(rows), {}
    faster = found.get("faster_rcnn")
    for method in SINGLE_SHOT:
        row = found.get(method)
        if row is None or faster is None:
            verdicts[method] = {"passed": None}
            continue
        ratio = row["test_ms_per_image"] / faster["test_ms_per_image"]
        gap = faster["ap"] - row["ap"]
        verdicts[method] = {"test_ratio": ratio, "ap_gap": gap, "ap_small": row.get("ap_small"),
                            "ap_small_scenes": row.get("ap_small_scenes"),
                            "faster_ap_small_scenes": faster.get("ap_small_scenes"),
                            "passed": bool(ratio <= TARGET_TEST_RATIO and gap <= TARGET_AP_GAP)}
    ssd, reference = found.get("ssd"), found.get("torchvision_ssd")
    if ssd is None or reference is None:
        verdicts["ssd_vs_torchvision"] = {"passed": None}
    else:
        throughput = ssd["train_images_per_second"] / reference["train_images_per_second"]
        verdicts["ssd_vs_torchvision"] = {"throughput_ratio": throughput, "ap_difference": ssd["ap"] - reference["ap"],
                                          "passed": bool(throughput >= TARGET_SSD_THROUGHPUT
                                                         and ssd["ap"] >= reference["ap"])}
    return verdicts


# ---- pictures ----------------------------------------------------------------------------------------------------
def plot_speed_accuracy(results: dict, out: Path) -> None:
    """speed_accuracy.png: test ms per image (log) against AP, one marker per detector, the sweeps as lines."""
    figure, axis = plt.subplots(figsize=(9, 6))
    for row in results["rows"]:
        if "train_seconds" not in row or row["method"].startswith(f"{SWEEP_METHOD}_"):
            continue
        marker = "s" if row["method"] in SINGLE_SHOT else ("^" if row["method"].startswith("torchvision") else "o")
        axis.scatter(row["test_ms_per_image"], row["ap"], marker=marker, s=60, zorder=3)
        axis.annotate(row["method"], (row["test_ms_per_image"], row["ap"]), textcoords="offset points",
                      xytext=(6, 4), fontsize=9)
    sweeps = results.get("sweeps", {})
    if sweeps.get("proposals"):
        points = sweeps["proposals"]
        axis.plot([p["test_ms_per_image"] for p in points], [p["ap"] for p in points], "--", color="tab:blue",
                  label="Faster R-CNN: test-time proposals")
        for point in points:
            axis.annotate(str(point["proposals"]), (point["test_ms_per_image"], point["ap"]), fontsize=7,
                          textcoords="offset points", xytext=(0, -10), color="tab:blue")
    if sweeps.get("input_size"):
        points = sweeps["input_size"]
        axis.plot([p["test_ms_per_image"] for p in points], [p["ap"] for p in points], ":", color="tab:red",
                  label="Faster R-CNN: input size")
        for point in points:
            axis.annotate(f"{point['image_size']} px", (point["test_ms_per_image"], point["ap"]), fontsize=7,
                          textcoords="offset points", xytext=(0, 6), color="tab:red")
    axis.set(xscale="log", xlabel="test ms per image (batch 1, log scale)", ylabel="validation AP (COCO)",
             title="Speed / accuracy on scenes (cf. Huang et al. 2017, Figure 2)")
    axis.xaxis.set_major_formatter(ScalarFormatter())
    axis.grid(alpha=0.3, which="both")
    if sweeps:
        axis.legend(fontsize=8)
    save_figure(figure, out / "speed_accuracy.png")


# ---- report ------------------------------------------------------------------------------------------------------
def _number(value, digits: int = 3, suffix: str = "") -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}{suffix}"


def _ap(value) -> str:
    """An AP of the table; pycocotools' -1 means no ground truth in that size range."""
    return "none" if value is not None and value < 0 else _number(value)


def _verdict(passed) -> str:
    return "n/a (a run is missing)" if passed is None else ("**PASS**" if passed else "**FAIL**")


def _detector_table(rows: list[dict]) -> list[str]:
    lines = ["| detector | AP | AP50 | AP75 | AP_s | AP_m | AP_l | AP_s scenes | AP_m scenes | AP_l scenes "
             "| test ms/img | backbone | train img/s | params (M) | GFLOPs | epochs |", "|---|" + "---:|" * 15]
    for row in rows:
        backbone = row.get("test_ms_backbone")
        share = "n/a" if backbone is None else f"{backbone:.1f} ({100 * backbone / row['test_ms_per_image']:.0f}%)"
        lines.append(
            f"| {row['method']} | {_number(row['ap'])} | {_number(row['ap50'])} | {_number(row.get('ap75'))} "
            f"| {_ap(row.get('ap_small'))} | {_ap(row.get('ap_medium'))} | {_ap(row.get('ap_large'))} "
            f"| {_ap(row.get('ap_small_scenes'))} | {_ap(row.get('ap_medium_scenes'))} "
            f"| {_ap(row.get('ap_large_scenes'))} | {row['test_ms_per_image']:.1f} | {share} "
            f"| {row['train_images_per_second']:.1f} | {_number((row.get('params') or 0) / 1e6, 2)} "
            f"| {_number(row.get('gflops'), 2)} | {row.get('epochs', 'n/a')} |")
    return lines


def _sweep_tables(sweeps: dict) -> list[str]:
    lines = []
    if sweeps.get("proposals"):
        lines += ["### Faster R-CNN: test-time proposals (one checkpoint)", "",
                  "| proposals | AP | AP50 | AP_s | test ms/img |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {p['proposals']} | {p['ap']:.3f} | {p['ap50']:.3f} | {p['ap_small']:.3f} "
                  f"| {p['test_ms_per_image']:.1f} |" for p in sweeps["proposals"]]
        lines.append("")
    if sweeps.get("input_size"):
        lines += ["### Faster R-CNN: input size (one training run each)", "",
                  "| input px | AP | AP50 | AP_s scenes | test ms/img | train img/s |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {p['image_size']} | {p['ap']:.3f} | {p['ap50']:.3f} | {_number(p.get('ap_small_scenes'))} "
                  f"| {p['test_ms_per_image']:.1f} | {p['train_images_per_second']:.1f} |"
                  for p in sweeps["input_size"]]
        lines.append("")
    return lines


def _target_lines(verdicts: dict) -> list[str]:
    lines = []
    for method in SINGLE_SHOT:
        v = verdicts.get(method, {"passed": None})
        lines.append(f"- det/{method}: test time ≤ {TARGET_TEST_RATIO:g}× Faster R-CNN's "
                     f"({_number(v.get('test_ratio'), 2, '×')}) and AP within {TARGET_AP_GAP:g} of it (gap "
                     f"{_number(v.get('ap_gap'))}) — {_verdict(v['passed'])}; AP_small {_number(v.get('ap_small'))}, "
                     f"AP_small scenes {_number(v.get('ap_small_scenes'))} (Faster R-CNN "
                     f"{_number(v.get('faster_ap_small_scenes'))})")
    v = verdicts.get("ssd_vs_torchvision", {"passed": None})
    lines.append(f"- det/ssd ≥ torchvision's SSD in AP (difference {_number(v.get('ap_difference'))}) at "
                 f"≥ {TARGET_SSD_THROUGHPUT:g}× its training images/s ({_number(v.get('throughput_ratio'), 2, '×')}) "
                 f"— {_verdict(v['passed'])}")
    return lines


def write_report(out: Path, results: dict) -> str:
    settings, rows = results["settings"], results["rows"]
    done = [row for row in rows if "train_seconds" in row]
    skipped = [f"- **{row['method']}** (`{row['model']}`) skipped: {row['skipped']}" for row in rows if "skipped" in row]
    small, large = area_thresholds(settings["image_size"])
    limits = ", ".join(f"{method} {count}" for method, count in settings["val_limit"].items())
    lines = [
        "# Speed and accuracy across every detector (Huang et al. 2017, on scenes)", "",
        f"Scenes at {settings['image_size']} px written once as COCO files: {settings['train']} training and "
        f"{settings['val']} validation images. Every detector trained through `detseg.api.train` with the same "
        f"budget ({settings['budget']:.0f} s of training steps), batch size {settings['batch_size']}, input size and "
        f"tiny backbone, other knobs at their defaults; {settings['threads']} CPU threads, nothing else running. "
        f"Validation limited to the first {limits} images for the methods that run a CNN per region. Test time at "
        f"batch 1 on the first {settings['timing_images']} validation images, the median of 3 passes, proposals "
        f"computed fresh. Code "
        f"{results.get('code', 'unknown')}; study wall time {results['wall_seconds']:.0f} s"
        f"{' (--quick)' if results['quick'] else ''}.", "",
        f"AP_s/m/l use COCO's limits (32² / 96² px); the *scenes* columns the scenes' own, rescaled to "
        f"{settings['image_size']} px ({small:.0f} / {large:.0f} px²). 'backbone' is the shared trunk's share of "
        "the test time (n/a: R-CNN and sliding windows run their CNN per region). GFLOPs: one test forward, "
        "convolutions and matrix products.", "",
        "## Every detector", "", *_detector_table(done), "",
        "## Sweeps", "", *_sweep_tables(results.get("sweeps", {})),
        "## Targets", "", *_target_lines(results["targets"]), "",
        *(["## Skipped", "", *skipped, ""] if skipped else []),
        "![speed and accuracy](speed_accuracy.png)", "",
        "The highest-scoring detections of each detector on the same validation images:", "",
        "![detections](detections.png)", "",
    ]
    return save_report(out / "report.md", lines)


# ---- the study ---------------------------------------------------------------------------------------------------
def _code_version() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"detseg {__version__}" + (f" @ {commit}" if commit else "")


def selected(only: str | None, methods=METHODS) -> list[tuple[str, str]]:
    """The (method, model) pairs ``only`` names (comma-separated row names, or 'sweeps'); every one without it."""
    return select_methods(only, methods, extra=("sweeps",))


def run(out: Path, quick: bool, only: str | None = None, settings: dict | None = None) -> dict:
    """The study: write the scenes, train and measure every detector, sweep Faster R-CNN, write the report."""
    started = time.perf_counter()
    settings = settings or SETTINGS[quick]
    chosen = selected(only)
    do_sweeps = not only or "sweeps" in only.split(",")
    files = prepare_scenes(out / "data", settings)
    previous = previous_results(out, settings) if only else {}
    previous_rows, sweeps = previous.get("rows", []), previous.get("sweeps", {})
    available = set(registry.names())
    rows, pictures = [], {}
    for method, model_name in chosen:
        if model_name not in available:
            rows.append({"method": method, "model": model_name, "skipped": f"{model_name} is not in this detseg"})
            continue
        print(f"{method}: training {model_name} for {settings['budget']:g} s ...", flush=True)
        try:
            row, pictures[method] = measure(method, model_name, files, settings, out)
        except Exception as error:              # one failing detector must not lose the others' numbers
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            traceback.print_exc()
            rows.append({"method": method, "model": model_name, "skipped": reason})
            continue
        rows.append(row)
        print(f"{method}: AP {row['ap']:.3f}, AP50 {row['ap50']:.3f}, test {row['test_ms_per_image']:.1f} ms/img, "
              f"{row['train_images_per_second']:.1f} train img/s", flush=True)
    rows = merge_rows(previous_rows, rows, METHODS)
    if do_sweeps:
        sweeps = run_sweeps(rows, files, settings, out)
    results = {"quick": quick, "settings": settings, "code": _code_version(), "rows": rows, "sweeps": sweeps,
               "targets": targets(rows), "wall_seconds": time.perf_counter() - started}
    plot_speed_accuracy(results, out)
    plot_detections(pictures, out)
    write_json(out / "results.json", results)
    print(write_report(out, results))
    return results


def run_sweeps(rows: list[dict], files: dict, settings: dict, out: Path) -> dict:
    """Faster R-CNN's two sweeps; the 128 px point of the size sweep is the main row."""
    main = _by_method(rows).get(SWEEP_METHOD)
    if main is None:
        print("sweeps skipped: no Faster R-CNN row", flush=True)
        return {}
    print("sweep: Faster R-CNN test-time proposals", flush=True)
    sweeps = {"proposals": proposal_sweep(main, files, settings), "input_size": []}
    for size in SIZE_SWEEP:
        if size == settings["image_size"]:
            point = main
        else:
            print(f"sweep: Faster R-CNN at {size} px for {settings['budget']:g} s ...", flush=True)
            point, _ = measure(f"{SWEEP_METHOD}_{size}px", f"det/{SWEEP_METHOD}", files, settings, out,
                               overrides={"image_size": size})
        sweeps["input_size"].append({"image_size": size, **{key: point.get(key) for key in (
            "ap", "ap50", "ap_small_scenes", "test_ms_per_image", "train_images_per_second")}})
    return sweeps
