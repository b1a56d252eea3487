"""Object detection: find every object - a class and a box each - however many there are.

Every method of the lecture's progression (sliding window, R-CNN, SPP-net, Fast R-CNN, Faster R-CNN, R-FCN) is one
``det/<method>`` model of this task, so all of them read the same data, are scored by the same pycocotools call and
write the same files. Images are held in memory at ``image_size`` x ``image_size`` (COCO images of other sizes are
resized); predictions are mapped back to each image's original pixels before they are scored, so ``ap`` in
metrics.json is exactly what pycocotools computes from ``predictions.json`` against the validation json.

Methods that start from Selective Search (a ``ss_mode`` knob) get their proposals precomputed here, once per image
and cached on disk across runs: an epoch then costs only the network, as in the papers' training setups.
"""
from __future__ import annotations

import importlib
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch import nn
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from ..config import Option
from ..data.dataset import coco_ground_truth, label_maps
from ..engine.run import write_json
from ..errors import ConfigError
from ..metrics import coco_eval, results_from_detections
from ..ops.boxes import mirror_boxes
from ..registry import register
from .base import DataBundle, Task, attach_run_options, run_options, unwrap
from .dense import label_names, materialize, open_splits, resize_to_square
from .segmentation import PALETTE

DETECTION_OPTIONS = {
    "train_size": Option(3000, "training images (scenes)", min=1),
    "val_size": Option(300, "validation images (scenes)", min=1),
    "image_size": Option(128, "image side in pixels (other sizes are resized to it)", min=16, max=2048),
    "hflip": Option(True, "random horizontal flips during training"),
}
DETECTION_TRAINING = {
    "lr": Option(2e-3, "peak learning rate", min=0),
    "batch_size": Option(8, "images per step", min=1),
    "epochs": Option(12, "passes over the training set", min=0),
    "grad_clip": Option(10.0, "clip the gradient norm to this value (0 = off)", min=0),
}


class DetectionSet(torch.utils.data.Dataset):
    """Images (N, 3, S, S) uint8 in memory, their targets, and optionally precomputed proposals."""

    def __init__(self, images: torch.Tensor, targets: list[dict], proposals: list[torch.Tensor] | None = None):
        self.images, self.targets, self.proposals = images, targets, proposals

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        proposals = self.proposals[index] if self.proposals is not None else None
        return self.images[index], self.targets[index], proposals


def plain_target(target: dict) -> dict:
    """Keep what detectors train on, as plain tensors (tv_tensors subclasses are not needed past the data set)."""
    return {"boxes": target["boxes"].as_subclass(torch.Tensor).float(), "labels": target["labels"],
            "iscrowd": target["iscrowd"], "image_id": int(target["image_id"])}


def _search_one(args) -> np.ndarray:
    image, mode, max_proposals, cache_dir = args
    from ..models.detection.proposers import SelectiveSearch
    return SelectiveSearch(mode, max_proposals, cache_dir).one(image)


