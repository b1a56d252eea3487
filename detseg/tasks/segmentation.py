"""Semantic segmentation: label every pixel with a category (0 = background).

Models, in the lecture's order: ``seg/sliding_window`` (classify the centre pixel of a crop, once per pixel),
``seg/fcn_fullres`` (convolutions at full resolution, all pixels at once) and ``seg/encoder_decoder`` (downsample,
then upsample with nearest / bed of nails / max unpooling / transposed or resize convolution). All three share this
task, so their mIoU and pixel accuracy are measured the same way.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import draw_segmentation_masks

from ..config import Option
from ..losses import pixel_cross_entropy
from ..metrics import ConfusionMatrix
from ..models.segmentation import encoder_decoder, fcn_fullres, sliding_window
from ..registry import register
from .base import DataBundle, Task, attach_run_options, knobs_of, run_options, unwrap
from .dense import label_names, materialize, normalize, open_splits, to_square_input

# A fixed colour per class (index 0, background, is never drawn).
PALETTE = ["black", "red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "purple", "pink", "brown",
           "white", "olive", "teal", "navy", "gray"]


WEIGHTINGS = ("none", "sqrt_inverse", "inverse")


def _is_sliding_window(model: nn.Module) -> bool:
    return hasattr(unwrap(model), "sample_crops")


def class_weights(pixel_share: list[float], weighting: str) -> torch.Tensor | None:
    """Loss weight per class from its share of the training pixels; ``None`` for ``weighting="none"``.

    Background covers ~80% of a scene's pixels and each shape ~3%, so the plain per-pixel loss is mostly about
    background and the shapes - what the mean IoU averages over equally - learn slowly. ``inverse`` weighs every
    class equally in total; ``sqrt_inverse`` goes half way (in log terms), which keeps background edges sharp. Weights
    are normalised so that an average training pixel weighs 1 (the loss keeps its scale); a class absent from the
    training pixels gets weight 1 (it has no pixels to weigh).
    """
    if weighting == "none":
        return None
    share = torch.tensor(pixel_share, dtype=torch.float64)
    present = share > 0
    weights = torch.ones_like(share)
    weights[present] = share[present] ** (-0.5 if weighting == "sqrt_inverse" else -1.0)
    weights[present] /= (share[present] * weights[present]).sum()
    return weights.float()


def _attach_options(model: nn.Module, config: dict, info: dict, keys: tuple[str, ...]) -> nn.Module:
    """The run options the task reads at step time, plus the class weights of this run's training data."""
    attach_run_options(model, config, keys)
    share = info.get("class_pixel_share")   # absent before the data exists (placeholder info)
    model.run_options["class_weights"] = class_weights(share, config["class_weighting"]) if share else None
    return model


def _weights(model: nn.Module, device: torch.device) -> torch.Tensor | None:
    weights = run_options(model).get("class_weights")
    return None if weights is None else weights.to(device)


