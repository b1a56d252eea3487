"""What the detection studies share: the scenes as COCO files, training one detector through the API, timing its
test stages, and the rows and pictures they report.

:mod:`.rcnn` (the R-CNN family's speed table) and :mod:`.detectors` (Huang et al.'s speed/accuracy study across every
detector) train the same way on the same files, so a number means the same in both reports.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .. import api, registry  # noqa: E402
from ..data.export import write_scenes  # noqa: E402
from ..data.images import load_rgb  # noqa: E402
from ..errors import ConfigError  # noqa: E402
from ..io import read_json, write_json  # noqa: E402
from ..tasks.base import predict_arrays  # noqa: E402
from ..viz import save_figure  # noqa: E402

STAGES = ("proposals", "shared_conv", "per_region", "other")
PICTURE_DETECTIONS = 4    # detections drawn per image in detections.png


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


# ---- partial runs (``--only``) -------------------------------------------------------------------------------
def select_methods(only: str | None, methods, extra: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """The (method, model) pairs ``only`` names (comma-separated row names; ``extra`` are other parts a study
    accepts, e.g. 'sweeps'); every pair without ``only``. An unknown name is a ConfigError listing the choices."""
    if not only:
        return list(methods)
    names = [name.strip() for name in only.split(",") if name.strip()]
    known = {method for method, _ in methods} | set(extra)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"--only {only}: unknown {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return [(method, model) for method, model in methods if method in names]


def previous_results(out: Path, settings: dict) -> dict:
    """An earlier results.json in ``out`` made with the same settings (a partial run keeps its other rows), else {}."""
    path = out / "results.json"
    try:
        previous = read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return {}
    if not isinstance(previous, dict) or previous.get("settings") != json.loads(json.dumps(settings)):
        return {}
    return previous


def merge_rows(previous: list[dict], fresh: list[dict], methods) -> list[dict]:
    """``fresh`` rows plus the ``previous`` rows of methods not run again, in the study's method order."""
    ran = {row["method"] for row in fresh}
    rows = [row for row in previous if isinstance(row, dict) and row.get("method") not in ran] + fresh
    order = [method for method, _ in methods]
    rows.sort(key=lambda row: order.index(row["method"]) if row.get("method") in order else len(order))
    return rows


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


def backbone_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The shared convolutional trunk of a detector (ours or a torchvision wrapper's), None for R-CNN and sliding
    windows, whose per-crop CNN is part of the per-region work."""
    backbone = getattr(model, "backbone", None)
    if backbone is None and hasattr(model, "detector"):
        backbone = getattr(model.detector, "backbone", None)
    return backbone


class _Stopwatch:
    """Seconds spent inside one module's forward, summed over calls (forward pre-hook + hook)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self._started = 0.0, 0.0
        self._handles = (module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop))

    def _start(self, module, inputs):
        self._started = time.perf_counter()

    def _stop(self, module, inputs, output):
        self.seconds += time.perf_counter() - self._started

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def gigaflops(model: torch.nn.Module, image) -> float:
    """GFLOPs of one eval-mode forward of one image (torch's FLOP counter: convolutions and matrix products, the
    operations that dominate; NMS and Selective Search are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.from_numpy(image).permute(2, 0, 1)[None].contiguous())
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def time_test_stages(model: torch.nn.Module, images: list, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per image at batch 1: total, the backbone's share (``test_ms_backbone``, absent without a shared
    backbone), per stage for region-based detectors (RegionDetector.time_stages) and the number of proposals per
    image the RoI head saw. Every image is timed ``repeats`` times over; the total is the median pass (one slow
    pass - a page fault storm, a busy moment - does not move it), the shares are means over all passes."""
    staged = hasattr(model, "stage_seconds")
    batches = [torch.from_numpy(image).permute(2, 0, 1)[None].contiguous() for image in images]
    model(batches[0])                                  # warm-up (allocations, lazy caches); then every image timed
    counts: list[int] = []
    hook = model.proposer.register_forward_hook(lambda module, inputs, output: counts.extend(map(len, output[0]))) \
        if staged else None
    if staged:
        model.time_stages = True
        model.stage_seconds = dict.fromkeys(model.stage_seconds, 0.0)
    backbone = backbone_of(model)
    stopwatch = _Stopwatch(backbone) if backbone is not None else None
    passes = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        for batch in batches:
            model(batch)
        passes.append(1000.0 * (time.perf_counter() - started) / len(batches))
    timed = len(batches) * len(passes)
    timing = {"test_ms_per_image": statistics.median(passes), "test_passes": len(passes)}
    if stopwatch is not None:
        stopwatch.remove()
        timing["test_ms_backbone"] = 1000.0 * stopwatch.seconds / timed
    if staged:
        hook.remove()
        model.time_stages = False
        parts = {name: 1000.0 * seconds / timed for name, seconds in model.stage_seconds.items()}
        timing.update({f"test_ms_{name}": parts.get(name, 0.0) for name in STAGES[:3]})
        timing["test_ms_other"] = max(0.0, timing["test_ms_per_image"] - sum(parts.values()))
        timing["proposals_per_image"] = sum(counts) / max(1, len(counts))
    return timing