def precompute_proposals(images: torch.Tensor, config: dict, desc: str) -> list[torch.Tensor]:
    """Selective Search boxes for every image, from the disk cache or computed on every core (once per image)."""
    from ..models.detection.proposers import default_cache_dir
    cache_dir = config.get("proposal_cache") or default_cache_dir()
    jobs = [(image.permute(1, 2, 0).numpy(), config["ss_mode"], config["proposals_per_image"], str(cache_dir))
            for image in images]
    workers = max(1, min(os.cpu_count() or 1, 8))
    progress = dict(total=len(jobs), desc=desc, disable=None, leave=False)
    if workers == 1 or len(jobs) < 8:
        boxes = [_search_one(job) for job in tqdm(jobs, **progress)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            boxes = list(tqdm(pool.map(_search_one, jobs, chunksize=8), **progress))
    return [torch.from_numpy(np.asarray(b, dtype=np.float32)).reshape(-1, 4) for b in boxes]


class DetectionTask(Task):
    name = "detection"
    main_metric = "ap"
    options = DETECTION_OPTIONS

    def make_data(self, config: dict, data: str | None, val: str | None) -> DataBundle:
        train_source, val_source = open_splits(config, data, val)
        train_names, val_names = label_names(train_source), label_names(val_source)
        if train_names != val_names:
            raise ConfigError(f"--val: its categories {val_names[1:]} differ from the training set's "
                              f"{train_names[1:]}")
        size, sets = config["image_size"], {}
        for split, source in (("train", train_source), ("val", val_source)):
            images, targets = materialize(source, size, desc=f"preparing {split}")
            proposals = None
            if "ss_mode" in config:
                proposals = precompute_proposals(images, config, f"selective search ({split})")
            sets[split] = DetectionSet(images, [plain_target(t) for t in targets], proposals)
        sizes = {int(image["id"]): (int(image["width"]), int(image["height"])) for image in val_source.images}
        info = {"num_classes": len(train_names), "class_names": train_names, "image_size": size}
        extras = {"val_ground_truth": coco_ground_truth(val_source), "val_sizes": sizes,
                  "category_of": list(label_maps(val_source)[1])}
        return DataBundle(sets["train"], sets["val"], info, extras)

    def placeholder_info(self, config: dict, data: str | None) -> dict:
        return {"num_classes": 8, "class_names": [str(i) for i in range(8)], "image_size": config["image_size"]}

    def collate(self, batch: list):
        images, targets, proposals = zip(*batch)
        return torch.stack(images), list(targets), (None if proposals[0] is None else list(proposals))

    def batch_size_of(self, batch) -> int:
        return len(batch[0])

    @staticmethod
    def _to_device(batch, device: torch.device):
        images, targets, proposals = batch
        targets = [{key: (value.to(device) if torch.is_tensor(value) else value) for key, value in t.items()}
                   for t in targets]
        proposals = None if proposals is None else [p.to(device) for p in proposals]
        return images.to(device), targets, proposals

    @staticmethod
    def _flip(images, targets, proposals):
        """Mirror a batch left-right: images, boxes and proposals (x -> W - x)."""
        width = images.shape[-1]
        targets = [{**t, "boxes": mirror_boxes(t["boxes"], width)} for t in targets]
        proposals = None if proposals is None else [mirror_boxes(p, width) for p in proposals]
        return images.flip(-1), targets, proposals

    def losses(self, model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
        images, targets, proposals = self._to_device(batch, device)
        if run_options(model).get("hflip", True) and torch.rand(()) < 0.5:
            images, targets, proposals = self._flip(images, targets, proposals)
        return model(images, targets, proposals)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, bundle: DataBundle) -> dict[str, float]:
        sizes, side = bundle.extras["val_sizes"], bundle.info["image_size"]
        image_ids, boxes, scores, labels = [], [], [], []
        total_loss, loss_images, count = 0.0, 0, 0
        for batch in loader:
            images, targets, proposals = self._to_device(batch, device)
            losses = model(images, targets, proposals)   # {} from a model that has no losses in eval mode
            if losses:
                total_loss += float(sum(losses.values())) * len(images)
                loss_images += len(images)
            count += len(images)
            for target, detections in zip(targets, model(images, None, proposals)):
                width, height = sizes[target["image_id"]]
                scale = torch.tensor([width / side, height / side] * 2, device=detections["boxes"].device)
                image_ids.append(target["image_id"])
                boxes.append(detections["boxes"] * scale)             # back to the original image's pixels
                scores.append(detections["scores"])
                labels.append(detections["labels"])
        results = results_from_detections(image_ids, boxes, scores, labels, bundle.extras["category_of"])
        metrics = coco_eval(bundle.extras["val_ground_truth"], results, "bbox")
        bundle.extras["last_results"] = (id(unwrap(model)), results)
        metrics["val_loss"] = total_loss / loss_images if loss_images else float("nan")
        metrics["detections_per_image"] = len(results) / max(1, count)
        return metrics

    def write_outputs(self, model: nn.Module, bundle: DataBundle, run_dir, device: torch.device) -> None:
        """predictions.json: the COCO results that the final metrics.json was computed from."""
        owner, results = bundle.extras.get("last_results", (None, None))
        if owner != id(unwrap(model)):
            self.evaluate(model.eval(), torch.utils.data.DataLoader(
                bundle.val, batch_size=8, collate_fn=self.collate), device, bundle)
            results = bundle.extras["last_results"][1]
        write_json(run_dir / "predictions.json", results)

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[np.ndarray], info: dict, device: torch.device) -> list[dict]:
        model.eval()
        side, names, predictions = info["image_size"], info["class_names"], []
        for image in images:
            height, width = image.shape[:2]
            detections = model(resize_to_square(image, side).to(device))[0]   # detectors normalise themselves
            boxes = detections["boxes"].cpu() * torch.tensor([width / side, height / side] * 2)
            predictions.append({
                "boxes": [[round(float(v), 2) for v in box] for box in boxes],
                "scores": [round(float(s), 4) for s in detections["scores"]],
                "labels": [names[int(label)] for label in detections["labels"]],
            })
        return predictions

    def draw(self, image: np.ndarray, prediction: dict, info: dict, min_score: float = 0.5) -> torch.Tensor:
        picture = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        shown = [i for i, score in enumerate(prediction["scores"]) if score >= min_score]
        if not shown:
            return picture
        names = info["class_names"]
        boxes = torch.tensor([prediction["boxes"][i] for i in shown], dtype=torch.float32)
        labels = [f"{prediction['labels'][i]} {prediction['scores'][i]:.2f}" for i in shown]
        colors = [PALETTE[names.index(prediction["labels"][i]) % len(PALETTE)] for i in shown]
        return draw_bounding_boxes(picture, boxes, labels=labels, colors=colors, width=1)

    def validation_images(self, bundle: DataBundle, count: int) -> list[np.ndarray]:
        return [image.permute(1, 2, 0).numpy() for image in bundle.val.images[:count]]


