"""Pictures: training curves, precision-recall curves and confusion matrices (matplotlib) and grids of drawn
predictions (torchvision.utils)."""
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


def plot_pr_curves(path: Path | str, recall: np.ndarray, curves: dict[str, np.ndarray], iou: float = 0.5) -> None:
    """Precision against recall per class (thin lines) and their mean over classes (bold), each labelled with its
    AP at that IoU: the mean of its curve over COCO's 101 recall thresholds
    (:func:`detseg.metrics.precision_recall_curves`)."""
    figure, axis = plt.subplots(figsize=(7, 5))
    palette = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")     # tab20's pale half only when needed
    for k, (name, precision) in enumerate(curves.items()):
        axis.plot(recall, precision, color=palette(k % palette.N), linewidth=1,
                  label=f"{name} (AP{round(iou * 100)} {precision.mean():.3f})")
    if curves:
        mean = np.mean(np.stack(list(curves.values())), axis=0)                  # (K, R) -> (R,)
        axis.plot(recall, mean, color="black", linewidth=2.5, label=f"all classes (AP{round(iou * 100)} "
                                                                     f"{mean.mean():.3f})")
    axis.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
             title=f"precision-recall at IoU {iou:g}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    save_figure(figure, path)


def plot_confusion(path: Path | str, matrix: torch.Tensor | np.ndarray, names: Sequence[str], title: str) -> None:
    """A confusion matrix (rows ground truth, columns predictions) with its count written in every cell."""
    counts = np.asarray(matrix)
    side = max(4.0, 0.45 * len(names) + 2)
    figure, axis = plt.subplots(figsize=(side + 1, side))
    image = axis.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    font = 8 if len(names) <= 20 else 5
    dark = counts.max() / 2 if counts.size else 0
    for row, column in np.ndindex(counts.shape):
        axis.text(column, row, str(int(counts[row, column])), ha="center", va="center", fontsize=font,
                  color="white" if counts[row, column] > dark else "black")
    axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=font + 1)
    axis.set_yticks(range(len(names)), names, fontsize=font + 1)
    axis.set(xlabel="predicted", ylabel="ground truth", title=title)
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
    if len(target["boxes"]):    # (torchvision warns on an empty set of boxes)
        labels = [names[int(label)] for label in target["labels"]]
        picture = draw_bounding_boxes(picture, target["boxes"], labels=labels, colors="yellow")
    keypoints = target["keypoints"]
    if keypoints.numel() and (keypoints[..., 2] > 0).any():
        people = keypoints[(keypoints[..., 2] > 0).any(dim=1)]
        visible = people[..., 2] > 0
        picture = draw_keypoints(picture, people[..., :2], connectivity=list(LSP_SKELETON), colors="red",
                                 radius=1, width=1, visibility=visible)
    return picture


CAPTION_FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"   # ships with matplotlib
CAPTION_COLORS = ((255, 214, 0), (0, 220, 255), (255, 110, 180), (120, 255, 120), (255, 150, 60), (190, 150, 255))


def draw_captioned_boxes(image: torch.Tensor, boxes: Sequence, captions: Sequence[str], min_side: int = 512,
                         font_size: int = 13) -> torch.Tensor:
    """(3, H, W) uint8 image -> the same picture (enlarged so its long side is at least ``min_side``, since scenes
    are 128 px) with each box outlined and its caption written in DejaVu Sans on a dark band at the box's top edge,
    kept inside the picture. Later entries are drawn over earlier ones."""
    from PIL import ImageDraw, ImageFont

    height, width = image.shape[1:]
    scale = max(1.0, min_side / max(height, width))
    picture = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    if scale > 1:
        picture = picture.resize((round(width * scale), round(height * scale)), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.truetype(str(CAPTION_FONT), font_size)
    for k, (box, caption) in enumerate(zip(boxes, captions)):
        color = CAPTION_COLORS[k % len(CAPTION_COLORS)]
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=2)
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        text_width, text_height = right - left + 6, bottom - top + 4
        tx = min(max(0.0, x1), max(0.0, picture.width - text_width))
        ty = y1 - text_height if y1 - text_height >= 0 else min(y1, picture.height - text_height)
        draw.rectangle((tx, ty, tx + text_width, ty + text_height), fill=(20, 20, 20))
        draw.text((tx + 3 - left, ty + 2 - top), caption, font=font, fill=color)
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