class SegmentationTask(Task):
    name = "segmentation"
    main_metric = "miou"
    options = {
        "train_size": Option(2000, "training images (scenes)", min=1),
        "val_size": Option(200, "validation images (scenes)", min=1),
        "image_size": Option(128, "image side in pixels (other sizes are resized to it)", min=16, max=1024),
        "hflip": Option(True, "random horizontal flips during training"),
        "class_weighting": Option("sqrt_inverse", "loss weight per class from its share of the training pixels: "
                                  + "|".join(WEIGHTINGS) + " (rare classes heavier; see class_weights)",
                                  choices=WEIGHTINGS),
    }

    def make_data(self, config: dict, data: str | None, val: str | None) -> DataBundle:
        train_source, val_source = open_splits(config, data, val)
        size = config["image_size"]
        tensors = {}
        for split, source in (("train", train_source), ("val", val_source)):
            images, targets = materialize(source, size, desc=f"preparing {split}")
            semantic = torch.stack([target["semantic"].to(torch.uint8) for target in targets])  # (N, S, S)
            tensors[split] = torch.utils.data.TensorDataset(images, semantic)
        names = label_names(train_source)
        labels = tensors["train"].tensors[1]
        counts = torch.bincount(labels[labels != 255].flatten().long(), minlength=len(names))[:len(names)]
        info = {"num_classes": len(names), "class_names": names, "image_size": size,
                "class_pixel_share": (counts.double() / max(1, int(counts.sum()))).tolist()}
        return DataBundle(tensors["train"], tensors["val"], info, extras={"val_images": tensors["val"].tensors[0]})

    def placeholder_info(self, config: dict, data: str | None) -> dict:
        return {"num_classes": 8, "class_names": [str(i) for i in range(8)], "image_size": config["image_size"]}

    def losses(self, model: nn.Module, batch, device: torch.device) -> dict[str, torch.Tensor]:
        images, semantic = (tensor.to(device) for tensor in batch)
        if run_options(model).get("hflip", True) and torch.rand(()) < 0.5:
            images, semantic = images.flip(-1), semantic.flip(-1)   # the whole batch: cheap and still random
        images = normalize(images)
        if _is_sliding_window(model):
            # The lecture's baseline trains on crops: each crop is labelled with its centre pixel's class.
            crops_per_image = run_options(model)["crops_per_image"]
            crops, labels = unwrap(model).sample_crops(images, semantic.long(), crops_per_image)
            return {"pixel_ce": F.cross_entropy(model(crops), labels, weight=_weights(model, device),
                                                ignore_index=255)}
        return {"pixel_ce": pixel_cross_entropy(model(images), semantic.long(), weight=_weights(model, device))}

    def _scores(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) class scores; the sliding window classifies one crop per (strided) pixel."""
        if _is_sliding_window(model):
            return unwrap(model).segment(images, stride=run_options(model).get("eval_stride", 1))
        return model(images)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, bundle: DataBundle) -> dict[str, float]:
        confusion = ConfusionMatrix(bundle.info["num_classes"])
        total_loss, count = 0.0, 0
        for images, semantic in loader:
            images, semantic = normalize(images.to(device)), semantic.to(device).long()
            scores = self._scores(model, images)
            total_loss += float(pixel_cross_entropy(scores, semantic, weight=_weights(model, device))) * len(images)
            count += len(images)
            confusion.update(scores.argmax(dim=1).cpu(), semantic.cpu())
        return {"miou": confusion.miou(), "pixel_acc": confusion.pixel_acc(), "val_loss": total_loss / max(1, count)}

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[np.ndarray], info: dict, device: torch.device) -> list[dict]:
        model.eval()
        predictions = []
        for image in images:
            scores = self._scores(model, to_square_input(image, info["image_size"]).to(device))
            height, width = image.shape[:2]
            scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
            labels = scores.argmax(dim=1)[0].cpu()                          # (H, W) class per pixel
            counts = torch.bincount(labels.flatten(), minlength=info["num_classes"])
            predictions.append({
                "pixel_share": {info["class_names"][c]: round(int(n) / labels.numel(), 5)
                                for c, n in enumerate(counts.tolist()) if n},
                "_labels": labels,                                           # not JSON: drawn, not printed
            })
        return predictions

    def draw(self, image: np.ndarray, prediction: dict, info: dict) -> torch.Tensor:
        picture = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        labels = prediction["_labels"]
        present = [c for c in range(1, info["num_classes"]) if (labels == c).any()]
        if not present:
            return picture
        masks = torch.stack([labels == c for c in present])
        colors = [PALETTE[c % len(PALETTE)] for c in present]
        return draw_segmentation_masks(picture, masks, alpha=0.55, colors=colors)

    def validation_images(self, bundle: DataBundle, count: int) -> list[np.ndarray]:
        return [image.permute(1, 2, 0).numpy() for image in bundle.extras["val_images"][:count]]


TASK = SegmentationTask()
SEG_TRAINING = {"lr": Option(1e-3, "peak learning rate", min=0), "batch_size": Option(16, "images per step", min=1),
                "epochs": Option(20, "passes over the training set", min=0)}


@register("seg/sliding_window", TASK, "the lecture's 'terrible idea': a CNN classifies the centre pixel of a crop",
          {**sliding_window.OPTIONS, **SEG_TRAINING, "batch_size": Option(8, "images per step", min=1),
           "crops_per_image": Option(64, "training crops sampled per image per step", min=1),
           "eval_stride": Option(4, "validate on every n-th pixel (1 = every pixel, the honest but slow way)",
                                 min=1)})
def build_sliding_window(config: dict, info: dict) -> nn.Module:
    model = sliding_window.SlidingWindowSegmenter.build(info["num_classes"], **knobs_of(sliding_window.OPTIONS, config))
    return _attach_options(model, config, info, ("hflip", "crops_per_image", "eval_stride"))


@register("seg/fcn_fullres", TASK, "fully convolutional at full resolution: C x H x W scores in one pass",
          {**fcn_fullres.OPTIONS, **SEG_TRAINING})
def build_fcn_fullres(config: dict, info: dict) -> nn.Module:
    model = fcn_fullres.FullResolutionFCN.build(info["num_classes"], **knobs_of(fcn_fullres.OPTIONS, config))
    return _attach_options(model, config, info, ("hflip",))


@register("seg/encoder_decoder", TASK, "downsample then upsample (nearest, bed of nails, max unpooling, "
          "transposed or resize conv), optional skips",
          {**encoder_decoder.OPTIONS, **SEG_TRAINING, "lr": Option(3e-3, "peak learning rate", min=0)})
def build_encoder_decoder(config: dict, info: dict) -> nn.Module:
    model = encoder_decoder.EncoderDecoder.build(info["num_classes"], **knobs_of(encoder_decoder.OPTIONS, config))
    return _attach_options(model, config, info, ("hflip",))
