"""Dense captioning, measured: do good boxes get good captions, greedy vs beam, and which words the captioner gets.

Two runs on the same scenes files and the same time budget: ``cap/densecap`` and ``det/faster_rcnn``, whose
detections are scored class-agnostically with the same ``det_map`` (mean AP over IoU 0.3-0.7, categories ignored)
as DenseCap's boxes - the issue's yardstick for the localization half. Then, on the validation set:

* ``densecap_map`` (IoU x METEOR grid, METEOR 1.5), ``det_map``, METEOR / BLEU-4 / CIDEr of matched regions, with
  greedy captions and with a beam of 3;
* caption quality against the region's IoU: mean METEOR and the share of captions equal to a reference per IoU band;
* word-level accuracy against the matched region's reference: the region's own attributes (size, colour, shape)
  vs its relation to another object ("left of", "in front of", or the absolute position) and that object's
  attributes - the captioner sees only its own region, so relations are the hard part;
* captioning time: the LSTM's share of the test time for 100 regions per image (greedy and beam), beside the
  detector's own time.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .. import api, registry
from ..captioning_metrics import (MATCHED_IOU, densecap_scores, match_regions, meteor_scorer,
                                  meteor_unavailable_reason, regions_by_image)
from ..io import read_json, write_json
from ..tasks.base import image_tensor, predict_arrays
from ..viz import grid, save_png, save_report
from .detection_runs import best_detections, load_images, prepare_scenes, training_overrides

SETTINGS = {
    True: {"threads": os.cpu_count() or 1, "train": 400, "val": 50, "image_size": 128, "batch_size": 8,
           "budget": 60, "timing_images": 5},
    False: {"threads": os.cpu_count() or 1, "train": 3000, "val": 300, "image_size": 128, "batch_size": 8,
            "budget": 900, "timing_images": 20},
}
TARGETS = {"det_map_ratio": 0.8, "densecap_map": 0.3, "attribute_accuracy": 0.8, "caption_ms_100": 50.0}
IOU_BANDS = ((0.3, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.01))
SIZE_WORDS = ("small", "medium", "large")
RELATIONS = ("left of", "right of", "above", "below", "in front of", "behind")


# ---- the scenes' caption grammar ------------------------------------------------------------------------------------
def parse_scene_caption(caption: str) -> dict:
    """"small red star left of a large blue circle" -> size, colour, shape, relation, other (the neighbour's
    "large blue circle"); an absolute position ("in the top left") is the relation, with no other object. Words
    that do not fit the grammar leave fields None."""
    words = caption.split()
    fields = {"size": None, "colour": None, "shape": None, "relation": None, "other": None}
    if len(words) >= 4 and words[1] == "person" and words[2] == "in":
        fields.update(size=words[0], shape="person", colour=words[3])
        rest = words[4:]
    elif len(words) >= 3:
        fields.update(size=words[0], colour=words[1], shape=words[2])
        rest = words[3:]
    else:
        return fields
    text = " ".join(rest)
    for relation in RELATIONS:
        if text.startswith(relation + " a "):
            fields.update(relation=relation, other=text[len(relation) + 3:])
            return fields
    fields["relation"] = text or None
    return fields


def word_accuracy(records: list[dict]) -> dict:
    """Per field, the share of matched regions (IoU >= 0.5, first to claim) whose caption has the reference's word;
    against several references (merged regions) the one agreeing most is used."""
    fields = ("size", "colour", "shape", "relation", "other")
    right = {field: 0 for field in fields}
    counted = 0
    for record in records:
        if not (record["first"] and record["iou"] >= MATCHED_IOU):
            continue
        predicted = parse_scene_caption(record["candidate"])
        references = [parse_scene_caption(reference) for reference in record["references"]]
        best = max(references, key=lambda ref: sum(predicted[f] == ref[f] for f in fields))
        counted += 1
        for field in fields:
            right[field] += int(predicted[field] is not None and predicted[field] == best[field])
    accuracy = {field: right[field] / counted if counted else 0.0 for field in fields}
    accuracy["attributes"] = float(np.mean([accuracy[f] for f in ("size", "colour", "shape")]))
    accuracy["matched_regions"] = counted
    return accuracy


def quality_by_iou(records: list[dict], meteor) -> list[dict]:
    """Mean METEOR and exact-caption share of the first-claiming detections in each IoU band."""
    rows = []
    scored = [record for record in records if record["first"] and record["iou"] >= IOU_BANDS[0][0]]
    values = meteor([(r["candidate"], r["references"]) for r in scored]) if meteor is not None and scored else None
    for low, high in IOU_BANDS:
        inside = [k for k, record in enumerate(scored) if low <= record["iou"] < high]
        rows.append({"iou_low": low, "iou_high": min(high, 1.0), "regions": len(inside),
                     "meteor": float(np.mean([values[k] for k in inside])) if values is not None and inside else None,
                     "exact": float(np.mean([scored[k]["candidate"] in scored[k]["references"] for k in inside]))
                     if inside else None})
    return rows


# ---- data of a run ------------------------------------------------------------------------------------------------
def per_image(val_json: Path, predictions: list[dict]) -> tuple[list[dict], list[dict]]:
    """Detections (from a predictions.json) and ground truths per validation image, boxes xyxy in its pixels."""
    truth = regions_by_image(read_json(val_json))
    found = {image_id: {"boxes": [], "scores": [], "captions": []} for image_id in truth}
    for prediction in predictions:
        x, y, w, h = prediction["bbox"]
        entry = found[int(prediction["image_id"])]
        entry["boxes"].append([x, y, x + w, y + h])
        entry["scores"].append(prediction["score"])
        entry["captions"].append(prediction.get("caption", ""))
    detections = [{"boxes": torch.tensor(entry["boxes"], dtype=torch.float32).reshape(-1, 4),
                   "scores": torch.tensor(entry["scores"], dtype=torch.float32), "captions": entry["captions"]}
                  for entry in found.values()]
    return detections, list(truth.values())


def caption_timing(checkpoint: Path, images: list, beam: int, repeats: int = 3) -> dict:
    """Test time per image with 100 regions captioned each (score threshold 0, 300 proposals, loose NMS, so that a
    128 px scene yields 100 regions): the whole forward and the LSTM's part, medians over ``repeats`` passes."""
    model, _ = api.load(checkpoint, overrides={"score_thresh": 0.0, "detections_per_image": 100,
                                               "rpn_post_nms_test": 300, "nms_thresh": 0.95, "beam": beam})
    generate, spent = model.captioner.generate, []

    def timed(*args, **kwargs):
        started = time.perf_counter()
        result = generate(*args, **kwargs)
        spent.append(time.perf_counter() - started)
        return result

    model.captioner.generate = timed
    totals, captions, regions = [], [], []
    with torch.no_grad():
        model([image_tensor(images[0])])                                   # warm-up
        for _ in range(repeats):
            spent.clear()
            started = time.perf_counter()
            for image in images:
                regions.append(len(model([image_tensor(image)])[0]["boxes"]))
            totals.append((time.perf_counter() - started) / len(images))
            captions.append(sum(spent) / len(images))
    total, caption = statistics.median(totals), statistics.median(captions)
    return {"beam": beam, "test_ms_per_image": 1000 * total, "caption_ms_per_image": 1000 * caption,
            "detector_ms_per_image": 1000 * (total - caption), "regions_per_image": float(np.mean(regions))}


