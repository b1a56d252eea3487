"""The R-CNN family's speed table, measured: sliding windows -> R-CNN -> SPP-net -> Fast R-CNN -> Faster R-CNN -> R-FCN.

The lecture's story is a table of speed-ups: sharing the convolutional features (SPP-net, Fast R-CNN) made training
several times and testing two orders of magnitude faster than R-CNN, but left Selective Search as the bottleneck,
and learning the proposals (Faster R-CNN) removed it. This study trains every ``det/<method>`` - plus torchvision's
own Faster R-CNN on the same backbone, as a reference implementation - on the same scenes COCO files, with the same
image size, batch size and time budget, through :func:`detseg.api.train` (what a user gets), and measures:

* **training**: seconds and images per second (metrics.json; Selective Search is precomputed and cached before
  training starts, as the papers did, so it is not in these numbers);
* **testing**: milliseconds per image at batch 1 on a few validation images, split into the stages of
  :class:`~detseg.models.detection.generalized.RegionDetector` - proposals (Selective Search computed *fresh*, not
  read from the cache), shared convolution, per-region work - plus the rest (normalisation);
* **accuracy**: AP and AP50 of each run's best.pt (pycocotools, metrics.json).

Speed-ups are divided by R-CNN's and printed beside the papers' (Fast R-CNN paper, VGG16: training 1 / 3.4 / 8.8x
and testing without proposals 1 / 20 / 146x for R-CNN / SPP-net / Fast R-CNN; the lecture's table with proposals:
1 / 25 / 250x for R-CNN / Fast / Faster R-CNN). Two targets get a verdict: Faster R-CNN tests >= 25x faster than
R-CNN (proposals included), and trains >= 2x faster than torchvision's Faster R-CNN at equal or better AP.
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from .. import api, registry  # noqa: E402
from ..data.scenes import ScenesSource  # noqa: E402
from ..io import write_json  # noqa: E402
from ..viz import save_figure, save_report  # noqa: E402
from .detection_runs import (PICTURE_DETECTIONS, STAGES, best_detections, first_images,  # noqa: E402,F401
                             make_row, merge_rows, plot_detections, prepare_scenes, previous_results,
                             run_detector, select_methods, time_test_stages, training_overrides)

# (method, det/ model name), in the lecture's order; R-CNN is the unit of every ratio.
METHODS = (("sliding_window", "det/sliding_window"), ("rcnn", "det/rcnn"), ("spp", "det/spp"),
           ("fast_rcnn", "det/fast_rcnn"), ("faster_rcnn", "det/faster_rcnn"), ("rfcn", "det/rfcn"),
           ("torchvision", "det/torchvision_faster_rcnn"))
REFERENCE = "rcnn"

# Speed-ups over R-CNN in the literature. Fast R-CNN paper (Girshick 2015, Table 4, VGG16): training 84 h / 25.5 h /
# 9.5 h, testing 47 s / 2.3 s / 0.32 s per image without Selective Search. Lecture: test time with proposals.
PAPER_TRAIN_SPEEDUP = {"rcnn": 1.0, "spp": 3.4, "fast_rcnn": 8.8}
PAPER_TEST_SPEEDUP_NO_PROPOSALS = {"rcnn": 1.0, "spp": 20.0, "fast_rcnn": 146.0}
LECTURE_TEST_SPEEDUP = {"rcnn": 1.0, "fast_rcnn": 25.0, "faster_rcnn": 250.0}
TARGET_TEST_SPEEDUP = 25.0        # Faster R-CNN vs R-CNN, proposals included
TARGET_TRAIN_VS_TORCHVISION = 2.0  # Faster R-CNN vs torchvision's, images per second at equal or better AP

# Per-method validation limits exist because R-CNN and sliding windows run a CNN per region at test time: an
# evaluation of every validation image (done twice by a run: last epoch and best.pt) would take most of the budget.
# One thread per process: on a CPU shared with other work, a multi-threaded step waits for its slowest thread, and
# small operators (thousands of per-region ones) suffer most - the ratios would measure the neighbours, not the code.
SETTINGS = {
    True: {"threads": 1, "train": 400, "val": 50, "image_size": 128, "batch_size": 8, "budget": 60.0,
           "timing_images": 10, "picture_images": 3,
           "val_limit": {"sliding_window": 8, "rcnn": 25}, "timing_limit": {"sliding_window": 3},
           "operating_point": {"images": 5, "height": 375, "width": 500}},
    False: {"threads": 1, "train": 3000, "val": 300, "image_size": 128, "batch_size": 8, "budget": 600.0,
            "timing_images": 20, "picture_images": 4,
            "val_limit": {"sliding_window": 50}, "timing_limit": {"sliding_window": 5},
            "operating_point": {"images": 20, "height": 375, "width": 500}},
}

# The lecture's operating point: PASCAL-sized photos (500 x 375), where Selective Search finds ~2,000 regions. The
# models trained at 128 px are run there at test time only; sliding windows (whose window grid is fixed at the
# training size) and torchvision's model (whose transform resizes to its own min_size) are left out.
OPERATING_POINT_METHODS = ("rcnn", "spp", "fast_rcnn", "faster_rcnn", "rfcn")


# ---- rows, ratios, verdicts (pure functions of the numbers) -------------------------------------------------------
def _test_ms_without_proposals(row: dict) -> float | None:
    if "test_ms_proposals" not in row:
        return None
    return row["test_ms_per_image"] - row["test_ms_proposals"]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0 or numerator != numerator:
        return None
    return numerator / denominator


def speedups(rows: list[dict], reference: str = REFERENCE) -> dict[str, dict]:
    """Per method: training and test speed-ups over ``reference`` (None where a number is missing)."""
    base = next((row for row in rows if row["method"] == reference and "train_seconds" in row), None)
    result = {}
    for row in rows:
        if "train_seconds" not in row:
            continue
        result[row["method"]] = {
            "train": _ratio(row["train_images_per_second"], base and base["train_images_per_second"]),
            "test_with_proposals": _ratio(base and base["test_ms_per_image"], row["test_ms_per_image"]),
            "test_without_proposals": _ratio(base and _test_ms_without_proposals(base),
                                             _test_ms_without_proposals(row)),
            "paper_train": PAPER_TRAIN_SPEEDUP.get(row["method"]),
            "paper_test_without_proposals": PAPER_TEST_SPEEDUP_NO_PROPOSALS.get(row["method"]),
            "lecture_test_with_proposals": LECTURE_TEST_SPEEDUP.get(row["method"]),
        }
    return result


def targets(rows: list[dict]) -> dict[str, dict]:
    """The two targets of the issue, each with its measured value and ``passed`` (None when a run is missing)."""
    by_method = {row["method"]: row for row in rows if "train_seconds" in row}
    faster, rcnn, reference = by_method.get("faster_rcnn"), by_method.get(REFERENCE), by_method.get("torchvision")
    test_speedup = _ratio(rcnn and rcnn["test_ms_per_image"], faster and faster["test_ms_per_image"])
    throughput = _ratio(faster and faster["train_images_per_second"],
                        reference and reference["train_images_per_second"])
    ap_difference = faster["ap"] - reference["ap"] if faster and reference else None
    return {
        "faster_test_speedup_over_rcnn": {
            "value": test_speedup, "goal": TARGET_TEST_SPEEDUP,
            "passed": None if test_speedup is None else test_speedup >= TARGET_TEST_SPEEDUP},
        "faster_train_throughput_over_torchvision": {
            "value": throughput, "goal": TARGET_TRAIN_VS_TORCHVISION, "ap_difference": ap_difference,
            "passed": None if throughput is None else
            bool(throughput >= TARGET_TRAIN_VS_TORCHVISION and ap_difference >= 0)},
    }


# ---- pictures -----------------------------------------------------------------------------------------------------
def plot_speed(rows: list[dict], out: Path) -> None:
    """speed.png: test ms per image split by stage (linear and log total), training images/s, AP."""
    done = [row for row in rows if "train_seconds" in row]
    names = [row["method"] for row in done]
    figure, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    bottom = [0.0] * len(done)
    for stage in STAGES:
        values = [row.get(f"test_ms_{stage}", 0.0) for row in done]
        axes[0].bar(names, values, bottom=bottom, label=stage.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    unsplit = [row["test_ms_per_image"] if "test_ms_proposals" not in row else 0.0 for row in done]
    axes[0].bar(names, unsplit, color="grey", label="total (not split)")
    axes[0].set(ylabel="ms per image (batch 1)", title="test time by stage")
    axes[0].legend(fontsize=8)
    axes[1].bar(names, [row["test_ms_per_image"] for row in done], color="tab:purple")
    axes[1].set(yscale="log", ylabel="ms per image (log)", title="test time, proposals included")
    axes[2].bar(names, [row["train_images_per_second"] for row in done], color="tab:green")
    axes[2].set(ylabel="images / s", title="training throughput")
    width = 0.4
    positions = range(len(done))
    axes[3].bar([p - width / 2 for p in positions], [row["ap"] for row in done], width, label="AP")
    axes[3].bar([p + width / 2 for p in positions], [row["ap50"] for row in done], width, label="AP50")
    axes[3].set(xticks=list(positions), xticklabels=names, ylabel="validation AP", title="accuracy")
    axes[3].legend()
    for axis in axes:
        axis.tick_params(axis="x", rotation=35)
        axis.grid(alpha=0.3, axis="y")
    save_figure(figure, out / "speed.png")


# ---- report -------------------------------------------------------------------------------------------------------
def _number(value, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}{suffix}"


def _verdict(passed) -> str:
    return "n/a (a run is missing)" if passed is None else ("**PASS**" if passed else "**FAIL**")


def _tables(rows: list[dict], ratios: dict) -> tuple[list[str], list[str]]:
    """The speed-and-accuracy table and the speed-up table of the report (markdown lines)."""
    speed = ["| method | train s | train img/s | test ms/img | proposals | shared conv | per region | other "
             "| regions/img | AP | AP50 | val imgs | run wall s |", "|---|" + "---:|" * 12]
    for row in rows:
        split = " | ".join(_number(row.get(f"test_ms_{stage}")) for stage in STAGES)
        speed.append(f"| {row['method']} | {row['train_seconds']:.0f} | {row['train_images_per_second']:.1f} "
                     f"| {row['test_ms_per_image']:.1f} | {split} | {_number(row.get('proposals_per_image'), 0)} "
                     f"| {row['ap']:.3f} | {row['ap50']:.3f} | {row['val_images']} "
                     f"| {row['train_wall_seconds'] + row['timing_wall_seconds']:.0f} |")
    ratio = ["| method | train × R-CNN | paper | test × R-CNN (with proposals) | lecture | test × R-CNN "
             "(without proposals) | paper |", "|---|---:|---:|---:|---:|---:|---:|"]
    for method, r in ratios.items():
        ratio.append(f"| {method} | {_number(r['train'], 2)} | {_number(r['paper_train'], 1)} "
                     f"| {_number(r['test_with_proposals'], 2)} | {_number(r['lecture_test_with_proposals'], 0)} "
                     f"| {_number(r['test_without_proposals'], 2)} | {_number(r['paper_test_without_proposals'], 0)} |")
    return speed, ratio


def _where_time_goes(rows: list[dict]) -> str:
    """One sentence per Selective Search model: how much of its test time the proposals take, and how many."""
    parts = [f"{row['method']} {row['test_ms_proposals']:.0f} of {row['test_ms_per_image']:.0f} ms "
             f"({100 * row['test_ms_proposals'] / row['test_ms_per_image']:.0f}%, "
             f"{row['proposals_per_image']:.0f} regions per image)"
             for row in rows if row["method"] in ("rcnn", "spp", "fast_rcnn") and "test_ms_proposals" in row]
    if not parts:
        return ""
    return ("Selective Search at test time: " + "; ".join(parts) + ". The papers' R-CNN ran VGG16 on ~2000 "
            "227 px crops per image, so its per-region work dwarfed Selective Search; on 128 px scenes Selective "
            "Search finds far fewer regions and is the larger part of every test time that includes it, which caps "
            "the speed-ups over R-CNN of the methods that keep it (SPP-net, Fast R-CNN) and bounds Faster R-CNN's "
            "by R-CNN's small per-region cost.")


def _operating_point_lines(results: dict) -> list[str]:
    """The test-time table at the lecture's operating point (photo-sized images, ~2,000 Selective Search boxes)."""
    point = results.get("operating_point") or {}
    if not point.get("rows"):
        return []
    size = results["settings"]["operating_point"]
    lines = ["## At the lecture's operating point", "",
             f"The same best.pt of each region-based method, at test time only, on {size['images']} scenes drawn at "
             f"{size['width']} x {size['height']} px (PASCAL's photo size) and run at that size; proposals computed "
             "fresh. Training stays at 128 px, so these numbers are speed only.", "",
             "| method | test ms/img | proposals | shared conv | per region | regions/img | test × R-CNN | lecture |",
             "|---|" + "---:|" * 7]
    for row in point["rows"]:
        ratio = point["speedups"].get(row["method"], {})
        lines.append(f"| {row['method']} | {row['test_ms_per_image']:.0f} | {_number(row.get('test_ms_proposals'), 0)} "
                     f"| {_number(row.get('test_ms_shared_conv'), 0)} | {_number(row.get('test_ms_per_region'), 0)} "
                     f"| {_number(row.get('proposals_per_image'), 0)} "
                     f"| {_number(ratio.get('test_with_proposals'), 1, '×')} "
                     f"| {_number(ratio.get('lecture_test_with_proposals'), 0, '×')} |")
    faster = point["speedups"].get("faster_rcnn", {}).get("test_with_proposals")
    verdict = None if faster is None else faster >= TARGET_TEST_SPEEDUP
    lines += ["", f"- Faster R-CNN test ≥ {TARGET_TEST_SPEEDUP:g}× faster than R-CNN at {size['width']} x "
                  f"{size['height']} px (proposals included): {_number(faster, 1, '×')} — {_verdict(verdict)}", ""]
    return lines


