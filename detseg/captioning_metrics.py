"""Dense captioning's metric (Johnson et al., 2016): is the box right *and* is its caption right?

``densecap_map`` is a mean average precision over a grid of two thresholds: a detection is a true positive at
(IoU t, METEOR m) when it is the first (by confidence) to claim a ground-truth region, overlaps it at IoU >= t, and
its caption scores METEOR >= m against that region's references. The grid is IoU {0.3, 0.4, 0.5, 0.6, 0.7} x METEOR
{0, 0.05, 0.1, 0.15, 0.2, 0.25}; each cell's AP is the 101-point interpolated area under precision-recall over all
detections of the set, ranked by confidence; ``densecap_map`` is the mean of the 30 cells and ``det_map`` the mean
over the IoU thresholds alone (class-agnostic detection AP, captions ignored).

Ground-truth regions overlapping at IoU >= 0.7 are merged first, as the paper does (Visual Genome describes the same
region many times): the merged box is their mean, and every caption of the group is a reference.

METEOR is the real METEOR 1.5 - ``pycocoevalcap``'s jar, run with Java. Without Java (or pycocoevalcap) the metric
is not replaced by anything: ``densecap_map`` is absent and ``meteor`` says "unavailable". BLEU-4 and CIDEr
(pycocoevalcap, pure Python) score the captions of regions matched at IoU >= 0.5, tokenised by the Stanford PTB
tokenizer where Java runs, else by :func:`detseg.models.captioning.captioner.tokenize`.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from .models.captioning.captioner import tokenize

IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
METEOR_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
MERGE_IOU = 0.7
MATCHED_IOU = 0.5          # BLEU-4 / CIDEr are computed on regions matched at least this well

Meteor = Callable[[list[tuple[str, list[str]]]], list[float]]   # [(candidate, references)] -> one score each


def regions_by_image(ground_truth: dict) -> dict[int, dict]:
    """A COCO dict's non-crowd regions per image id: ``boxes`` (G, 4) xyxy and ``captions`` (G strings, '' where
    none); every image of ``images`` is present, with or without regions."""
    regions = {int(image["id"]): {"boxes": [], "captions": []} for image in ground_truth["images"]}
    for annotation in ground_truth["annotations"]:
        if annotation.get("iscrowd", 0):
            continue
        x, y, w, h = annotation["bbox"]
        regions[int(annotation["image_id"])]["boxes"].append([x, y, x + w, y + h])
        regions[int(annotation["image_id"])]["captions"].append(str(annotation.get("caption", "")))
    return {image_id: {"boxes": torch.tensor(entry["boxes"], dtype=torch.float32).reshape(-1, 4),
                       "captions": entry["captions"]} for image_id, entry in regions.items()}


def merge_regions(boxes: torch.Tensor, captions: Sequence[str], iou: float = MERGE_IOU
                  ) -> tuple[torch.Tensor, list[list[str]]]:
    """Ground-truth (G, 4) xyxy boxes -> merged (M, 4) boxes and each one's reference captions.

    Greedy: the region overlapping the most others at IoU >= ``iou`` takes them all (itself included) into one
    group, whose box is the mean; repeat on what is left.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    left = list(range(len(boxes)))
    merged, references = [], []
    overlaps = box_iou(boxes, boxes) >= iou if len(boxes) else torch.zeros((0, 0), dtype=torch.bool)
    while left:
        sub = overlaps[left][:, left]                                                      # (L, L)
        leader = int(sub.sum(1).argmax())
        group = [left[j] for j in torch.nonzero(sub[leader]).flatten().tolist()]
        merged.append(boxes[group].mean(0))
        references.append([captions[j] for j in group])
        left = [j for j in left if j not in group]
    return (torch.stack(merged) if merged else boxes.new_zeros((0, 4))), references


def interpolated_ap(true_positive: np.ndarray, positives: int) -> float:
    """101-point interpolated AP of detections already sorted by confidence (``true_positive`` bool per row)."""
    if positives == 0 or len(true_positive) == 0:
        return 0.0
    hits = np.cumsum(true_positive)
    recall = hits / positives
    precision = hits / np.arange(1, len(true_positive) + 1)
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                          for t in np.linspace(0, 1, 101)]))


def match_regions(detections: list[dict], ground_truths: list[dict]) -> tuple[list[dict], int]:
    """Per image, detections by confidence each claim their best-overlapping merged region; a region already
    claimed makes the later detection a false positive at every threshold.

    ``detections``: per image ``boxes`` (D, 4) xyxy, ``scores`` (D,), ``captions`` (D strings);
    ``ground_truths``: per image ``boxes`` (G, 4), ``captions`` (G strings). Returns one record per detection
    (``score``, ``iou``, ``first`` - claimed the region first, ``candidate``, ``references``) and the number of
    merged regions.
    """
    records, positives = [], 0
    for found, truth in zip(detections, ground_truths):
        regions, references = merge_regions(truth["boxes"], truth["captions"])
        positives += len(regions)
        boxes = torch.as_tensor(found["boxes"], dtype=torch.float32).reshape(-1, 4)
        scores = torch.as_tensor(found["scores"], dtype=torch.float32).reshape(-1)
        overlaps = box_iou(boxes, regions) if len(regions) else boxes.new_zeros((len(boxes), 0))
        claimed = set()
        for i in torch.argsort(scores, descending=True, stable=True).tolist():
            record = {"score": float(scores[i]), "iou": 0.0, "first": False, "candidate": found["captions"][i],
                      "references": []}
            if overlaps.shape[1]:
                best = int(overlaps[i].argmax())
                record.update(iou=float(overlaps[i, best]), references=references[best])
                if best not in claimed and record["iou"] > 0:
                    record["first"] = True
                    claimed.add(best)
            records.append(record)
    return records, positives


