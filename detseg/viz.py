"""Pictures: training curves (matplotlib) and grids of drawn predictions (torchvision.utils)."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a screen
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.utils import (draw_bounding_boxes, draw_keypoints, draw_segmentation_masks,  # noqa: E402
                               make_grid)

from .io import atomic_write_bytes, write_text  # noqa: E402
from .data.records import LSP_SKELETON  # noqa: E402


def save_png(path: Path | str, picture: torch.Tensor | np.ndarray) -> None:
    """Write a (3, H, W) uint8 tensor or an (H, W, 3) array as PNG, atomically."""
    if isinstance(picture, torch.Tensor):
        picture = picture.permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(picture)).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def grid(pictures: Sequence[torch.Tensor], columns: int = 4, side: int = 256) -> torch.Tensor:
    """Tile drawings of different sizes: each is fitted into a ``side``×``side`` cell (aspect ratio kept)."""
    cells = []
    for picture in pictures:
        height, width = picture.shape[1:]
        scale = side / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        resized = F.interpolate(picture[None].float(), size=size, mode="nearest")[0]
        cell = torch.zeros(3, side, side)
        cell[:, : size[0], : size[1]] = resized
        cells.append(cell)
    return make_grid(torch.stack(cells), nrow=columns, padding=4, pad_value=255).round().to(torch.uint8)


def plot_curves(path: Path | str, history: list[dict], metric: str) -> None:
    """Loss (train and validation) and the main metric per epoch, side by side."""
    epochs = [row["epoch"] for row in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    val_loss = [row["val_loss"] for row in history]
    if any(not math.isnan(v) for v in val_loss):
        left.plot(epochs, val_loss, "s-", label="validation")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    left.legend()
    right.plot(epochs, [row[metric] for row in history], "s-", color="tab:green")
    right.set(xlabel="epoch", ylabel=metric, title=f"validation {metric}")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    save_figure(figure, path)


def save_figure(figure, path: Path | str) -> None:
    """Write a matplotlib figure as PNG, atomically, and close it (run curves, the benchmarks' plots)."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def save_report(path: Path | str, lines: Sequence[str]) -> str:
    """Write a benchmark's report.md (lines joined by newlines), atomically; returns the text."""
    text = "\n".join(lines)
    write_text(path, text)
    return text


def draw_annotations(image: torch.Tensor, target: dict, names: Sequence[str]) -> torch.Tensor:
    """Masks, boxes with class names and the stick figures' skeletons of one (image, target) pair."""
    picture = image
    if len(target["masks"]):
        picture = draw_segmentation_masks(picture, target["masks"].bool(), alpha=0.45)
    labels = [names[int(label)] for label in target["labels"]]
    picture = draw_bounding_boxes(picture, target["boxes"], labels=labels, colors="yellow")
    keypoints = target["keypoints"]
    if keypoints.numel() and (keypoints[..., 2] > 0).any():
        people = keypoints[(keypoints[..., 2] > 0).any(dim=1)]
        visible = people[..., 2] > 0
        picture = draw_keypoints(picture, people[..., :2], connectivity=list(LSP_SKELETON), colors="red",
                                 radius=1, width=1, visibility=visible)
    return picture
