"""A fixed number of outputs: classification + localization (class + 4 box numbers) and pose (14 joints × 2).

The lecture's point: when you know how many things to output, localization is regression — a second head on the
same features, trained with a multi-task loss whose weight is a hyperparameter. Both tasks train on the scenes'
single-object images (pose: people only) or on COCO files, where the largest object (pose: the person with the most
labeled joints) is "the" object of each image. Targets are one-object versions of the detection targets:
``labels`` (1,), ``boxes`` (1, 4) XYXY pixels and, for pose, ``keypoints`` (1, 14, 3).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.utils import draw_bounding_boxes

from ..config import Option
from ..data.records import LSP_FLIP
from ..data.scenes import PERSON_ID
from ..data.transforms import AUGMENT_OPTIONS, Augmentation
from ..errors import ConfigError
from ..metrics import loc_metrics, pck
from ..models.localization import classify_localize, pose_regression
from ..models.localization.classify_localize import ClassifyLocalize
from ..models.localization.pose_regression import PoseRegressor, draw_pose
from ..registry import register
from .base import DataBundle, InMemorySet, Scorer, Task, image_tensor, knobs_of
from .dense import label_names, materialize, open_splits

SINGLE_OBJECT_OPTIONS = {
    "train_size": Option(4000, "training images (scenes)", min=1),
    "val_size": Option(300, "validation images (scenes)", min=1),
    "image_size": Option(128, "image side in pixels (other sizes are resized to it)", min=16, max=1024),
    "hflip": Option(True, "random horizontal flips during training (people: left and right joints swapped)"),
    **AUGMENT_OPTIONS,   # crops here always keep the one object (keep_instances)
}


def _main_object(target: dict, want_keypoints: bool) -> int | None:
    """Index of the object an image is about: the largest non-crowd one (pose: most labeled joints)."""
    candidates = [i for i in range(len(target["labels"])) if not target["iscrowd"][i]]
    if want_keypoints:
        candidates = [i for i in candidates if (target["keypoints"][i, :, 2] > 0).any()]
        return max(candidates, key=lambda i: int((target["keypoints"][i, :, 2] > 0).sum()), default=None)
    return max(candidates, key=lambda i: float(target["area"][i]), default=None)


class _SingleObjectTask(Task):
    """Shared data handling: one object per image, images in memory, flips drawn per sample."""

    options = SINGLE_OBJECT_OPTIONS
    want_keypoints = False

    def scenes_kwargs(self) -> dict:
        return {"single_object": True}

    def make_data(self, data: str | None, val: str | None) -> DataBundle:
        config = self.config
        train_source, val_source = open_splits(config, data, val, **self.scenes_kwargs())
        size, sets = config["image_size"], {}
        for split, source in (("train", train_source), ("val", val_source)):
            images, targets = materialize(source, size, desc=f"preparing {split}")
            chosen = [(i, _main_object(t, self.want_keypoints)) for i, t in enumerate(targets)]
            chosen = [(i, k) for i, k in chosen if k is not None]
            if not chosen:
                raise ConfigError(f"{split} data: no image holds a usable object"
                                  + (" with keypoints" if self.want_keypoints else ""))
            one_object = []
            for i, k in chosen:
                target = {"labels": targets[i]["labels"][k:k + 1] - 1,                       # (1,) in 0..K-1
                          "boxes": targets[i]["boxes"][k:k + 1].as_subclass(torch.Tensor).float()}   # (1, 4) px
                if self.want_keypoints:
                    target["keypoints"] = targets[i]["keypoints"][k:k + 1].float()           # (1, J, 3) px
                one_object.append(target)
            keep = torch.tensor([i for i, _ in chosen])
            augment = None
            if split == "train":
                augment = Augmentation(hflip=config["hflip"], flip_index=LSP_FLIP if self.want_keypoints else None,
                                       **knobs_of(AUGMENT_OPTIONS, config), keep_instances=True)
            sets[split] = InMemorySet(images[keep], one_object, augment, seed=config["seed"])
        names = label_names(train_source)[1:]   # object classes only: every image holds exactly one object
        info = {"num_classes": len(names), "class_names": names, "image_size": size}
        return DataBundle(sets["train"], sets["val"], info)

    def placeholder_info(self, data: str | None) -> dict:
        return {"num_classes": 7, "class_names": [str(i) for i in range(7)], "image_size": self.config["image_size"]}

    def validation_images(self, bundle: DataBundle, count: int) -> list[np.ndarray]:
        return [image.permute(1, 2, 0).numpy() for image in bundle.val.images[:count]]


class LocalizationScorer(Scorer):
    def __init__(self):
        self.rows = []

    def update(self, outputs: list[dict], targets: list[dict]) -> None:
        for output, target in zip(outputs, targets):
            self.rows.append((output["labels"].cpu(), target["labels"].cpu(), output["boxes"].cpu(),
                              target["boxes"].cpu()))

    def compute(self) -> dict:
        return loc_metrics(*(torch.cat(column) for column in zip(*self.rows)))


class PoseScorer(Scorer):
    def __init__(self):
        self.rows = []

    def update(self, outputs: list[dict], targets: list[dict]) -> None:
        for output, target in zip(outputs, targets):
            boxes = target["boxes"].cpu()
            reference = (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values                # larger side of the box
            keypoints = target["keypoints"].cpu()
            self.rows.append((output["keypoints"][..., :2].cpu(), keypoints[..., :2], keypoints[..., 2], reference))

    def compute(self) -> dict:
        return {"pck": pck(*(torch.cat(column) for column in zip(*self.rows)), alpha=0.2)}


class LocalizationTask(_SingleObjectTask):
    name = "localization"
    main_metric = "loc_acc"

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        # The lecture's transfer-learning schedule: heads alone on a frozen backbone, then everything jointly.
        model.freeze_backbone(epoch < self.config["freeze_epochs"])

    def scorer(self, bundle: DataBundle) -> Scorer:
        return LocalizationScorer()

    def describe(self, output: dict, info: dict) -> dict:
        label = int(output["labels"][0])
        return {"label": label, "class_name": info["class_names"][label], "score": float(output["scores"][0]),
                "box_xyxy": [round(float(v), 1) for v in output["boxes"][0]]}

    def draw(self, image: np.ndarray, prediction: dict, info: dict) -> torch.Tensor:
        caption = f"{prediction['class_name']} {prediction['score']:.2f}"
        return draw_bounding_boxes(image_tensor(image), torch.tensor([prediction["box_xyxy"]]), labels=[caption],
                                   colors="yellow", width=2)


class PoseTask(_SingleObjectTask):
    name = "pose"
    main_metric = "pck"
    want_keypoints = True

    def scenes_kwargs(self) -> dict:
        return {"single_object": True, "category_ids": (PERSON_ID,)}

    def scorer(self, bundle: DataBundle) -> Scorer:
        return PoseScorer()

    def describe(self, output: dict, info: dict) -> dict:
        return {"keypoints_xy": [[round(float(x), 1), round(float(y), 1)] for x, y, _ in output["keypoints"][0]]}

    def draw(self, image: np.ndarray, prediction: dict, info: dict) -> torch.Tensor:
        return draw_pose(image_tensor(image), torch.tensor(prediction["keypoints_xy"]))


TRAINING = {"lr": Option(2e-3, "peak learning rate", min=0), "batch_size": Option(32, "images per step", min=1),
            "epochs": Option(15, "passes over the training set", min=0)}


@register("loc/classify_localize", LocalizationTask, "one backbone, two heads: class scores and 4 box numbers "
          "(multi-task loss with box_weight)", {**classify_localize.OPTIONS, **TRAINING})
def build_classify_localize(config: dict, info: dict) -> nn.Module:
    return ClassifyLocalize.build(info["num_classes"], image_size=info["image_size"],
                                  **knobs_of(classify_localize.OPTIONS, config))


@register("pose/regress", PoseTask, "14 LSP joints as 28 regressed numbers (DeepPose-style)",
          {**pose_regression.OPTIONS, **TRAINING})
def build_pose_regressor(config: dict, info: dict) -> nn.Module:
    return PoseRegressor.build(1, image_size=info["image_size"], **knobs_of(pose_regression.OPTIONS, config))
