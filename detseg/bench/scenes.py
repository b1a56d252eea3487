"""How fast the synthetic scenes generator is, and what it produces.

Images per second (median over runs, one core) for multi-object and single-object scenes: the full COCO records
(``sample``: masks, RLE, boxes, captions, semantic map) and the bare drawing (``render``), plus the classification
renderer at 32 and 64 px. Wall-clock and CPU-time rates are both reported: on a shared machine the CPU-time rate is
what the code costs. The report also shows annotated examples and the statistics of 1,000 scenes.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path

import cv2
import torch

from ..data.dataset import InstanceDataset
from ..data.scenes import ScenesSource, area_thresholds, render_single_object_images
from ..io import write_json, write_text
from ..viz import draw_annotations, grid, save_png

AIM_IMAGES_PER_SECOND = 200


def _rate(work, images: int, runs: int) -> dict:
    wall, cpu = [], []
    for _ in range(runs):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        work()
        wall.append(images / (time.perf_counter() - wall_start))
        cpu.append(images / max(time.process_time() - cpu_start, 1e-9))
    return {"images_per_second_wall": statistics.median(wall), "images_per_second_cpu": statistics.median(cpu)}


def _statistics(count: int, size: int) -> dict:
    source = ScenesSource(count, size=size, seed=0)
    small, large = area_thresholds(size)
    objects, sizes, categories = [], Counter(), Counter()
    names = {category["id"]: category["name"] for category in source.categories}
    for index in range(count):
        annotations = source.sample(index).annotations
        objects.append(len(annotations))
        for annotation in annotations:
            categories[names[annotation["category_id"]]] += 1
            sizes["small" if annotation["area"] < small else "large" if annotation["area"] > large else "medium"] += 1
    total = sum(sizes.values())
    return {"images": count, "objects_per_image_mean": total / count, "objects_min": min(objects),
            "objects_max": max(objects), "size_share": {k: v / total for k, v in sorted(sizes.items())},
            "category_share": {k: v / total for k, v in sorted(categories.items())}}


def run(out: Path, quick: bool) -> dict:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # one core, as the aim states
    images, runs, size = (200, 3, 128) if quick else (500, 5, 128)
    cases = {}
    for label, single in (("multi_object", False), ("single_object", True)):
        source = ScenesSource(images, size=size, seed=0, single_object=single)
        cases[f"{label}_sample"] = _rate(lambda s=source: [s.sample(i) for i in range(images)], images, runs)
        cases[f"{label}_render"] = _rate(lambda s=source: [s.render(i) for i in range(images)], images, runs)
    for pixels in (32, 64):
        cases[f"classification_{pixels}px"] = _rate(
            lambda p=pixels: render_single_object_images(images, p, seed=0), images, runs)
    stats = _statistics(200 if quick else 1000, size)

    dataset = InstanceDataset(ScenesSource(16, size=size, seed=1))
    pictures = [draw_annotations(*dataset[i], dataset.label_names) for i in range(16)]
    save_png(out / "examples.png", grid(pictures))

    results = {"size": size, "images_per_run": images, "runs": runs, "cases": cases, "statistics": stats,
               "aim_images_per_second": AIM_IMAGES_PER_SECOND}
    write_json(out / "results.json", results)
    lines = ["# scenes generation", "", f"{images} images per run, median of {runs} runs, one core, {size} px.", "",
             "| case | images/s (wall) | images/s (CPU) |", "|---|---:|---:|"]
    for name, rate in cases.items():
        lines.append(f"| {name} | {rate['images_per_second_wall']:.0f} | {rate['images_per_second_cpu']:.0f} |")
    verdict = cases["multi_object_sample"]["images_per_second_cpu"] >= AIM_IMAGES_PER_SECOND
    lines += ["", f"Aim: ≥ {AIM_IMAGES_PER_SECOND} multi-object images/s with full records — "
              f"{'met' if verdict else 'NOT met'} (CPU-time rate).", "",
              f"Statistics of {stats['images']} scenes: {stats['objects_per_image_mean']:.2f} objects per image "
              f"({stats['objects_min']}–{stats['objects_max']}); sizes "
              + ", ".join(f"{k} {v:.0%}" for k, v in stats["size_share"].items()) + "; categories "
              + ", ".join(f"{k} {v:.0%}" for k, v in stats["category_share"].items()) + ".", "",
              "![annotated examples](examples.png)", ""]
    write_text(out / "report.md", "\n".join(lines))
    print("\n".join(lines))
    return results
