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

import json
import shutil
import time
import traceback
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .. import api, registry  # noqa: E402
from ..tasks.base import predict_arrays  # noqa: E402
from ..data.export import write_scenes  # noqa: E402
from ..data.images import load_rgb  # noqa: E402
from ..io import write_json  # noqa: E402
from ..viz import save_figure, save_report  # noqa: E402

# (method, det/ model name), in the lecture's order; R-CNN is the unit of every ratio.
METHODS = (("sliding_window", "det/sliding_window"), ("rcnn", "det/rcnn"), ("spp", "det/spp"),
           ("fast_rcnn", "det/fast_rcnn"), ("faster_rcnn", "det/faster_rcnn"), ("rfcn", "det/rfcn"),
           ("torchvision", "det/torchvision_faster_rcnn"))
REFERENCE = "rcnn"
STAGES = ("proposals", "shared_conv", "per_region", "other")
PICTURE_DETECTIONS = 4    # detections drawn per image in detections.png

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
           "val_limit": {"sliding_window": 8, "rcnn": 25}, "timing_limit": {"sliding_window": 3}},
    False: {"threads": 1, "train": 3000, "val": 300, "image_size": 128, "batch_size": 8, "budget": 600.0,
            "timing_images": 20, "picture_images": 4,
            "val_limit": {"sliding_window": 50}, "timing_limit": {"sliding_window": 5}},
}


# ---- data --------------------------------------------------------------------------------------------------------
def _image_count(json_path: Path) -> int:
    with open(json_path) as handle:
        return len(json.load(handle)["images"])


def prepare_scenes(data_dir: Path, settings: dict) -> dict[str, Path]:
    """The scenes as COCO files, written once (kept when a previous study wrote the same counts)."""
    train_json, val_json = data_dir / "train.json", data_dir / "val.json"
    if not (train_json.is_file() and val_json.is_file() and _image_count(train_json) == settings["train"]
            and _image_count(val_json) == settings["val"]):
        write_scenes(data_dir, settings["train"], settings["val"], size=settings["image_size"], seed=0,
                     progress=False)
    return {"train": train_json, "val": val_json}


def first_images(coco_json: Path, count: int) -> Path:
    """A COCO file beside ``coco_json`` holding its first ``count`` images and their annotations."""
    with open(coco_json) as handle:
        document = json.load(handle)
    if count >= len(document["images"]):
        return coco_json
    document["images"] = document["images"][:count]
    kept = {image["id"] for image in document["images"]}
    document["annotations"] = [a for a in document["annotations"] if a["image_id"] in kept]
    subset = coco_json.with_name(f"{coco_json.stem}_first{count}.json")
    write_json(subset, document)
    return subset


def load_images(coco_json: Path, count: int) -> list:
    """The first ``count`` images of a COCO file as (H, W, 3) uint8 arrays."""
    with open(coco_json) as handle:
        document = json.load(handle)
    return [load_rgb(coco_json.parent / image["file_name"]) for image in document["images"][:count]]


# ---- one detector -------------------------------------------------------------------------------------------------
def training_overrides(model_name: str, settings: dict) -> dict:
    """Equal conditions for every detector; only knobs the model has (R-CNN has no shared backbone, for one)."""
    common = {"image_size": settings["image_size"], "batch_size": settings["batch_size"], "backbone": "tiny",
              # the time budget ends training, and only the last epoch is evaluated: no evaluation in between
              "epochs": 1000, "eval_every": 1000, "seed": 0, "threads": settings["threads"]}
    known = registry.get(model_name).all_options()
    return {key: value for key, value in common.items() if key in known}


@torch.no_grad()
def time_test_stages(model: torch.nn.Module, images: list) -> dict[str, float]:
    """Milliseconds per image at batch 1, total and per stage (RegionDetector.time_stages), and the number of
    proposals per image the RoI head saw; a model without stages (torchvision's) gets its total only."""
    staged = hasattr(model, "stage_seconds")
    batches = [torch.from_numpy(image).permute(2, 0, 1)[None].contiguous() for image in images]
    model(batches[0])                                  # warm-up (allocations, lazy caches); then every image timed
    counts: list[int] = []
    hook = model.proposer.register_forward_hook(lambda module, inputs, output: counts.extend(map(len, output[0]))) \
        if staged else None
    if staged:
        model.time_stages = True
        model.stage_seconds = dict.fromkeys(model.stage_seconds, 0.0)
    started = time.perf_counter()
    for batch in batches:
        model(batch)
    total = 1000.0 * (time.perf_counter() - started) / len(batches)
    timing = {"test_ms_per_image": total}
    if staged:
        hook.remove()
        model.time_stages = False
        parts = {name: 1000.0 * seconds / len(batches) for name, seconds in model.stage_seconds.items()}
        timing.update({f"test_ms_{name}": parts.get(name, 0.0) for name in STAGES[:3]})
        timing["test_ms_other"] = max(0.0, total - sum(parts.values()))
        timing["proposals_per_image"] = sum(counts) / max(1, len(counts))
    return timing


