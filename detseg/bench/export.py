"""ONNX export, measured: does the exported file give PyTorch's numbers, and is onnxruntime faster than eager?

For every exportable family one small model is trained briefly on the scenes (registry defaults, a time budget of
seconds: the weights only have to be trained enough for the detectors' scores to spread out, so that NMS is not
deciding among ties), exported with :func:`detseg.api.export` and checked there (onnxruntime against eager PyTorch on
scenes and random inputs: scores within 1e-4, boxes within 1e-3 px). Then both are timed on the same input - one
scenes image at the model's input size, batch 1 - with the same threads: ``torch.set_num_threads(THREADS)`` and
onnxruntime's ``intra_op_num_threads = THREADS`` (inter-op 1, no spinning between runs: spinning threads would
steal the cores from torch's in the alternating rounds, see :func:`detseg.export.onnx_session`). Eager is the model contract's ``model(images)``
under ``torch.inference_mode()``; onnxruntime is ``session.run`` on the same pixels. Rounds alternate the two, so
a machine that slows down mid-study slows both; each round's time per call is the mean of its calls, and the
reported time is the median over rounds. The ratio onnxruntime / eager is the issue's target (< 1 for classification
and segmentation).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .. import api
from ..data.scenes import ScenesSource
from ..export import onnx_session, require_onnx
from ..io import write_json
from ..viz import save_report

THREADS = 2
TARGET_FAMILIES = ("classification", "segmentation")   # ratio < 1 is the target for these
# (family, model, overrides): registry defaults except the data sizes, so the timed network is the one users train.
MODELS = (
    ("classification", "cls/convnet", {}),
    ("segmentation", "seg/encoder_decoder", {}),
    ("segmentation", "seg/fcn_fullres", {}),
    ("localization", "loc/classify_localize", {}),
    ("pose", "pose/regress", {}),
    ("detection", "det/faster_rcnn", {}),
    ("detection", "det/yolo", {}),
    ("detection", "det/ssd", {}),
)
SETTINGS = {
    True: {"train_seconds": 5.0, "train_size": 128, "val_size": 16, "rounds": 5, "calls": 10, "warmup": 3},
    False: {"train_seconds": 30.0, "train_size": 512, "val_size": 32, "rounds": 15, "calls": 20, "warmup": 10},
}


def train_small(name: str, overrides: dict, run_dir: Path, settings: dict) -> Path:
    """A few seconds of training (the time budget stops it); returns best.pt."""
    knobs = {"train_size": settings["train_size"], "val_size": settings["val_size"], "threads": THREADS,
             **overrides}
    api.train(name, epochs=1000, time_budget=settings["train_seconds"], out=run_dir, seed=0, overrides=knobs,
              progress=False, verbose=False)
    return run_dir / "best.pt"


def scenes_image(shape: tuple[int, ...]) -> torch.Tensor:
    """One scenes image at the export input's size, (1, 3, H, W) float in [0, 1]."""
    _, _, height, width = shape
    pixels = ScenesSource(1, size=(width, height), seed=1, split="bench").render(0).image      # (H, W, 3) uint8
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float().div(255.0)


def time_both(model: torch.nn.Module, session, input_name: str, images: torch.Tensor, settings: dict) -> dict:
    """Median over rounds of ms per call, eager and onnxruntime alternating round by round."""
    feed = {input_name: images.numpy()}

    def eager():
        with torch.inference_mode():
            model(images)

    def runtime():
        session.run(None, feed)

    for _ in range(settings["warmup"]):
        eager()
        runtime()
    rounds = {"eager": [], "onnxruntime": []}
    for _ in range(settings["rounds"]):
        for label, call in (("eager", eager), ("onnxruntime", runtime)):
            start = time.perf_counter()
            for _ in range(settings["calls"]):
                call()
            rounds[label].append(1000 * (time.perf_counter() - start) / settings["calls"])
    eager_ms, runtime_ms = (statistics.median(rounds[label]) for label in ("eager", "onnxruntime"))
    return {"eager_ms": eager_ms, "onnxruntime_ms": runtime_ms, "ratio": runtime_ms / eager_ms,
            "eager_ms_rounds": rounds["eager"], "onnxruntime_ms_rounds": rounds["onnxruntime"]}