# ---- the study ----------------------------------------------------------------------------------------------------
def run(out: Path, quick: bool = False, settings: dict | None = None) -> dict:
    settings = settings or SETTINGS[quick]
    torch.set_num_threads(settings["threads"])
    files = prepare_scenes(out / "data", settings)
    runs = {}
    for name, model_name in (("densecap", "cap/densecap"), ("faster_rcnn", "det/faster_rcnn")):
        run_dir = out / "runs" / name
        metrics = api.train(model_name, data=str(files["train"]), val=str(files["val"]),
                            time_budget=settings["budget"], out=run_dir,
                            overrides=training_overrides(model_name, settings), progress=False, verbose=False)
        runs[name] = {"run_dir": str(run_dir), "metrics": metrics}
    densecap_dir, faster_dir = Path(runs["densecap"]["run_dir"]), Path(runs["faster_rcnn"]["run_dir"])
    # Faster R-CNN's boxes, categories ignored, scored by the same det_map.
    faster_found, truth = per_image(files["val"], read_json(faster_dir / "predictions.json"))
    faster_det_map = densecap_scores(faster_found, truth, None)["det_map"]
    beam = api.evaluate(densecap_dir / "best.pt", data=str(files["train"]), val=str(files["val"]),
                        overrides={"beam": 3})
    found, truth = per_image(files["val"], read_json(densecap_dir / "predictions.json"))
    records, _ = match_regions(found, truth)
    with meteor_scorer() as meteor:
        bands = quality_by_iou(records, meteor)
    words = word_accuracy(records)
    timing_images = load_images(files["val"], settings["timing_images"])
    timing = [caption_timing(densecap_dir / "best.pt", timing_images, beam) for beam in (1, 3)]
    greedy = runs["densecap"]["metrics"]
    results = {"study": "densecap", "quick": quick, "settings": settings, "targets": TARGETS,
               "meteor": "METEOR 1.5" if meteor_unavailable_reason() is None else meteor_unavailable_reason(),
               "greedy": greedy, "beam3": beam, "faster_rcnn_det_map": faster_det_map,
               "faster_rcnn_ap": runs["faster_rcnn"]["metrics"].get("ap"),
               "det_map_ratio": greedy["det_map"] / faster_det_map if faster_det_map else None,
               "quality_by_iou": bands, "word_accuracy": words, "timing": timing}
    _draw(densecap_dir / "best.pt", load_images(files["val"], 4), out / "captions.png")
    write_json(out / "results.json", results)
    save_report(out / "report.md", report(results))
    return results


