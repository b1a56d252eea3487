"""Write a data source to disk as a COCO data set every COCO tool can read.

Layout under ``out_dir`` (file names in the json are relative to ``out_dir``)::

    <split>.json                    COCO instances: info, licenses, images, annotations, categories
    <split>/000001.png              RGB images, named by image id
    semantic/<split>/000001.png     uint8 semantic maps, pixel value = category id (0 = background)

so ``COCO(out_dir / "train.json")`` loads and ``Image.open(out_dir / img["file_name"])`` opens each image. The json
is written last and atomically: a split whose json exists is complete.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from detseg.data.records import Sample, Source
from detseg.io import write_text
from detseg.data.scenes import ScenesSource, area_thresholds, render_single_object_images  # noqa: F401

# render_single_object_images lives with the generator; it is re-exported here beside the other ways to get data.
__all__ = ["write_coco", "write_scenes", "render_single_object_images"]


def write_coco(source: Source, out_dir: str | os.PathLike, split_name: str, progress: bool = True) -> Path:
    """Write every sample of ``source`` as split ``split_name`` under ``out_dir``; returns the json's path."""
    json_path, _, _ = _write_split(source, Path(out_dir), split_name, progress)
    return json_path


def write_scenes(out_dir: str | os.PathLike, train: int = 1000, val: int = 200, size: int | tuple[int, int] = 128,
                 seed: int = 0, progress: bool = True) -> dict:
    """Generate the scenes data set: ``train`` and ``val`` images (val drawn with split="val", so it differs), square
    ``size`` px or ``size=(width, height)``.

    A split with 0 images is not written. Returns ``{"out_dir": Path, "<split>": {"json": Path, "images": int,
    "annotations": int}, ...}`` for the splits written.
    """
    out = Path(out_dir)
    result: dict = {"out_dir": out}
    for split, count in (("train", train), ("val", val)):
        if count == 0:
            continue
        source = ScenesSource(count, size=size, seed=seed, split=split)
        json_path, num_images, num_annotations = _write_split(source, out, split, progress)
        result[split] = {"json": json_path, "images": num_images, "annotations": num_annotations}
    return result


def _write_split(source: Source, out: Path, split: str, progress: bool) -> tuple[Path, int, int]:
    """Images and semantic maps first, the json last; returns (json path, image count, annotation count)."""
    (out / split).mkdir(parents=True, exist_ok=True)
    (out / "semantic" / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    # disable=None shows the bar only on a terminal, so logs and error output stay clean.
    for index in tqdm(range(len(source)), desc=f"writing {split}", unit="img", disable=None if progress else True):
        sample = source.sample(index)
        name = f"{sample.image_id:06d}.png"
        # Noisy images barely compress: zlib level 1 is twice as fast as the default and only ~15% bigger.
        Image.fromarray(sample.image).save(out / split / name, compress_level=1)
        Image.fromarray(_semantic(sample)).save(out / "semantic" / split / name)     # 2-D uint8: mode "L"
        height, width = sample.image.shape[:2]
        images.append({"id": sample.image_id, "file_name": f"{split}/{name}", "width": width, "height": height})
        annotations += _with_rle(sample)
    document = {
        "info": {"description": f"detseg export, split {split}", "version": "1.0",
                 "date_created": datetime.date.today().isoformat(), **_source_info(source)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": source.categories,
    }
    json_path = out / f"{split}.json"
    _atomic_write_json(json_path, document)
    return json_path, len(images), len(annotations)


def _source_info(source: Source) -> dict:
    """What regenerates a scenes split exactly (empty for other sources)."""
    if not isinstance(source, ScenesSource):
        return {}
    small, large = area_thresholds(source.size)
    return {"generator": "detseg scenes", "size": source.size, "width": source.width, "height": source.height,
            "seed": source.seed, "split": source.split,
            "single_object": source.single_object, "centered": source.centered, "max_objects": source.max_objects,
            # The size words' area limits, for COCOeval's areaRng (COCO's own 32²/96² suit ~640 px images).
            "area_ranges": {"small": [0.0, small], "medium": [small, large], "large": [large, 1e10]}}


def _semantic(sample: Sample) -> np.ndarray:
    """The sample's semantic map, or one painted from its visible masks. (H, W) uint8."""
    if sample.semantic is not None:
        return sample.semantic
    semantic = np.zeros(sample.image.shape[:2], dtype=np.uint8)
    for annotation, mask in zip(sample.annotations, _masks(sample)):
        semantic[mask > 0] = annotation["category_id"]
    return semantic


def _masks(sample: Sample) -> np.ndarray:
    if sample.masks is not None:
        return sample.masks
    height, width = sample.image.shape[:2]
    masks = np.zeros((len(sample.annotations), height, width), dtype=np.uint8)
    for k, annotation in enumerate(sample.annotations):
        segmentation = annotation.get("segmentation")
        if segmentation:
            rles = mask_utils.frPyObjects(segmentation, height, width)
            masks[k] = mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles)
    return masks


def _with_rle(sample: Sample) -> list[dict]:
    """Annotations with json-ready segmentations: RLE counts as str; masks encoded where a source gave none."""
    out = []
    for k, annotation in enumerate(sample.annotations):
        annotation = dict(annotation)
        segmentation = annotation.get("segmentation")
        if segmentation is None and sample.masks is not None:
            segmentation = mask_utils.encode(np.asfortranarray(sample.masks[k]))
        if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), bytes):
            segmentation = {"size": list(segmentation["size"]), "counts": segmentation["counts"].decode("ascii")}
        if segmentation is not None:
            annotation["segmentation"] = segmentation
        out.append(annotation)
    return out


def _atomic_write_json(path: Path, document: dict) -> None:
    """Compact json, written atomically (readers never see half of it) and readable by everyone: a data set is
    for reading."""
    write_text(path, json.dumps(document), mode=0o644)