def measure(family: str, name: str, overrides: dict, out: Path, settings: dict) -> dict:
    slug = name.replace("/", "-")
    checkpoint = train_small(name, overrides, out / "runs" / slug, settings)
    torch.set_num_threads(THREADS)                       # training may have set others
    report = api.export(checkpoint, out=out / "onnx" / f"{slug}.onnx")
    model, _ = api.load(checkpoint)
    shape = tuple(report["input"]["shape"])
    images = scenes_image(shape)
    timing = time_both(model, onnx_session(report["file"], threads=THREADS), report["input"]["name"], images,
                       settings)
    return {"family": family, "model": name, "input_shape": list(shape), "outputs": report["outputs"],
            "max_diff": report["max_diff"], "mismatches": report["mismatches"],
            "within_tolerance": report["within_tolerance"], "onnx_bytes": report["bytes"], **timing}


def run(out: Path, quick: bool) -> dict:
    _, onnxruntime = require_onnx()
    settings = SETTINGS[quick]
    torch.set_num_threads(THREADS)
    rows = []
    for family, name, overrides in MODELS:
        print(f"export bench: {name}", flush=True)
        rows.append(measure(family, name, overrides, out, settings))
    targets = {row["model"]: row["ratio"] < 1 for row in rows if row["family"] in TARGET_FAMILIES}
    results = {"quick": quick, "threads": THREADS, "settings": settings, "torch": torch.__version__,
               "onnxruntime": onnxruntime.__version__, "rows": rows,
               "all_within_tolerance": all(row["within_tolerance"] for row in rows),
               "ratio_below_1_for_classification_and_segmentation": all(targets.values())}
    write_json(out / "results.json", results)
    text = save_report(out / "report.md", report_lines(results))
    print(text)
    return results


def report_lines(results: dict) -> list[str]:
    settings = results["settings"]
    lines = ["# ONNX export: equality and onnxruntime vs PyTorch eager", "",
             f"Each model trained {settings['train_seconds']:g} s on {settings['train_size']} scenes (registry "
             f"defaults), exported and checked by `detseg export`; then timed at batch 1 on one scenes image, "
             f"{results['threads']} threads for both (torch {results['torch']}, onnxruntime "
             f"{results['onnxruntime']}): median over {settings['rounds']} alternating rounds of "
             f"{settings['calls']} calls.", "",
             "| family | model | input | max diff scores | max diff boxes (px) | within tolerance | eager ms | "
             "onnxruntime ms | onnxruntime / eager |", "|---|---|---|---:|---:|---|---:|---:|---:|"]
    for row in results["rows"]:
        diff = row["max_diff"]
        score = max((value for key, value in diff.items() if key not in ("boxes", "keypoints", "labels")),
                    default=float("nan"))
        box = max((value for key, value in diff.items() if key in ("boxes", "keypoints")), default=float("nan"))
        lines.append(f"| {row['family']} | {row['model']} | {'x'.join(map(str, row['input_shape']))} | {score:.1e} "
                     f"| {box:.1e} | {'yes' if row['within_tolerance'] else 'NO'} | {row['eager_ms']:.2f} | "
                     f"{row['onnxruntime_ms']:.2f} | {row['ratio']:.2f} |")
    met = results["ratio_below_1_for_classification_and_segmentation"]
    lines += ["", f"Target onnxruntime / eager < 1 for classification and segmentation: {'met' if met else 'NOT met'}; "
              f"every file within tolerance (1e-4, boxes 1e-3 px): "
              f"{'yes' if results['all_within_tolerance'] else 'NO'}.", ""]
    return lines