def run_detector(method: str, model_name: str, files: dict, settings: dict, out: Path,
                 overrides: dict | None = None) -> tuple[dict, list]:
    """Train one detector through the API (``overrides`` on top of the equal conditions), time its test stages,
    count its parameters and FLOPs, draw a few detections; (row, pictures)."""
    run_dir = out / "runs" / method
    shutil.rmtree(run_dir, ignore_errors=True)          # a stale best.pt of an earlier study must not be reported
    val_json = files["val"]
    if method in settings["val_limit"]:
        val_json = first_images(val_json, settings["val_limit"][method])
    started = time.perf_counter()
    metrics = api.train(model_name, data=str(files["train"]), val=str(val_json), time_budget=settings["budget"],
                        out=run_dir, overrides={**training_overrides(model_name, settings), **(overrides or {})},
                        progress=False,
                        verbose=False)
    train_wall = time.perf_counter() - started
    started = time.perf_counter()
    torch.set_num_threads(settings["threads"])         # as in training (api.train set it; said again for clarity)
    model, payload = api.load(run_dir / "best.pt")
    timing_count = min(settings["timing_images"], settings["timing_limit"].get(method, settings["timing_images"]))
    timing_images = load_images(files["val"], timing_count)
    with model.without_caches():                       # Selective Search computed fresh, as for a new image
        timing = time_test_stages(model, timing_images)
    timing["gflops"] = gigaflops(model, timing_images[0])
    task = registry.get(model_name).make_task(dict(payload["config"]))
    images = load_images(files["val"], settings["picture_images"])
    predictions = predict_arrays(model, task, images, payload["info"], torch.device("cpu"))
    pictures = [task.draw(image, best_detections(prediction), payload["info"], min_score=0.0)
                for image, prediction in zip(images, predictions)]
    extras = {"val_images": _image_count(val_json), "timing_images": timing_count, "epochs": metrics["epochs"],
              "infer_ms_per_image": metrics["infer_ms_per_image"], "params": metrics.get("params"),
              "image_size": payload["info"]["image_size"], "run_dir": str(run_dir), "val_json": str(val_json),
              "train_wall_seconds": train_wall,
              "timing_wall_seconds": time.perf_counter() - started}
    return make_row(method, model_name, metrics, timing, extras), pictures


def best_detections(prediction: dict, count: int = PICTURE_DETECTIONS) -> dict:
    """The ``count`` highest-scoring detections of a prediction (lists of boxes, scores, labels and, for dense
    captioning, captions): a short run's scores rarely reach the usual 0.5 drawing threshold, and the picture should
    still show what each method finds."""
    order = sorted(range(len(prediction["scores"])), key=lambda i: -prediction["scores"][i])[:count]
    keys = [key for key in ("boxes", "scores", "labels", "captions") if key in prediction]
    return {key: [prediction[key][i] for i in order] for key in keys}


# ---- rows and pictures -------------------------------------------------------------------------------------------
def make_row(method: str, model_name: str, metrics: dict, timing: dict, extras: dict | None = None) -> dict:
    """One results row: the run's metrics.json numbers and the timing pass's split."""
    row = {"method": method, "model": model_name, "train_seconds": metrics["train_seconds"],
           "train_images_per_second": metrics["train_images_per_second"],
           "ap": metrics["ap"], "ap50": metrics["ap50"],
           **{key: metrics[key] for key in ("ap75", "ap_small", "ap_medium", "ap_large") if key in metrics},
           **timing, **(extras or {})}
    row.setdefault("test_ms_per_image", float("nan"))
    return row


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


