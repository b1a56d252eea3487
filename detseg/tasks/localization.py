"""A fixed number of outputs: classification + localization (class + 4 box numbers) and pose (14 joints × 2).

The lecture's point: when you know how many things to output, localization is regression — a second head on the
same features, trained with a multi-task loss whose weight is a hyperparameter. Both tasks train on the scenes'
single-object images (pose: people only) or on COCO files, where the largest object (pose: the person with the most
labeled joints) is "the" object of each image.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.utils import draw_bounding_boxes

from ..config import Option
from ..data.records import LSP_FLIP
from ..data.scenes import PERSON_ID
from ..errors import ConfigError
from ..metrics import loc_metrics, pck
from ..ops.boxes import mirror_boxes
from ..models.localization import classify_localize, pose_regression
from ..models.localization.classify_localize import ClassifyLocalize, boxes_to_normalized, boxes_to_pixels
from ..models.localization.pose_regression import PoseRegressor, draw_pose
from ..registry import register
from .base import DataBundle, Task, attach_run_options, knobs_of, run_options, unwrap
from .dense import label_names, materialize, normalize, open_splits, to_square_input

SINGLE_OBJECT_OPTIONS = {
    "train_size": Option(4000, "training images (scenes)", min=1),
    "val_size": Option(300, "validation images (scenes)", min=1),
    "image_size": Option(128, "image side in pixels (other sizes are resized to it)", min=16, max=1024),
    "hflip": Option(True, "random horizontal flips during training"),
}


def _main_object(target: dict, want_keypoints: bool) -> int | None:
    """Index of the object an image is about: the largest non-crowd one (pose: most labeled joints)."""
    candidates = [i for i in range(len(target["labels"])) if not target["iscrowd"][i]]
    if want_keypoints:
        candidates = [i for i in candidates if (target["keypoints"][i, :, 2] > 0).any()]
        return max(candidates, key=lambda i: int((target["keypoints"][i, :, 2] > 0).sum()), default=None)
    return max(candidates, key=lambda i: float(target["area"][i]), default=None)


class _SingleObjectTask(Task):
    """Shared data handling: one object per image, images in memory, flips applied per batch."""

    options = SINGLE_OBJECT_OPTIONS
    want_keypoints = False

    def scenes_kwargs(self) -> dict:
        return {"single_object": True}

    def make_data(self, config: dict, data: str | None, val: str | None) -> DataBundle:
        train_source, val_source = open_splits(config, data, val, **self.scenes_kwargs())
        size = config["image_size"]
        splits = {}
        for split, source in (("train", train_source), ("val", val_source)):
            images, targets = materialize(source, size, desc=f"preparing {split}")
            chosen = [(i, _main_object(t, self.want_keypoints)) for i, t in enumerate(targets)]
            chosen = [(i, k) for i, k in chosen if k is not None]
            if not chosen:
                raise ConfigError(f"{split} data: no image holds a usable object"
                                  + (" with keypoints" if self.want_keypoints else ""))
            keep = torch.tensor([i for i, _ in chosen])
            labels = torch.stack([targets[i]["labels"][k] for i, k in chosen])                   # (N,) 1..K
            boxes = torch.stack([targets[i]["boxes"][k] for i, k in chosen]).float()             # (N, 4) xyxy px
            keypoints = torch.stack([targets[i]["keypoints"][k] for i, k in chosen]).float() \
                if targets[0]["keypoints"].shape[1] else torch.zeros(len(chosen), 0, 3)          # (N, J, 3) px
            splits[split] = torch.utils.data.TensorDataset(images[keep], labels - 1, boxes, keypoints)
        names = label_names(train_source)[1:]   # object classes only: every image holds exactly one object
        info = {"num_classes": len(names), "class_names": names, "image_size": size}
        return DataBundle(splits["train"], splits["val"], info, extras={"val_images": splits["val"].tensors[0]})

    def placeholder_info(self, config: dict, data: str | None) -> dict:
        return {"num_classes": 7, "class_names": [str(i) for i in range(7)], "image_size": config["image_size"]}

    @staticmethod
    def flip_batch(images, boxes, keypoints, size):
        """Mirror images, boxes (pixel xyxy) and joints (left <-> right swapped) horizontally."""
        boxes = mirror_boxes(boxes, size)
        if keypoints.shape[1]:
            keypoints = keypoints[:, list(LSP_FLIP)].clone()
            labeled = keypoints[..., 2] > 0
            keypoints[..., 0] = torch.where(labeled, (size - 1) - keypoints[..., 0], keypoints[..., 0])
        return images.flip(-1), boxes, keypoints

    def prepared(self, model: nn.Module, batch, device: torch.device):
        images, labels, boxes, keypoints = (tensor.to(device) for tensor in batch)
        if model.training and run_options(model)["hflip"] and torch.rand(()) < 0.5:
            images, boxes, keypoints = self.flip_batch(images, boxes, keypoints, images.shape[-1])
        return normalize(images), labels, boxes, keypoints

    def validation_images(self, bundle: DataBundle, count: int) -> list[np.ndarray]:
        return [image.permute(1, 2, 0).numpy() for image in bundle.extras["val_images"][:count]]


class LocalizationTask(_SingleObjectTask):
    name = "localization"
    main_metric = "loc_acc"

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        # The lecture's transfer-learning schedule: heads alone on a frozen backbone, then everything jointly.
        inner = unwrap(model)
        inner.freeze_backbone(epoch < inner.freeze_epochs)

    def losses(self, model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
        images, labels, boxes, _ = self.prepared(model, batch, device)
        size = images.shape[-1]
        return unwrap(model).loss(model(images), labels, boxes_to_normalized(boxes, size, size))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, bundle: DataBundle) -> dict[str, float]:
        inner, total_loss, predicted, truth = unwrap(model), 0.0, [], []
        for batch in loader:
            images, labels, boxes, _ = self.prepared(model, batch, device)
            size = images.shape[-1]
            outputs = model(images)
            total_loss += float(sum(inner.loss(outputs, labels, boxes_to_normalized(boxes, size, size)).values())) \
                * len(images)
            scores, guesses = outputs["logits"].max(dim=1)
            predicted.append((guesses.cpu(), boxes_to_pixels(inner.box_of_class(outputs["boxes"], guesses),
                                                             size, size).cpu()))
            truth.append((labels.cpu(), boxes.cpu()))
        metrics = loc_metrics(torch.cat([p[0] for p in predicted]), torch.cat([t[0] for t in truth]),
                              torch.cat([p[1] for p in predicted]), torch.cat([t[1] for t in truth]))
        metrics["val_loss"] = total_loss / max(1, len(bundle.val))
        return metrics

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[np.ndarray], info: dict, device: torch.device) -> list[dict]:
        model.eval()
        predictions = []
        for image in images:
            out = model.predict(to_square_input(image, info["image_size"]).to(device))
            height, width = image.shape[:2]
            box = boxes_to_pixels(out["boxes"][0].cpu(), height, width)
            label = int(out["labels"][0])
            predictions.append({"label": label, "class_name": info["class_names"][label],
                                "score": float(out["scores"][0]), "box_xyxy": [round(float(v), 1) for v in box]})
        return predictions

    def draw(self, image: np.ndarray, prediction: dict, info: dict) -> torch.Tensor:
        picture = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        caption = f"{prediction['class_name']} {prediction['score']:.2f}"
        return draw_bounding_boxes(picture, torch.tensor([prediction["box_xyxy"]]), labels=[caption],
                                   colors="yellow", width=2)


class PoseTask(_SingleObjectTask):
    name = "pose"
    main_metric = "pck"
    want_keypoints = True

    def scenes_kwargs(self) -> dict:
        return {"single_object": True, "category_ids": (PERSON_ID,)}

    @staticmethod
    def _normalized(keypoints: torch.Tensor, size: int) -> torch.Tensor:
        return keypoints[..., :2] / size   # (N, 14, 3) pixels -> (N, 14, 2) in [0, 1]

    def losses(self, model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
        images, _, _, keypoints = self.prepared(model, batch, device)
        return unwrap(model).loss(model(images), self._normalized(keypoints, images.shape[-1]), keypoints[..., 2])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, bundle: DataBundle) -> dict[str, float]:
        inner, total_loss, rows = unwrap(model), 0.0, []
        for batch in loader:
            images, _, boxes, keypoints = self.prepared(model, batch, device)
            size = images.shape[-1]
            joints = model(images)                                                    # (N, 14, 2) normalised
            total_loss += float(inner.loss(joints, self._normalized(keypoints, size), keypoints[..., 2])["joints"]) \
                * len(images)
            reference = (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values               # larger side of the box
            rows.append((joints.cpu() * size, keypoints[..., :2].cpu(), keypoints[..., 2].cpu(), reference.cpu()))
        columns = [torch.cat(column) for column in zip(*rows)]
        return {"pck": pck(*columns, alpha=0.2), "val_loss": total_loss / max(1, len(bundle.val))}

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[np.ndarray], info: dict, device: torch.device) -> list[dict]:
        model.eval()
        predictions = []
        for image in images:
            joints = model(to_square_input(image, info["image_size"]).to(device))[0].cpu()   # (14, 2) normalised
            height, width = image.shape[:2]
            pixels = joints * torch.tensor([width, height])
            predictions.append({"keypoints_xy": [[round(float(x), 1), round(float(y), 1)] for x, y in pixels]})
        return predictions

    def draw(self, image: np.ndarray, prediction: dict, info: dict) -> torch.Tensor:
        picture = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return draw_pose(picture, torch.tensor(prediction["keypoints_xy"]))


LOC_TASK, POSE_TASK = LocalizationTask(), PoseTask()
TRAINING = {"lr": Option(2e-3, "peak learning rate", min=0), "batch_size": Option(32, "images per step", min=1),
            "epochs": Option(15, "passes over the training set", min=0)}


@register("loc/classify_localize", LOC_TASK, "one backbone, two heads: class scores and 4 box numbers "
          "(multi-task loss with box_weight)", {**classify_localize.OPTIONS, **TRAINING})
def build_classify_localize(config: dict, info: dict) -> nn.Module:
    model = ClassifyLocalize.build(info["num_classes"], **knobs_of(classify_localize.OPTIONS, config))
    return attach_run_options(model, config, ("hflip",))


@register("pose/regress", POSE_TASK, "14 LSP joints as 28 regressed numbers (DeepPose-style)",
          {**pose_regression.OPTIONS, **TRAINING})
def build_pose_regressor(config: dict, info: dict) -> nn.Module:
    model = PoseRegressor.build(1, **knobs_of(pose_regression.OPTIONS, config))
    return attach_run_options(model, config, ("hflip",))