def _draw(checkpoint: Path, images: list, path: Path) -> None:
    """The task's own drawings of the 6 best regions (at least 0.5 confident) of a few validation images."""
    model, payload = api.load(checkpoint)
    task = registry.get(payload["model_name"]).make_task(dict(payload["config"]))
    predictions = predict_arrays(model, task, images, payload["info"], torch.device("cpu"))
    pictures = [task.draw(image, best_detections(prediction, 6), payload["info"], min_score=0.5)
                for image, prediction in zip(images, predictions)]
    save_png(path, grid(pictures, columns=2, side=512))


def _number(value, digits: int = 3) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


def report(results: dict) -> list[str]:
    settings, greedy, beam = results["settings"], results["greedy"], results["beam3"]
    words, ratio = results["word_accuracy"], results["det_map_ratio"]
    lines = [
        "# Dense captioning" + (" (quick)" if results["quick"] else ""),
        "",
        f"Built-in scenes, {settings['train']} training / {settings['val']} validation images at "
        f"{settings['image_size']} px, `--time-budget {settings['budget']}` per run, {settings['threads']} threads. "
        f"Command: `detseg bench densecap{' --quick' if results['quick'] else ''}`. METEOR: {results['meteor']}.",
        "",
        "| captions | densecap_map | det_map | METEOR | BLEU-4 | CIDEr |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, metrics in (("greedy", greedy), ("beam 3", beam)):
        lines.append(f"| {name} | {_number(metrics.get('densecap_map'))} | {_number(metrics['det_map'])} | "
                     f"{_number(metrics.get('meteor'))} | {_number(metrics.get('bleu4'))} | "
                     f"{_number(metrics.get('cider'))} |")
    lines += [
        "",
        f"Localization: DenseCap's det_map {_number(greedy['det_map'])} vs det/faster_rcnn's class-agnostic "
        f"{_number(results['faster_rcnn_det_map'])} at the same budget: ratio {_number(ratio, 2)} "
        f"(target >= {TARGETS['det_map_ratio']}); densecap_map target >= {TARGETS['densecap_map']}.",
        "",
        "## Caption quality vs the region's IoU (greedy)",
        "",
        "| IoU | regions | mean METEOR | caption = a reference |",
        "|---|---:|---:|---:|",
    ]
    for band in results["quality_by_iou"]:
        lines.append(f"| {band['iou_low']:.1f}-{band['iou_high']:.1f} | {band['regions']} | "
                     f"{_number(band['meteor'])} | {_number(band['exact'])} |")
    lines += [
        "",
        f"## Words of matched regions (IoU >= {MATCHED_IOU}, {words['matched_regions']} regions)",
        "",
        "| own size | own colour | own shape | attributes (mean) | relation | the other object |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {_number(words['size'])} | {_number(words['colour'])} | {_number(words['shape'])} | "
        f"{_number(words['attributes'])} | {_number(words['relation'])} | {_number(words['other'])} |",
        "",
        f"Target: attributes right >= {TARGETS['attribute_accuracy']:.0%}. The captioner sees its region's code "
        "only, so the relation and the neighbour must be guessed from what the RoI's features carry of the "
        "surroundings.",
        "",
        "## Captioning time (100 regions per image, batch 1, medians of 3 passes)",
        "",
        "| captions | whole test ms / image | detector ms | captioner ms | regions / image |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in results["timing"]:
        lines.append(f"| {'greedy' if row['beam'] == 1 else 'beam ' + str(row['beam'])} | "
                     f"{row['test_ms_per_image']:.1f} | {row['detector_ms_per_image']:.1f} | "
                     f"{row['caption_ms_per_image']:.1f} | {row['regions_per_image']:.0f} |")
    lines += ["", f"Target: greedy captioning of 100 regions <= {TARGETS['caption_ms_100']:.0f} ms per image.", "",
              "![captions](captions.png)", ""]
    return lines