def densecap_scores(detections: list[dict], ground_truths: list[dict], meteor: Meteor | None) -> dict:
    """``det_map``, ``densecap_map`` (with METEOR), ``meteor`` (mean over matched regions), ``bleu4``, ``cider``,
    and the AP of every grid cell, from per-image detections and ground truths (see :func:`match_regions`)."""
    records, positives = match_regions(detections, ground_truths)
    records.sort(key=lambda record: -record["score"])                  # stable: ties keep image order
    iou = np.array([record["iou"] for record in records])
    first = np.array([record["first"] for record in records], dtype=bool)
    metrics: dict = {"regions": positives, "detections": len(records)}
    metrics["det_map"] = float(np.mean([interpolated_ap(first & (iou >= t), positives) for t in IOU_THRESHOLDS]))
    for t in IOU_THRESHOLDS:
        metrics[f"det_ap_iou{t:g}"] = interpolated_ap(first & (iou >= t), positives)
    # Captions only matter for detections that could count at the loosest IoU threshold.
    scored = [k for k, record in enumerate(records) if record["first"] and record["iou"] >= min(IOU_THRESHOLDS)]
    matched = [k for k in scored if records[k]["iou"] >= MATCHED_IOU]
    if meteor is None:
        metrics["meteor"] = "unavailable"
        metrics["meteor_reason"] = meteor_unavailable_reason()
    else:
        values = np.zeros(len(records))
        if scored:
            values[scored] = meteor([(records[k]["candidate"], records[k]["references"]) for k in scored])
        cells = {}
        for t in IOU_THRESHOLDS:
            for m in METEOR_THRESHOLDS:
                cells[f"iou{t:g}_meteor{m:g}"] = interpolated_ap(first & (iou >= t) & (values >= m), positives)
        metrics["densecap_map"] = float(np.mean(list(cells.values())))
        metrics["densecap_ap_grid"] = cells
        metrics["meteor"] = float(values[matched].mean()) if matched else 0.0
    metrics.update(bleu_cider([(records[k]["candidate"], records[k]["references"]) for k in matched],
                              java=meteor is not None))
    return metrics


def bleu_cider(pairs: list[tuple[str, list[str]]], java: bool) -> dict:
    """BLEU-4 and CIDEr (pycocoevalcap) of (candidate, references) pairs; 0 for no pairs."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return {"bleu4": "unavailable", "cider": "unavailable"}
    if not pairs:
        return {"bleu4": 0.0, "cider": 0.0}
    candidates = {k: [candidate] for k, (candidate, _) in enumerate(pairs)}
    references = {k: list(refs) for k, (_, refs) in enumerate(pairs)}
    candidates, references = _tokenized(candidates, java), _tokenized(references, java)
    bleu, _ = Bleu(4).compute_score(references, candidates, verbose=0)
    cider, _ = Cider().compute_score(references, candidates)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def _tokenized(captions: dict[int, list[str]], java: bool) -> dict[int, list[str]]:
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        return PTBTokenizer().tokenize({k: [{"caption": c} for c in texts] for k, texts in captions.items()})
    return {k: [" ".join(tokenize(c)) for c in texts] for k, texts in captions.items()}


# --------------------------------------------------------------------------------------------------------- METEOR
def meteor_unavailable_reason() -> str | None:
    """Why METEOR 1.5 cannot run here, or None when it can."""
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401
    except ImportError:
        return "pycocoevalcap is not installed (pip install 'detseg[caption]')"
    if shutil.which("java") is None:
        return "METEOR 1.5 is a Java program and no `java` is on PATH (Debian: apt-get install default-jre-headless)"
    return None


class Meteor15:
    """METEOR 1.5 through pycocoevalcap's jar: one Java process for the object's life, each distinct
    (candidate, references) pair scored once."""

    def __init__(self):
        from pycocoevalcap.meteor.meteor import Meteor
        self._meteor = Meteor()

    def __call__(self, pairs: list[tuple[str, list[str]]]) -> list[float]:
        keys = [(_clean(candidate), tuple(_clean(r) for r in references)) for candidate, references in pairs]
        unique = list(dict.fromkeys(keys))
        # pycocoevalcap scores a dict {id: [candidate]} against {id: references}, one Java round trip per id.
        _, scores = self._meteor.compute_score({k: list(refs) for k, (_, refs) in enumerate(unique)},
                                               {k: [candidate] for k, (candidate, _) in enumerate(unique)})
        by_key = dict(zip(unique, scores))
        return [float(by_key[key]) for key in keys]

    def close(self) -> None:
        meteor = getattr(self, "_meteor", None)
        if meteor is not None:
            meteor.meteor_p.stdin.close()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()
            self._meteor = None


def _clean(text: str) -> str:
    """METEOR's stdio protocol splits on '|||' and lines; an empty caption is one space (a valid, empty sentence)."""
    return " ".join(str(text).replace("|||", " ").split()) or " "


@contextmanager
def meteor_scorer() -> Iterator[Meteor15 | None]:
    """A METEOR 1.5 scorer for the block, its Java process stopped after it; None when Java or pycocoevalcap is
    missing (see :func:`meteor_unavailable_reason`)."""
    meteor = Meteor15() if meteor_unavailable_reason() is None else None
    try:
        yield meteor
    finally:
        if meteor is not None:
            meteor.close()
