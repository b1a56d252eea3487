"""Object detection: find every object - a class and a box each - however many there are.

Every method of the lecture's progression - the region-based sliding window, R-CNN, SPP-net, Fast R-CNN, Faster
R-CNN, R-FCN, then the single-shot YOLO and SSD - is one ``det/<method>`` model of this task, so all of them read the
same data, are scored by the same pycocotools call and write the same files. Images reach the model at
``image_size`` x ``image_size`` (the scenes' and the lecture's setup) or, with ``min_size > 0``, aspect-preserving
(short side ``min_size``, long side at most ``max_size``); the generated scenes are held in memory, files stream
from disk (``loading``). The model predicts in the pixels it was given, and the scorer maps its boxes back to each
image's original pixels before they are scored, so ``ap`` in metrics.json is exactly what pycocotools computes from
``predictions.json`` against the validation json.

Methods that start from Selective Search (a ``ss_mode`` knob) get their training proposals precomputed here, once
per image and cached on disk across runs, and carried in each target as ``proposals`` (flipped with the image): an
epoch then costs only the network, as in the papers' training setups.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch import nn
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from ..config import Option
from ..data.dataset import coco_ground_truth, label_maps
from ..data.transforms import AUGMENT_OPTIONS, Augmentation
from ..errors import ConfigError
from ..io import write_json
from ..metrics import (CONFUSION_IOU_THRESHOLD, CONFUSION_SCORE_THRESHOLD, coco_evaluator, coco_stats,
                       detection_confusion, per_class_ap, precision_recall_curves, results_from_detections)
from ..models.detection import (fast_rcnn, faster_rcnn, rcnn, rfcn, sliding_window, spp_net, ssd,
                                torchvision_reference, torchvision_ssd, yolo)
from ..models.detection.proposers import SelectiveSearch, default_cache_dir
from ..registry import register
from ..viz import plot_confusion, plot_pr_curves
from .base import DataBundle, Scorer, Task, image_tensor, knobs_of
from .dense import LOADING_OPTIONS, Resize, label_names, open_set, open_splits, set_images
from .segmentation import PALETTE

DETECTION_OPTIONS = {
    "train_size": Option(3000, "training images (scenes)", min=1),
    "val_size": Option(300, "validation images (scenes)", min=1),
    "image_size": Option(128, "square input side in pixels, every image resized to it (the scenes' size); "
                              "ignored for files when min_size > 0", min=16, max=2048),
    "min_size": Option(0, "0: square image_size inputs; > 0: keep each image's aspect ratio, short side resized to "
                          "min_size (torchvision's convention; e.g. 800 for COCO photos)", min=0, max=4096),
    "max_size": Option(0, "with min_size > 0: the long side at most this (e.g. 1333); 0 = 16 x min_size", min=0,
                       max=8192),
    "resize": Option("detseg", "with min_size > 0, how a model resizes: detseg (antialiased bilinear, rounded like "
                               "a stored uint8 copy) | torchvision (normalise, then plain bilinear at torchvision's "
                               "scale and sizes: its GeneralizedRCNNTransform, for converted checkpoints)",
                     choices=("detseg", "torchvision")),
    "hflip": Option(True, "random horizontal flips during training"),
    **AUGMENT_OPTIONS,
    "strict": Option(True, "COCO files: a polygon of < 3 points fails the set; false drops such polygons, keeps "
                           "their boxes and prints how many (real COCO train2017 has some)"),
    **LOADING_OPTIONS,
}
DETECTION_TRAINING = {
    "lr": Option(2e-3, "peak learning rate", min=0),
    "batch_size": Option(8, "images per step", min=1),
    "epochs": Option(12, "passes over the training set", min=0),
    "grad_clip": Option(10.0, "clip the gradient norm to this value (0 = off)", min=0),
}


DETECTION_FIELDS = ()   # beyond boxes, labels, iscrowd: no masks, joints or captions to decode


def plain_target(target: dict) -> dict:
    """Keep what detectors train on, as plain tensors (tv_tensors subclasses are not needed past the data set)."""
    return {"boxes": target["boxes"].as_subclass(torch.Tensor).float(), "labels": target["labels"],
            "iscrowd": target["iscrowd"], "image_id": int(target["image_id"])}


def _search_one(args) -> np.ndarray:
    image, mode, max_proposals, cache_dir = args
    return SelectiveSearch(mode, max_proposals, cache_dir).one(image)


def precompute_proposals(images: torch.Tensor, config: dict, desc: str) -> list[torch.Tensor]:
    """Selective Search boxes for every image, from the disk cache or computed on every core (once per image)."""
    cache_dir = config.get("proposal_cache") or default_cache_dir()
    jobs = [(image.permute(1, 2, 0).numpy(), config["ss_mode"], config["proposals_per_image"], str(cache_dir))
            for image in images]
    workers = os.cpu_count() or 1
    progress = dict(total=len(jobs), desc=desc, disable=None, leave=False)
    if workers == 1 or len(jobs) < 8:
        boxes = [_search_one(job) for job in tqdm(jobs, **progress)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            boxes = list(tqdm(pool.map(_search_one, jobs, chunksize=8), **progress))
    return [torch.from_numpy(np.asarray(b, dtype=np.float32)).reshape(-1, 4) for b in boxes]


class DetectionScorer(Scorer):
    """Detections of the validation set in COCO results format, in the original images' pixels, scored by
    pycocotools (``results`` is what predictions.json holds)."""

    def __init__(self, bundle: DataBundle):
        self.sizes = bundle.extras["val_sizes"]
        self.ground_truth, self.category_of = bundle.extras["val_ground_truth"], bundle.extras["category_of"]
        self.image_ids, self.boxes, self.scores, self.labels = [], [], [], []
        self.results: list[dict] = []

    def scale_to_original(self, target: dict) -> tuple[float, float]:
        """(sx, sy) from the pixels of the image the model saw (``target["size"]``, :class:`dense.Resize`) to the
        original image's."""
        width, height = self.sizes[target["image_id"]]
        input_height, input_width = target["size"]
        return width / input_width, height / input_height

    def update(self, outputs: list[dict], targets: list[dict]) -> None:
        for detections, target in zip(outputs, targets):
            scale = torch.tensor(self.scale_to_original(target) * 2, device=detections["boxes"].device)
            self.image_ids.append(target["image_id"])
            self.boxes.append(detections["boxes"] * scale)            # model-input pixels -> the original image's
            self.scores.append(detections["scores"])
            self.labels.append(detections["labels"])

    def compute(self) -> dict:
        self.results = results_from_detections(self.image_ids, self.boxes, self.scores, self.labels,
                                               self.category_of)
        # One COCOeval run gives the stats, AP per class and the curves pr_curves.png draws.
        evaluator = coco_evaluator(self.ground_truth, self.results, "bbox")
        metrics = coco_stats(evaluator)
        metrics["per_class_ap"] = per_class_ap(evaluator)
        metrics["detections_per_image"] = len(self.results) / max(1, len(self.image_ids))
        self.pr_curves = precision_recall_curves(evaluator, iou=0.5)          # (recall (101,), {name: precision})
        return metrics


