"""Visual Genome region descriptions -> the COCO-style json ``cap/densecap`` reads (DenseCap's own data).

Visual Genome's ``region_descriptions.json`` is a list with one entry per image - ``{"id": image id, "regions":
[{"region_id", "image_id", "x", "y", "width", "height", "phrase"}, ...]}`` - and its images are ``<image id>.jpg``
in one directory. :func:`convert_visual_genome` writes ``train.json`` and ``val.json``: one category ``region``,
one annotation per region with ``bbox``, ``area``, ``iscrowd`` 0 and the phrase as ``caption``, images referenced
by a path relative to the output directory (nothing is copied). Regions are clipped to their image; regions left
with no area, and images whose file is missing, are skipped and counted in the returned summary.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

from PIL import Image

from ..errors import DataError
from ..io import write_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _number(value, file, image_id, region_id, field) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(file, "expected a finite number", image_id=image_id, ann_id=region_id, field=field,
                        value=value)
    return float(value)


def _find_image(images_dir: Path, image_id: int) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = images_dir / f"{image_id}{suffix}"
        if path.is_file():
            return path
    return None


def convert_visual_genome(regions_json: str | Path, images_dir: str | Path, out: str | Path,
                          val_fraction: float = 0.1) -> dict:
    """Write ``out/train.json`` and ``out/val.json`` from Visual Genome region descriptions; returns a summary.

    Every ``1 / val_fraction``-th image (by position in the file) goes to validation; 0 puts all in training.
    """
    regions_json, images_dir, out = Path(regions_json), Path(images_dir), Path(out)
    try:
        entries = json.loads(regions_json.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(regions_json, "file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(regions_json, f"not valid JSON ({err})") from None
    if not isinstance(entries, list):
        raise DataError(regions_json, "expected a list of images, each with 'id' and 'regions'")
    if not images_dir.is_dir():
        raise DataError(images_dir, "images directory not found")
    if not 0 <= val_fraction < 1:
        raise DataError(regions_json, f"val_fraction {val_fraction}: expected 0 <= fraction < 1")
    out.mkdir(parents=True, exist_ok=True)
    every = round(1 / val_fraction) if val_fraction > 0 else 0
    splits = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}
    missing_images = empty_regions = 0
    annotation_ids = itertools.count(1)                 # unique across both splits
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("regions"), list):
            raise DataError(regions_json, "expected an object with a 'regions' list", field=f"[{position}]",
                            value=type(entry).__name__)
        image_id = entry.get("id", entry.get("image_id"))
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise DataError(regions_json, "image id must be an integer", field=f"[{position}].id", value=image_id)
        path = _find_image(images_dir, image_id)
        if path is None:
            missing_images += 1
            continue
        try:
            with Image.open(path) as image:
                width, height = image.size
        except OSError as err:
            raise DataError(path, f"cannot read the image ({err})", image_id=image_id) from None
        split = splits["val" if every and position % every == every - 1 else "train"]
        split["images"].append({"id": image_id, "width": width, "height": height,
                                "file_name": os.path.relpath(path.resolve(), out.resolve())})
        for region in entry["regions"]:
            if not isinstance(region, dict):
                raise DataError(regions_json, "a region must be an object", image_id=image_id,
                                value=type(region).__name__)
            region_id = region.get("region_id")
            x, y, w, h = (_number(region.get(key), regions_json, image_id, region_id, key)
                          for key in ("x", "y", "width", "height"))
            phrase = region.get("phrase")
            if not isinstance(phrase, str):
                raise DataError(regions_json, "phrase must be a string", image_id=image_id, ann_id=region_id,
                                field="phrase", value=phrase)
            x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
            x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
            if x2 - x1 < 1 or y2 - y1 < 1:
                empty_regions += 1
                continue
            split["annotations"].append({
                "id": next(annotation_ids), "image_id": image_id,
                "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0, "caption": " ".join(phrase.split())})
    summary = {"out_dir": str(out), "missing_images": missing_images, "empty_regions_dropped": empty_regions}
    for name, split in splits.items():
        if not split["images"]:
            continue
        document = {"info": {"description": f"Visual Genome regions of {regions_json.name} ({name})"},
                    "images": split["images"], "annotations": split["annotations"],
                    "categories": [{"id": 1, "name": "region", "supercategory": "region"}]}
        write_json(out / f"{name}.json", document)
        summary[name] = {"json": str(out / f"{name}.json"), "images": len(split["images"]),
                         "regions": len(split["annotations"])}
    if not any(name in summary for name in splits):
        raise DataError(regions_json, f"no image of the file was found in {images_dir} (expected <id>.jpg)")
    return summary