def run_detector(method: str, model_name: str, files: dict, settings: dict, out: Path) -> tuple[dict, list]:
    """Train one detector through the API, time its test stages, draw a few detections; (row, pictures)."""
    run_dir = out / "runs" / method
    shutil.rmtree(run_dir, ignore_errors=True)          # a stale best.pt of an earlier study must not be reported
    val_json = files["val"]
    if method in settings["val_limit"]:
        val_json = first_images(val_json, settings["val_limit"][method])
    started = time.perf_counter()
    metrics = api.train(model_name, data=str(files["train"]), val=str(val_json), time_budget=settings["budget"],
                        out=run_dir, overrides=training_overrides(model_name, settings), progress=False,
                        verbose=False)
    train_wall = time.perf_counter() - started
    started = time.perf_counter()
    torch.set_num_threads(settings["threads"])         # as in training (api.train set it; said again for clarity)
    model, payload = api.load(run_dir / "best.pt")
    timing_count = min(settings["timing_images"], settings["timing_limit"].get(method, settings["timing_images"]))
    with model.without_caches():                       # Selective Search computed fresh, as for a new image
        timing = time_test_stages(model, load_images(files["val"], timing_count))
    task = registry.get(model_name).make_task(dict(payload["config"]))
    images = load_images(files["val"], settings["picture_images"])
    predictions = predict_arrays(model, task, images, payload["info"], torch.device("cpu"))
    pictures = [task.draw(image, best_detections(prediction), payload["info"], min_score=0.0)
                for image, prediction in zip(images, predictions)]
    extras = {"val_images": _image_count(val_json), "timing_images": timing_count, "epochs": metrics["epochs"],
              "infer_ms_per_image": metrics["infer_ms_per_image"], "train_wall_seconds": train_wall,
              "timing_wall_seconds": time.perf_counter() - started}
    return make_row(method, model_name, metrics, timing, extras), pictures


def best_detections(prediction: dict, count: int = PICTURE_DETECTIONS) -> dict:
    """The ``count`` highest-scoring detections of a prediction (lists of boxes, scores, labels): a short run's
    scores rarely reach the usual 0.5 drawing threshold, and the picture should still show what each method finds."""
    order = sorted(range(len(prediction["scores"])), key=lambda i: -prediction["scores"][i])[:count]
    return {key: [prediction[key][i] for i in order] for key in ("boxes", "scores", "labels")}


# ---- rows, ratios, verdicts (pure functions of the numbers) -------------------------------------------------------
def make_row(method: str, model_name: str, metrics: dict, timing: dict, extras: dict | None = None) -> dict:
    """One results row: the run's metrics.json numbers and the timing pass's split."""
    row = {"method": method, "model": model_name, "train_seconds": metrics["train_seconds"],
           "train_images_per_second": metrics["train_images_per_second"],
           "ap": metrics["ap"], "ap50": metrics["ap50"], **timing, **(extras or {})}
    row.setdefault("test_ms_per_image", float("nan"))
    return row


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


def plot_detections(pictures: dict[str, list], out: Path) -> None:
    """detections.png: one row per method, each image with its best detections, the same images in every row."""
    if not pictures:
        return
    columns = max(len(row) for row in pictures.values())
    figure, axes = plt.subplots(len(pictures), columns, figsize=(2.6 * columns, 2.6 * len(pictures)), squeeze=False)
    for axes_row, (method, row) in zip(axes, pictures.items()):
        for axis, picture in zip(axes_row, row):
            axis.imshow(picture.permute(1, 2, 0).numpy())
        for axis in axes_row:
            axis.set_xticks([])
            axis.set_yticks([])
        axes_row[0].set_ylabel(method)
    save_figure(figure, out / "detections.png")


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
        *(["## Skipped", "", *skipped, ""] if skipped else []),
        "![speed](speed.png)", "",
        f"The {PICTURE_DETECTIONS} highest-scoring detections of each method (score printed) on the same "
        "validation images:", "",
        "![detections](detections.png)", "",
    ]
    return save_report(out / "report.md", lines)


def run(out: Path, quick: bool, settings: dict | None = None, methods=METHODS) -> dict:
    """The study: write the scenes, train and time every detector, write results.json, plots and report.md."""
    started = time.perf_counter()
    settings = settings or SETTINGS[quick]
    files = prepare_scenes(out / "data", settings)
    rows, pictures = [], {}
    for method, model_name in methods:
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
    results = {"quick": quick, "settings": settings, "rows": rows, "speedups": speedups(rows),
               "targets": targets(rows), "threads": settings["threads"],
               "wall_seconds": time.perf_counter() - started}
    plot_speed(rows, out)
    plot_detections(pictures, out)
    write_json(out / "results.json", results)
    print(write_report(out, results))
    return results