class DetectionTask(Task):
    name = "detection"
    main_metric = "ap"
    detects_boxes = True                      # predict writes COCO box results (so do instance tasks)
    options = DETECTION_OPTIONS
    fields = DETECTION_FIELDS                 # what the data sets decode beyond boxes (instance tasks: masks, joints)
    convert = staticmethod(plain_target)      # a target as the models train on it (module-level: workers pickle it)

    def augmentation(self, source) -> Augmentation:
        """The training augmentation (flips, jitter, crops, colour) of this run."""
        return Augmentation(hflip=self.config["hflip"], **knobs_of(AUGMENT_OPTIONS, self.config))

    def extend_info(self, info: dict, source) -> dict:
        """What a model of this task must know about the data beyond its classes (nothing for box detectors)."""
        return info

    def make_data(self, data: str | None, val: str | None) -> DataBundle:
        config = self.config
        train_source, val_source = open_splits(config, data, val)
        train_names, val_names = label_names(train_source), label_names(val_source)
        if train_names != val_names:
            raise ConfigError(f"--val {val}: its categories {val_names[1:]} differ from the training set's "
                              f"{train_names[1:]}")
        selective_search = "ss_mode" in config
        if selective_search and config["loading"] == "stream":
            raise ConfigError("loading=stream: Selective Search detectors train on proposals precomputed once per "
                              "image, which needs the images in memory; use loading=memory (or auto)")
        resize = Resize(config["image_size"], config["min_size"], config["max_size"], convert=self.convert)
        sets = {}
        for split, source in (("train", train_source), ("val", val_source)):
            augment = self.augmentation(source) if split == "train" else None
            sets[split] = open_set(source, config, resize, augment, fields=self.fields,
                                   desc=f"preparing {split}", in_memory=True if selective_search else None)
            if selective_search and split == "train":
                train_set = sets[split]
                for target, boxes in zip(train_set.targets, precompute_proposals(train_set.images, config,
                                                                                  "selective search")):
                    target["proposals"] = boxes
        if selective_search:   # fill the cache, so validation reads the proposals the model would compute
            precompute_proposals(sets["val"].images, config, "selective search (val)")
        sizes = {int(image["id"]): (int(image["width"]), int(image["height"])) for image in val_source.images}
        info = {"num_classes": len(train_names), "class_names": train_names, "image_size": config["image_size"],
                "category_ids": list(label_maps(train_source)[1])}   # label -> COCO id, for `detseg predict`
        info = self.extend_info(info, train_source)
        extras = {"val_ground_truth": coco_ground_truth(val_source), "val_sizes": sizes,
                  "category_of": list(label_maps(val_source)[1])}
        return DataBundle(sets["train"], sets["val"], info, extras)

    def placeholder_info(self, data: str | None) -> dict:
        return {"num_classes": 8, "class_names": [str(i) for i in range(8)], "image_size": self.config["image_size"]}

    def scorer(self, bundle: DataBundle) -> Scorer:
        return DetectionScorer(bundle)

    def write_outputs(self, scorer: Scorer, run_dir) -> None:
        """predictions.json: the COCO results that the final metrics.json was computed from; pr_curves.png from
        the same evaluation; confusion.json and confusion.png: detections scoring >= 0.5 matched to the ground
        truth at IoU >= 0.5 (:func:`detseg.metrics.detection_confusion`)."""
        write_json(run_dir / "predictions.json", scorer.results)
        plot_pr_curves(run_dir / "pr_curves.png", *scorer.pr_curves, iou=0.5)
        matrix, names = detection_confusion(scorer.ground_truth, scorer.results)
        write_json(run_dir / "confusion.json", {
            "classes": names, "rows": "ground truth", "columns": "detections", "score_threshold":
            CONFUSION_SCORE_THRESHOLD, "iou_threshold": CONFUSION_IOU_THRESHOLD, "matrix": matrix.tolist()})
        plot_confusion(run_dir / "confusion.png", matrix, names,
                       f"detections (score >= {CONFUSION_SCORE_THRESHOLD:g}) matched at IoU "
                       f">= {CONFUSION_IOU_THRESHOLD:g}")

    def describe(self, output: dict, info: dict) -> dict:
        names = info["class_names"]
        return {"boxes": [[round(float(v), 2) for v in box] for box in output["boxes"].cpu()],
                "scores": [round(float(s), 4) for s in output["scores"]],
                "labels": [names[int(label)] for label in output["labels"]]}

    def draw(self, image: np.ndarray, prediction: dict, info: dict, min_score: float = 0.5) -> torch.Tensor:
        picture = image_tensor(image)
        shown = [i for i, score in enumerate(prediction["scores"]) if score >= min_score]
        if not shown:
            return picture
        names = info["class_names"]
        boxes = torch.tensor([prediction["boxes"][i] for i in shown], dtype=torch.float32)
        labels = [f"{prediction['labels'][i]} {prediction['scores'][i]:.2f}" for i in shown]
        colors = [PALETTE[names.index(prediction["labels"][i]) % len(PALETTE)] for i in shown]
        return draw_bounding_boxes(picture, boxes, labels=labels, colors=colors, width=1)

    def validation_images(self, bundle: DataBundle, count: int) -> list[np.ndarray]:
        return set_images(bundle.val, count)