def write_report(out: Path, results: dict) -> str:
    settings, rows, verdicts = results["settings"], results["rows"], results["targets"]
    done = [row for row in rows if "train_seconds" in row]
    speed, ratio = _tables(done, results["speedups"])
    skipped = [f"- **{row['method']}** (`{row['model']}`) skipped: {row['skipped']}"
               for row in rows if "skipped" in row]
    test_target = verdicts["faster_test_speedup_over_rcnn"]
    train_target = verdicts["faster_train_throughput_over_torchvision"]
    limits = ", ".join(f"{method} {count}" for method, count in settings["val_limit"].items())
    lines = [
        "# The R-CNN family: training and test speed, measured", "",
        f"Scenes at {settings['image_size']} px written once as COCO files: {settings['train']} training and "
        f"{settings['val']} validation images. Every detector trained through `detseg.api.train` with the same "
        f"time budget ({settings['budget']:.0f} s of training steps), batch size {settings['batch_size']}, image "
        "size and the tiny shared backbone (R-CNN and sliding windows have none: their per-crop CNN is their own), "
        f"other knobs at their defaults; only the last epoch is evaluated. {settings['threads']} CPU thread per "
        "process (on a shared CPU, multi-threaded timings measure the neighbours). Study wall time: "
        f"{results['wall_seconds']:.0f} s{' (--quick)' if results['quick'] else ''}.", "",
        f"Validation is limited for the methods that run a CNN per region ({limits} images instead of "
        f"{settings['val']}): their AP comes from the first images of the same validation file. Test time is "
        f"measured apart, at batch 1 on the first {settings['timing_images']} validation images (fewer for "
        f"{', '.join(settings['timing_limit'])}), with Selective Search computed fresh, not read from the cache; the "
        "split is RegionDetector's stage timing ('other': pixel normalisation), 'regions/img' what the RoI head "
        "saw. torchvision's model is timed as a whole. Training numbers exclude Selective Search, precomputed and "
        "cached before training as in the papers. The CPU is shared with other work: timings are noisy.", "",
        "## Speed and accuracy", "", *speed, "",
        "## Speed-ups over R-CNN, next to the papers'", "", *ratio, "",
        "Paper: Fast R-CNN (Girshick 2015, Table 4), VGG16 on VOC07: training hours, test seconds without proposals. "
        "Lecture: CS231n's R-CNN / Fast / Faster R-CNN test times with proposals.", "",
        _where_time_goes(done), "",
        "## Targets", "",
        f"- Faster R-CNN test ≥ {TARGET_TEST_SPEEDUP:g}× faster than R-CNN (proposals included): "
        f"{_number(test_target['value'], 1, '×')} — {_verdict(test_target['passed'])}",
        f"- Faster R-CNN training throughput ≥ {TARGET_TRAIN_VS_TORCHVISION:g}× torchvision's Faster R-CNN at equal "
        f"or better AP (same budget): {_number(train_target['value'], 2, '×')}, AP difference "
        f"{_number(train_target['ap_difference'], 3)} — {_verdict(train_target['passed'])}", "",
        *_operating_point_lines(results),
        *(["## Skipped", "", *skipped, ""] if skipped else []),
        "![speed](speed.png)", "",
        f"The {PICTURE_DETECTIONS} highest-scoring detections of each method (score printed) on the same "
        "validation images:", "",
        "![detections](detections.png)", "",
    ]
    return save_report(out / "report.md", lines)


