"""Semantic segmentation: label every pixel with a category (0 = background).

Models, in the lecture's order: ``seg/sliding_window`` (classify the centre pixel of a crop, once per pixel),
``seg/fcn_fullres`` (convolutions at full resolution, all pixels at once) and ``seg/encoder_decoder`` (downsample,
then upsample with nearest / bed of nails / max unpooling / transposed or resize convolution). All three are
:class:`~detseg.models.segmentation.segmenter.Segmenter` models scored by this task, so their mIoU and pixel
accuracy are measured the same way.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.utils import draw_segmentation_masks

from ..config import Option
from ..data.transforms import AUGMENT_OPTIONS, Augmentation
from ..metrics import BoundaryIoU, ConfusionMatrix
from ..models.segmentation import encoder_decoder, fcn_fullres, sliding_window
from ..models.segmentation.segmenter import WEIGHTINGS, Segmenter, SlidingWindowSegmentation, class_weights
from ..registry import register
from .base import DataBundle, Scorer, Task, image_tensor, knobs_of
from .dense import LOADING_OPTIONS, Resize, label_names, open_set, open_splits, set_images

# A fixed colour per class (index 0, background, is never drawn).
PALETTE = ["black", "red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "purple", "pink", "brown",
           "white", "olive", "teal", "navy", "gray"]


class SegmentationScorer(Scorer):
    """Confusion matrix over every labeled validation pixel: mIoU, pixel accuracy, IoU per class by name; and the
    boundary IoU (Cheng et al.: the same IoU on the pixels within 2% of the image diagonal of object edges)."""

    def __init__(self, class_names: list[str]):
        self.class_names = class_names
        self.confusion = ConfusionMatrix(len(class_names))
        self.boundary = BoundaryIoU(len(class_names))

    def update(self, outputs: list[dict], targets: list[dict]) -> None:
        for output, target in zip(outputs, targets):
            predicted, true = output["labels"].cpu()[None], target["semantic"].cpu().long()[None]
            self.confusion.update(predicted, true)
            self.boundary.update(predicted, true)

    def compute(self) -> dict:
        per_class = self.confusion.per_class_iou()
        return {"miou": self.confusion.miou(), "pixel_acc": self.confusion.pixel_acc(),
                "boundary_iou": self.boundary.mean(),
                "per_class_iou": {name: float(iou) for name, iou in zip(self.class_names, per_class.tolist())
                                  if iou == iou}}   # NaN: the class is in neither prediction nor truth


def semantic_target(target: dict) -> dict:
    """What a segmenter trains on: the (H, W) label map, as uint8 (255 = ignore)."""
    return {"semantic": target["semantic"].as_subclass(torch.Tensor).to(torch.uint8)}


def class_pixel_counts(dataset, num_classes: int, most_images: int = 1000) -> torch.Tensor:
    """Labeled pixels per class over the training set (its first ``most_images`` when it streams from disk: a
    class's share settles long before that, and reading a whole large set only for it would delay training)."""
    if hasattr(dataset, "targets"):
        maps = [target["semantic"] for target in dataset.targets]
    else:
        maps = [item[1]["semantic"] for item in map(dataset.load, range(min(len(dataset), most_images))) if item]
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for labels in maps:
        labels = labels[labels != 255].flatten().long()
        counts += torch.bincount(labels, minlength=num_classes)[:num_classes]
    return counts


class SegmentationTask(Task):
    name = "segmentation"
    main_metric = "miou"
    options = {
        "train_size": Option(2000, "training images (scenes)", min=1),
        "val_size": Option(200, "validation images (scenes)", min=1),
        "image_size": Option(128, "image side in pixels (other sizes are resized to it)", min=16, max=1024),
        "hflip": Option(True, "random horizontal flips during training"),
        **AUGMENT_OPTIONS,
        "class_weighting": Option("sqrt_inverse", "loss weight per class from its share of the training pixels: "
                                  + "|".join(WEIGHTINGS) + " (rare classes heavier; see class_weights)",
                                  choices=WEIGHTINGS),
        **LOADING_OPTIONS,
    }

    def make_data(self, data: str | None, val: str | None) -> DataBundle:
        config = self.config
        train_source, val_source = open_splits(config, data, val)
        size, sets = config["image_size"], {}
        for split, source in (("train", train_source), ("val", val_source)):
            augment = (Augmentation(hflip=config["hflip"], **knobs_of(AUGMENT_OPTIONS, config)) if split == "train"
                       else None)
            sets[split] = open_set(source, config, Resize(size, convert=semantic_target), augment,
                                   fields=("semantic",), desc=f"preparing {split}")
        names = label_names(train_source)
        counts = class_pixel_counts(sets["train"], len(names))
        info = {"num_classes": len(names), "class_names": names, "image_size": size,
                "class_pixel_share": (counts.double() / max(1, int(counts.sum()))).tolist()}
        return DataBundle(sets["train"], sets["val"], info)

    def placeholder_info(self, data: str | None) -> dict:
        return {"num_classes": 8, "class_names": [str(i) for i in range(8)], "image_size": self.config["image_size"]}

    def scorer(self, bundle: DataBundle) -> Scorer:
        return SegmentationScorer(bundle.info["class_names"])

    def describe(self, output: dict, info: dict) -> dict:
        labels = output["labels"].cpu()                                   # (H, W) class per pixel
        counts = torch.bincount(labels.flatten(), minlength=info["num_classes"])
        return {"pixel_share": {info["class_names"][c]: round(int(n) / labels.numel(), 5)
                                for c, n in enumerate(counts.tolist()) if n},
                "_labels": labels}                                         # not JSON: drawn, not printed

    def draw(self, image: np.ndarray, prediction: dict, info: dict) -> torch.Tensor:
        picture = image_tensor(image)
        labels = prediction["_labels"]
        present = [c for c in range(1, info["num_classes"]) if (labels == c).any()]
        if not present:
            return picture
        masks = torch.stack([labels == c for c in present])
        colors = [PALETTE[c % len(PALETTE)] for c in present]
        return draw_segmentation_masks(picture, masks, alpha=0.55, colors=colors)

    def validation_images(self, bundle: DataBundle, count: int) -> list[np.ndarray]:
        return set_images(bundle.val, count)


SEG_TRAINING = {"lr": Option(1e-3, "peak learning rate", min=0), "batch_size": Option(16, "images per step", min=1),
                "epochs": Option(20, "passes over the training set", min=0)}


def _class_weights(config: dict, info: dict) -> torch.Tensor | None:
    share = info.get("class_pixel_share")   # absent before the data exists (placeholder info)
    return class_weights(share, config["class_weighting"]) if share else None


@register("seg/sliding_window", SegmentationTask,
          "the lecture's 'terrible idea': a CNN classifies the centre pixel of a crop",
          {**sliding_window.OPTIONS, **SEG_TRAINING, "batch_size": Option(8, "images per step", min=1),
           "crops_per_image": Option(64, "training crops sampled per image per step", min=1),
           "eval_stride": Option(4, "validate on every n-th pixel (1 = every pixel, the honest but slow way)",
                                 min=1)})
def build_sliding_window(config: dict, info: dict) -> nn.Module:
    network = sliding_window.SlidingWindowSegmenter.build(info["num_classes"],
                                                          **knobs_of(sliding_window.OPTIONS, config))
    return SlidingWindowSegmentation(network, info["image_size"], _class_weights(config, info),
                                     crops_per_image=config["crops_per_image"], eval_stride=config["eval_stride"])


@register("seg/fcn_fullres", SegmentationTask, "fully convolutional at full resolution: C x H x W scores in one pass",
          {**fcn_fullres.OPTIONS, **SEG_TRAINING})
def build_fcn_fullres(config: dict, info: dict) -> nn.Module:
    network = fcn_fullres.FullResolutionFCN.build(info["num_classes"], **knobs_of(fcn_fullres.OPTIONS, config))
    return Segmenter(network, info["image_size"], _class_weights(config, info))


@register("seg/encoder_decoder", SegmentationTask, "downsample then upsample (nearest, bed of nails, max unpooling, "
          "transposed or resize conv), optional skips",
          {**encoder_decoder.OPTIONS, **SEG_TRAINING, "lr": Option(3e-3, "peak learning rate", min=0)})
def build_encoder_decoder(config: dict, info: dict) -> nn.Module:
    network = encoder_decoder.EncoderDecoder.build(info["num_classes"], **knobs_of(encoder_decoder.OPTIONS, config))
    return Segmenter(network, info["image_size"], _class_weights(config, info))