# det/<method> -> (module in detseg.models.detection, one-line description), in the lecture's order.
DETECTORS = {
    "sliding_window": (sliding_window, "every window at every scale, each classified by a CNN, then NMS"),
    "rcnn": (rcnn, "R-CNN: Selective Search, each region warped and run through its own CNN"),
    "spp": (spp_net, "SPP-net: features once per image, spatial pyramid pooling per Selective Search region"),
    "fast_rcnn": (fast_rcnn, "Fast R-CNN: shared features, RoI pooling of Selective Search regions, end to end"),
    "faster_rcnn": (faster_rcnn, "Faster R-CNN: a region proposal network on the shared features + Fast R-CNN"),
    "rfcn": (rfcn, "R-FCN: RPN + position-sensitive score maps, per-region work is pooling and voting"),
    "yolo": (yolo, "YOLO: one S x S grid, B base boxes per cell, offsets + confidence + class scores in one pass"),
    "ssd": (ssd, "SSD: default boxes on feature maps of several strides, hard-negative mining, one pass"),
    "torchvision_faster_rcnn": (torchvision_reference, "torchvision's own FasterRCNN on the same backbone "
                                                       "(reference for the benchmarks)"),
    "torchvision_ssd": (torchvision_ssd, "torchvision's own SSD on det/ssd's backbone and default boxes "
                                         "(reference for the benchmarks)"),
}

for _method, (_module, _description) in DETECTORS.items():
    register(f"det/{_method}", DetectionTask, _description,
             {**DETECTION_TRAINING, **_module.OPTIONS, **getattr(_module, "TRAINING", {})})(_module.build)
