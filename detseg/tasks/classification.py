"""Image and vector classification: the task the lecture starts from, and HyperQuest's playground.

Models: ``cls/mlp`` and ``cls/convnet``. Data: the scenes' single-object images (default) or the vector / digits
tasks of :mod:`detseg.data.classification`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import draw_bounding_boxes

from ..config import Option
from ..data.classification import make_classification_data
from ..errors import ConfigError
from ..metrics import top1
from ..models.classification import MLP, ConvNet
from ..registry import register
from .base import DataBundle, Task

DATASETS = ("scenes", "gaussians", "spirals", "moons", "digits", "digits_images")


class ClassificationTask(Task):
    name = "classification"
    main_metric = "top1"
    options = {
        "dataset": Option("scenes", "which classification data (--data picks it too)", choices=DATASETS),
        "train_size": Option(6000, "training examples", min=1),
        "val_size": Option(1000, "validation examples", min=1),
        "image_size": Option(32, "side of generated images in pixels (scenes)", min=8, max=512),
    }

    def make_data(self, config: dict, data: str | None, val: str | None) -> DataBundle:
        name = data or config["dataset"]
        if name not in DATASETS:
            raise ConfigError(f"--data {name}: classification data must be one of {', '.join(DATASETS)}")
        if val is not None:
            raise ConfigError("--val: classification data sets are generated with their own validation split")
        config["dataset"] = name
        sizes = {"size": config["image_size"]} if name == "scenes" else {}
        dataset = make_classification_data(name, n_train=config["train_size"], n_val=config["val_size"],
                                           seed=config["data_seed"], **sizes)
        info = {
            "kind": dataset.kind, "input_shape": list(dataset.input_shape), "num_classes": dataset.num_classes,
            "class_names": list(dataset.class_names), "normalization": {"mean": dataset.raw_mean, "std": dataset.raw_std},
            "dataset": name,
        }
        return DataBundle(dataset.train_dataset(), dataset.val_dataset(), info, extras={"data": dataset})

    def placeholder_info(self, config: dict, data: str | None) -> dict | None:
        name = data or config["dataset"]
        if name not in DATASETS:
            return None  # make_data reports it
        image = name in ("scenes", "digits_images")
        shape = [3, config["image_size"], config["image_size"]] if image else [2]
        return {"kind": "image" if image else "vector", "input_shape": shape, "num_classes": 2,
                "class_names": ["a", "b"], "dataset": name}

    def losses(self, model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
        inputs, labels = batch
        logits = model(inputs.to(device))
        return {"cls": F.cross_entropy(logits, labels.to(device))}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, bundle: DataBundle) -> dict[str, float]:
        total_loss, all_logits, all_labels = 0.0, [], []
        for inputs, labels in loader:
            logits = model(inputs.to(device)).float().cpu()
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            all_logits.append(logits)
            all_labels.append(labels)
        logits, labels = torch.cat(all_logits), torch.cat(all_labels)
        return {"top1": top1(logits, labels), "val_loss": total_loss / max(1, len(labels))}

    # ---- prediction on raw images ---------------------------------------------------------------------------------
    def _to_input(self, image: np.ndarray, info: dict) -> torch.Tensor:
        if info["kind"] != "image":
            raise ConfigError(f"this model classifies {info['dataset']} vectors, not images")
        channels, height, width = info["input_shape"]
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 255.0
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(info["normalization"]["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(info["normalization"]["std"]).view(1, -1, 1, 1)
        return ((x - mean) / std)[:, :channels]

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[np.ndarray], info: dict, device: torch.device) -> list[dict]:
        model.eval()
        batch = torch.cat([self._to_input(image, info) for image in images]).to(device)
        probabilities = model(batch).softmax(dim=1).cpu()
        predictions = []
        for row in probabilities:
            score, label = row.max(dim=0)
            predictions.append({"label": int(label), "class_name": info["class_names"][int(label)],
                                "score": float(score), "probabilities": [round(float(p), 6) for p in row]})
        return predictions

    def draw(self, image: np.ndarray, prediction: dict, info: dict) -> torch.Tensor:
        picture = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        if max(picture.shape[1:]) < 128:  # tiny inputs are unreadable: enlarge without smoothing
            scale = -(-128 // max(picture.shape[1:]))
            picture = picture.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        height, width = picture.shape[1:]
        frame = torch.tensor([[0, 0, width - 1, height - 1]], dtype=torch.float)
        label = f"{prediction['class_name']} {prediction['score']:.2f}"
        return draw_bounding_boxes(picture, frame, labels=[label], colors="yellow", width=2)

    def validation_images(self, bundle: DataBundle, count: int) -> list[np.ndarray]:
        data = bundle.extras["data"]
        if data.kind != "image":
            return []
        mean = np.asarray(data.raw_mean).reshape(-1, 1, 1)
        std = np.asarray(data.raw_std).reshape(-1, 1, 1)
        images = []
        for x in data.x_val[:count].numpy():
            pixels = np.clip((x * std + mean) * 255.0 + 0.5, 0, 255).astype(np.uint8)
            images.append(pixels.transpose(1, 2, 0))
        return images


TASK = ClassificationTask()
KNOBS = {
    "width": Option(64, "hidden units (mlp) / channels of the first stage (convnet)", min=1, max=4096),
    "depth": Option(2, "hidden layers (mlp) / conv stages (convnet)", min=0, max=12),
    "dropout": Option(0.0, "dropout probability before the classifier", min=0.0, max=0.99),
    "batchnorm": Option(True, "batch normalisation after every layer"),
}


@register("cls/mlp", TASK, "multi-layer perceptron on flattened inputs (width, depth, dropout)",
          {**KNOBS, "width": Option(256, "hidden units per layer", min=1, max=4096)})
def build_mlp(config: dict, info: dict) -> nn.Module:
    return MLP(tuple(info["input_shape"]), info["num_classes"], width=config["width"], depth=config["depth"],
               dropout=config["dropout"], batchnorm=config["batchnorm"])


@register("cls/convnet", TASK, "small CNN: conv-BN-ReLU stages with max-pooling, global pooling head",
          {**KNOBS, "width": Option(16, "channels of the first stage (doubling per stage)", min=1, max=512),
           "depth": Option(3, "conv stages", min=1, max=8),
           "convs_per_stage": Option(2, "3x3 conv blocks per stage", min=1, max=4),
           "lr": Option(3e-3, "peak learning rate", min=0),
           "batch_size": Option(32, "images per optimisation step", min=1),
           "train_size": Option(16000, "training examples", min=1)})
def build_convnet(config: dict, info: dict) -> nn.Module:
    if info["kind"] != "image":
        raise ConfigError(f"cls/convnet needs image data; {info['dataset']} is vectors (use cls/mlp)")
    return ConvNet(tuple(info["input_shape"]), info["num_classes"], width=config["width"], depth=config["depth"],
                   dropout=config["dropout"], batchnorm=config["batchnorm"],
                   convs_per_stage=config["convs_per_stage"])