# ---- the lecture's operating point ---------------------------------------------------------------------------
def photo_sized_scenes(count: int, height: int, width: int) -> list[np.ndarray]:
    """``count`` scenes drawn at ``width`` px and cropped to ``height`` rows: (height, width, 3) uint8 arrays.

    Up to 99 objects each (about 50 on average) rather than the usual 1-8: a PASCAL photo is cluttered, and on these
    Selective Search ("fast") finds ~1,500-2,500 regions, the operating point of the R-CNN papers; on a 500 px scene
    with a few shapes it finds a few hundred."""
    source = ScenesSource(count, size=max(height, width), seed=11, split="photo", max_objects=99)
    top = (max(height, width) - height) // 2
    return [np.ascontiguousarray(source.render(index).image[top:top + height, :width]) for index in range(count)]


def time_operating_point(rows: list[dict], settings: dict) -> list[dict]:
    """Test time per image of each trained region-based detector on photo-sized scenes, proposals included and
    computed fresh (rows with the same timing keys as the 128 px ones)."""
    point = settings["operating_point"]
    images = photo_sized_scenes(point["images"], point["height"], point["width"])
    torch.set_num_threads(settings["threads"])
    timed = []
    for row in rows:
        if row["method"] not in OPERATING_POINT_METHODS or "run_dir" not in row:
            continue
        print(f"{row['method']}: timing at {point['width']} x {point['height']} px ...", flush=True)
        model, _ = api.load(Path(row["run_dir"]) / "best.pt")
        with model.transform.resized_to((point["height"], point["width"])), model.without_caches():
            timing = time_test_stages(model, images, repeats=1)      # R-CNN: seconds per photo; one pass
        timed.append({"method": row["method"], "model": row["model"], "train_seconds": row["train_seconds"],
                      "train_images_per_second": row["train_images_per_second"], **timing})
    return timed


