"""Image and vector classification: the task the lecture starts from, and HyperQuest's playground.

Models: ``cls/mlp`` and ``cls/convnet``, each a :class:`~detseg.models.classification.Classifier` (standardisation
with the training data's statistics, the network, cross-entropy). Data: the scenes' single-object images (default)
or the vector / digits tasks of :mod:`detseg.data.classification`, fed to the model in their raw units.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.utils import draw_bounding_boxes

from ..config import Option
from ..data.classification import ClassificationData, make_classification_data
from ..errors import ConfigError
from ..metrics import top1
from ..models.classification import MLP, Classifier, ConvNet
from ..registry import register
from .base import DataBundle, Scorer, Task, image_tensor

DATASETS = ("scenes", "gaussians", "spirals", "moons", "digits", "digits_images")


class LabeledInputs(torch.utils.data.Dataset):
    """``(inputs (N, ...), labels (N,))`` -> ``dataset[i] = (inputs[i], {"labels": labels[i]})``."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.inputs[index], {"labels": self.labels[index]}


def classification_sets(data: ClassificationData) -> tuple[LabeledInputs, LabeledInputs]:
    """Training and validation sets of raw inputs (the model standardises them)."""
    return (LabeledInputs(data.raw_inputs("train"), data.y_train), LabeledInputs(data.raw_inputs("val"), data.y_val))


def data_info(data: ClassificationData) -> dict:
    return {"kind": data.kind, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            "class_names": list(data.class_names), "normalization": {"mean": data.raw_mean, "std": data.safe_std()},
            "dataset": data.name}


class TopOne(Scorer):
    def __init__(self):
        self.predicted, self.truth = [], []

    def update(self, outputs: list[dict], targets: list[dict]) -> None:
        self.predicted += [int(output["labels"]) for output in outputs]
        self.truth += [int(target["labels"]) for target in targets]

    def compute(self) -> dict:
        return {"top1": top1(torch.tensor(self.predicted), torch.tensor(self.truth))}


class ClassificationTask(Task):
    name = "classification"
    main_metric = "top1"
    options = {
        "dataset": Option("scenes", "which classification data (--data picks it too)", choices=DATASETS),
        "train_size": Option(6000, "training examples", min=1),
        "val_size": Option(1000, "validation examples", min=1),
        "image_size": Option(32, "side of generated images in pixels (scenes)", min=8, max=512),
    }

    def make_data(self, data: str | None, val: str | None) -> DataBundle:
        config = self.config
        name = data or config["dataset"]
        if name not in DATASETS:
            raise ConfigError(f"--data {name}: classification data must be one of {', '.join(DATASETS)}")
        if val is not None:
            raise ConfigError("--val: classification data sets are generated with their own validation split")
        config["dataset"] = name
        sizes = {"size": config["image_size"]} if name == "scenes" else {}
        dataset = make_classification_data(name, n_train=config["train_size"], n_val=config["val_size"],
                                           seed=config["data_seed"], **sizes)
        train, val = classification_sets(dataset)
        return DataBundle(train, val, data_info(dataset), extras={"data": dataset})

    def placeholder_info(self, data: str | None) -> dict | None:
        name = data or self.config["dataset"]
        if name not in DATASETS:
            return None  # make_data reports it
        image = name in ("scenes", "digits_images")
        size = self.config["image_size"]
        shape = [3, size, size] if image else [2]
        channels = 3 if image else 2
        return {"kind": "image" if image else "vector", "input_shape": shape, "num_classes": 2,
                "class_names": ["a", "b"], "dataset": name,
                "normalization": {"mean": [0.0] * channels, "std": [1.0] * channels}}

    def scorer(self, bundle: DataBundle) -> Scorer:
        return TopOne()

    def check_predictable(self, info: dict) -> None:
        if info["kind"] != "image":
            raise ConfigError(f"this model classifies {info['dataset']} vectors, not images")

    def describe(self, output: dict, info: dict) -> dict:
        label = int(output["labels"])
        return {"label": label, "class_name": info["class_names"][label], "score": float(output["scores"]),
                "probabilities": [round(float(p), 6) for p in output["probabilities"]]}

    def draw(self, image: np.ndarray, prediction: dict, info: dict) -> torch.Tensor:
        picture = image_tensor(image)
        if max(picture.shape[1:]) < 128:  # tiny inputs are unreadable: enlarge without smoothing
            scale = -(-128 // max(picture.shape[1:]))
            picture = picture.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        height, width = picture.shape[1:]
        frame = torch.tensor([[0, 0, width - 1, height - 1]], dtype=torch.float)
        label = f"{prediction['class_name']} {prediction['score']:.2f}"
        return draw_bounding_boxes(picture, frame, labels=[label], colors="yellow", width=2)

    def validation_images(self, bundle: DataBundle, count: int) -> list[np.ndarray]:
        data = bundle.extras["data"]
        if data.kind != "image" or data.name != "scenes":
            return []   # vectors have no picture; digits images are not in 0-1 pixel units
        pixels = data.raw_inputs("val")[:count].numpy()
        return [np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0) for x in pixels]


KNOBS = {
    "width": Option(64, "hidden units (mlp) / channels of the first stage (convnet)", min=1, max=4096),
    "depth": Option(2, "hidden layers (mlp) / conv stages (convnet)", min=0, max=12),
    "dropout": Option(0.0, "dropout probability before the classifier", min=0.0, max=0.99),
    "batchnorm": Option(True, "batch normalisation after every layer"),
}


def classifier(network: nn.Module, info: dict) -> Classifier:
    return Classifier(network, info["normalization"]["mean"], info["normalization"]["std"])


@register("cls/mlp", ClassificationTask, "multi-layer perceptron on flattened inputs (width, depth, dropout)",
          {**KNOBS, "width": Option(256, "hidden units per layer", min=1, max=4096)})
def build_mlp(config: dict, info: dict) -> nn.Module:
    return classifier(MLP(tuple(info["input_shape"]), info["num_classes"], width=config["width"],
                          depth=config["depth"], dropout=config["dropout"], batchnorm=config["batchnorm"]), info)


@register("cls/convnet", ClassificationTask, "small CNN: conv-BN-ReLU stages with max-pooling, global pooling head",
          {**KNOBS, "width": Option(16, "channels of the first stage (doubling per stage)", min=1, max=512),
           "depth": Option(3, "conv stages", min=1, max=8),
           "convs_per_stage": Option(2, "3x3 conv blocks per stage", min=1, max=4),
           "lr": Option(3e-3, "peak learning rate", min=0),
           "batch_size": Option(32, "images per optimisation step", min=1),
           "train_size": Option(16000, "training examples", min=1)})
def build_convnet(config: dict, info: dict) -> nn.Module:
    if info["kind"] != "image":
        raise ConfigError(f"cls/convnet needs image data; {info['dataset']} is vectors (use cls/mlp)")
    return classifier(ConvNet(tuple(info["input_shape"]), info["num_classes"], width=config["width"],
                              depth=config["depth"], dropout=config["dropout"], batchnorm=config["batchnorm"],
                              convs_per_stage=config["convs_per_stage"]), info)
