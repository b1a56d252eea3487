"""Open any supported data set by path, and summarise it.

``path/to/instances.json`` -> :class:`CocoSource`; a directory with ``Annotations/`` (or xml files) ->
:class:`VocSource`. Everything is validated on opening, so a bad file fails here with one clear line.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from tqdm import tqdm

from ..errors import DataError
from .coco import CocoSource
from .voc import VocSource


def open_source(path: str | Path, image_root: str | Path | None = None, split: str | None = "train",
                strict: bool = True):
    """The source at ``path``; ``strict=False`` opens COCO files with degenerate polygons (their boxes kept, see
    :class:`CocoSource`). VOC has no polygons, so ``strict`` changes nothing there."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or directory")
    if path.is_dir():
        return VocSource(path, split=split, image_dir=image_root)
    if path.suffix.lower() != ".json":
        raise DataError(path, "expected a COCO .json file or a VOC directory")
    return CocoSource(path, image_root=image_root, strict=strict)


def summarize(source, decode: bool = True, progress: bool = True) -> dict:
    """Counts per category, crowd regions, keypoints, captions; with ``decode`` every image is opened too."""
    names = {category["id"]: category["name"] for category in source.categories}
    per_category: Counter = Counter()
    crowd = keypoints = captions = 0
    sizes: Counter = Counter()
    for image in source.images:
        sizes[(image["width"], image["height"])] += 1
    for annotation in getattr(source, "annotations", []):
        per_category[names[annotation["category_id"]]] += 1
        crowd += int(annotation.get("iscrowd", 0))
        keypoints += int(annotation.get("num_keypoints", 0) > 0)
        captions += int(bool(annotation.get("caption")))
    if decode:
        for index in tqdm(range(len(source)), desc="decoding images", disable=None if progress else True, leave=False):
            source.sample(index)  # raises DataError naming the file for a corrupt or mis-sized image
    common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(3))
    return {"images": len(source), "annotations": sum(per_category.values()), "categories": len(names),
            "per_category": dict(per_category), "crowd": crowd, "with_keypoints": keypoints,
            "with_captions": captions, "image_sizes": common, "images_decoded": decode,
            "degenerate_polygons_dropped": getattr(source, "degenerate_polygons", 0)}