def run(out: Path, quick: bool, settings: dict | None = None, methods=METHODS, only: str | None = None) -> dict:
    """The study: write the scenes, train and time every detector, write results.json, plots and report.md.
    ``only`` (comma-separated methods) trains and times those and keeps the other rows (and operating-point
    timings) of an earlier run with the same settings."""
    started = time.perf_counter()
    settings = settings or SETTINGS[quick]
    files = prepare_scenes(out / "data", settings)
    previous = previous_results(out, settings) if only else {}
    rows, pictures = [], {}
    for method, model_name in select_methods(only, methods):
        print(f"{method}: training {model_name} for {settings['budget']:g} s ...", flush=True)
        try:
            registry.get(model_name)
            row, pictures[method] = run_detector(method, model_name, files, settings, out)
        except Exception as error:              # one failing detector must not lose the others' numbers
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            traceback.print_exc()
            rows.append({"method": method, "model": model_name, "skipped": reason})
            print(f"{method}: skipped ({reason})", flush=True)
            continue
        rows.append(row)
        print(f"{method}: {row['train_images_per_second']:.1f} train img/s, test {row['test_ms_per_image']:.1f} "
              f"ms/img, AP {row['ap']:.3f}, AP50 {row['ap50']:.3f} ({row['train_wall_seconds']:.0f} + "
              f"{row['timing_wall_seconds']:.0f} s wall)", flush=True)
    operating = merge_rows((previous.get("operating_point") or {}).get("rows", []),
                           time_operating_point(rows, settings), methods)
    rows = merge_rows(previous.get("rows", []), rows, methods)
    results = {"quick": quick, "settings": settings, "rows": rows, "speedups": speedups(rows),
               "targets": targets(rows), "operating_point": {"rows": operating, "speedups": speedups(operating)},
               "threads": settings["threads"], "wall_seconds": time.perf_counter() - started}
    plot_speed(rows, out)
    plot_detections(pictures, out)
    write_json(out / "results.json", results)
    print(write_report(out, results))
    return results