TASK = DetectionTask()

# det/<method> -> (module in detseg.models.detection, one-line description). A module that does not exist yet is
# skipped, so the table grows as methods land.
DETECTORS = {
    "sliding_window": ("sliding_window", "every window at every scale, each classified by a CNN, then NMS"),
    "rcnn": ("rcnn", "R-CNN: Selective Search, each region warped and run through its own CNN"),
    "spp": ("spp_net", "SPP-net: features once per image, spatial pyramid pooling per Selective Search region"),
    "fast_rcnn": ("fast_rcnn", "Fast R-CNN: shared features, RoI pooling of Selective Search regions, end to end"),
    "faster_rcnn": ("faster_rcnn", "Faster R-CNN: a region proposal network on the shared features + Fast R-CNN"),
    "rfcn": ("rfcn", "R-FCN: RPN + position-sensitive score maps, per-region work is pooling and voting"),
    "torchvision_faster_rcnn": ("torchvision_reference", "torchvision's own FasterRCNN on the same backbone "
                                                         "(reference for the benchmarks)"),
}


def _register(method: str, module_name: str, description: str) -> None:
    qualified = f"detseg.models.detection.{module_name}"
    try:
        module = importlib.import_module(qualified)
    except ModuleNotFoundError as err:
        if err.name != qualified:
            raise
        return

    def build(config: dict, info: dict) -> nn.Module:
        return attach_run_options(module.build(config, info), config, ("hflip",))

    register(f"det/{method}", TASK, description,
             {**DETECTION_TRAINING, **module.OPTIONS, **getattr(module, "TRAINING", {})})(build)


for _method, (_module, _description) in DETECTORS.items():
    _register(_method, _module, _description)
