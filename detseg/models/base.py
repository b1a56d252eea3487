"""What every model shares: the train/eval switch of the model contract and the preprocessing stage.

:class:`DetsegModel` is the contract in code (see :mod:`detseg.models`): ``model(images, targets)`` in training mode
returns named losses, ``model(images)`` in eval mode returns one prediction dict per image, and which of the two is
decided by ``self.training`` alone. :class:`ImageTransform` is the first stage of every image model, as
``GeneralizedRCNNTransform`` is torchvision's: it turns a list of images of any size into the batch the network
expects (float, resized to the model's input size, normalised with statistics kept as buffers, so they travel in the
checkpoint), and maps what the network predicts back to each image's own pixels.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Per-channel statistics (of [0, 1] pixels) every scenes-trained image model starts from: the scenes' backgrounds
# and colours span the range evenly, so mean 0.5 and std 0.25 put the inputs near zero mean and unit variance.
SCENES_MEAN, SCENES_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

Images = Sequence[torch.Tensor] | torch.Tensor   # a list of (3, H_i, W_i) images, or an (N, 3, H, W) batch


class DetsegModel(nn.Module):
    """Base class of every registered model: ``forward`` dispatches on ``self.training`` and nothing else.

    Subclasses implement :meth:`training_losses` (a dict of named scalar losses; the engine minimises their sum) and
    :meth:`inference` (one dict per image, in that image's own pixels). The engine also calls
    ``training_losses`` directly with the model in eval mode to measure a validation loss, so it must work in
    both modes (batch norm then uses its running statistics and nothing is updated).
    """

    def forward(self, images: Images, targets: list[dict] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("a model in training mode needs targets: model(images, targets) returns the losses; "
                                 "call model.eval() to predict")
            return self.training_losses(images, targets)
        return self.inference(images)

    def training_losses(self, images: Images, targets: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def inference(self, images: Images) -> list[dict]:
        raise NotImplementedError

    @contextmanager
    def without_caches(self) -> Iterator[None]:
        """Within the block, results cached across calls (a disk cache of Selective Search boxes, say) are not
        used, so a timing counts all the work of a new image. Nothing is cached by default."""
        yield


def _shape(size: int | tuple[int, int]) -> tuple[int, int]:
    """``size`` (a square's side) or ``(height, width)`` -> ``(height, width)``."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_square(image: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(3, H, W) pixels in 0-255 (any dtype) -> (3, size, size) float, bilinear with antialiasing, rounded to whole
    values: what a stored uint8 copy holds. The data sets' resize and the models' are this one function. ``size``
    may also be ``(height, width)``."""
    scaled = F.interpolate(image[None].float(), size=_shape(size), mode="bilinear", antialias=True,
                           align_corners=False)
    return scaled[0].round().clamp(0, 255)


MAX_ASPECT = 16   # the longest side an aspect-preserving resize gives without max_size, in multiples of min_size


def aspect_shape(height: int, width: int, min_size: int, max_size: int = 0) -> tuple[int, int]:
    """The ``(height, width)`` an image is resized to under torchvision's convention: the short side becomes
    ``min_size`` unless the long side would then pass ``max_size``, in which case the long side becomes
    ``max_size``; the aspect ratio is kept. Idempotent: an image already at its shape keeps it.
    ``max_size=0`` limits the long side to ``16 * min_size``: a 20,000 x 1 px strip at ``min_size=800`` would
    otherwise become a 16-million-pixel-long input and exhaust memory."""
    max_size = max_size or MAX_ASPECT * min_size
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def torchvision_scale(height: int, width: int, min_size: int, max_size: int = 0) -> float:
    """torchvision's resize factor: ``min(min_size / short side, max_size / long side)``, in double precision as
    its ``GeneralizedRCNNTransform`` computes it (torchvision always sets ``max_size``; 0 here = 16 x min_size, as
    in :func:`aspect_shape`)."""
    max_size = max_size or MAX_ASPECT * min_size
    return min(min_size / min(height, width), max_size / max(height, width))


def torchvision_shape(height: int, width: int, min_size: int, max_size: int = 0) -> tuple[int, int]:
    """The size ``F.interpolate(scale_factor=torchvision_scale(...), recompute_scale_factor=True)`` gives: floors,
    where :func:`aspect_shape` rounds."""
    scale = torchvision_scale(height, width, min_size, max_size)
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def input_shape(height: int, width: int, size: int | tuple[int, int], min_size: int = 0,
                max_size: int = 0) -> tuple[int, int]:
    """The (height, width) a model takes an image of this size at: ``size`` (a square's side or ``(height,
    width)``), or with ``min_size > 0`` the aspect-preserving :func:`aspect_shape`. The data sets' stored copies
    and :class:`ImageTransform` both follow this rule, so a stored copy reaches the network unresized."""
    if min_size > 0:
        return aspect_shape(height, width, min_size, max_size)
    return _shape(size)


def scale_target(target: dict, scale_x: float, scale_y: float, size: int | tuple[int, int]) -> dict:
    """A target of an image resized to ``size`` x ``size`` (or ``(height, width)``; x times ``scale_x``, y times
    ``scale_y``): boxes, proposals and joints scaled, the semantic map and instance masks resized by nearest
    neighbour; other entries kept."""
    scaled = dict(target)
    for key in ("boxes", "proposals"):
        if key in target:
            scaled[key] = target[key] * target[key].new_tensor([scale_x, scale_y, scale_x, scale_y])
    if "keypoints" in target:
        keypoints = target["keypoints"].clone()
        keypoints[..., 0] *= scale_x
        keypoints[..., 1] *= scale_y
        scaled["keypoints"] = keypoints
    if "semantic" in target:
        scaled["semantic"] = F.interpolate(target["semantic"][None, None].float(), size=_shape(size),
                                           mode="nearest")[0, 0].to(target["semantic"].dtype)
    if "masks" in target:       # (G, H, W) instance masks, nearest neighbour like the semantic map
        masks = target["masks"]
        scaled["masks"] = F.interpolate(masks[None].float(), size=_shape(size), mode="nearest")[0].to(masks.dtype) \
            if masks.numel() else masks.new_zeros((len(masks), *_shape(size)))
    return scaled


def as_float_image(image: torch.Tensor) -> torch.Tensor:
    """A (3, H, W) or (N, 3, H, W) image as float in [0, 1]: uint8 is divided by 255, float is taken as is."""
    return image.float().div(255.0) if image.dtype == torch.uint8 else image.float()


@dataclass
class Batch:
    """What :meth:`ImageTransform.batch` returns: the network's input and what is needed to map predictions back."""

    normalized: torch.Tensor              # (N, 3, H, W) float, zero-centred with the model's statistics
    pixels: torch.Tensor                  # (N, 3, H, W) float in [0, 1], before normalisation
    original_sizes: list[tuple[int, int]]  # (H_i, W_i) of every image as given
    image_sizes: list[tuple[int, int]]     # (h_i, w_i) of every image once resized, before padding to (H, W)

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the padded batch: every image's pixels lie in its top-left ``image_sizes[i]``."""
        return tuple(self.normalized.shape[-2:])

    def resized(self, index: int) -> bool:
        return self.original_sizes[index] != self.image_sizes[index]


class ImageTransform(nn.Module):
    """Images of any size -> one normalised batch, and predictions back to the images' pixels.

    Two resize policies. *Square* (the default; the lecture's setup and the scenes'): every image becomes
    ``size x size`` (or ``size = (height, width)``), whatever its aspect ratio. *Aspect-preserving*
    (``min_size > 0``, torchvision's convention for detectors on photos): each image is scaled so its short side is
    ``min_size`` and its long side at most ``max_size`` (:func:`aspect_shape`), then the batch is padded at the
    bottom and right to the largest image, rounded up to a multiple of ``size_divisible`` so every stride of the
    network divides it; padding has the mean colour, i.e. zero after normalisation.

    Resizing is bilinear with antialiasing, in 0-255 units rounded to whole values, exactly what the data sets do
    when they store a resized copy: an image given at its original size and its stored copy give the same input.
    ``mean`` / ``std`` are per-channel statistics of [0, 1] pixels, registered as buffers (saved with the weights).

    ``resize="torchvision"`` (aspect-preserving only) does what torchvision's ``GeneralizedRCNNTransform`` does
    instead, to the last bit: normalise first, then plain bilinear interpolation at :func:`torchvision_scale`, sizes
    floored, zero padding - so a converted torchvision checkpoint sees the very input its own model would.
    """

    def __init__(self, size: int | tuple[int, int], mean: Sequence[float] = SCENES_MEAN,
                 std: Sequence[float] = SCENES_STD, min_size: int = 0, max_size: int = 0,
                 size_divisible: int = 32, resize: str = "detseg"):
        super().__init__()
        if resize not in ("detseg", "torchvision"):
            raise ValueError(f"resize={resize!r}: detseg or torchvision")
        self.resize = resize if min_size > 0 else "detseg"
        self.size = size if isinstance(size, int) else _shape(size)
        self.shape = _shape(size)
        self.min_size, self.max_size, self.size_divisible = int(min_size), int(max_size), int(size_divisible)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))

    @property
    def keeps_aspect(self) -> bool:
        return self.min_size > 0

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to before batching."""
        if self.resize == "torchvision" and self.min_size > 0:
            return torchvision_shape(height, width, self.min_size, self.max_size)
        return input_shape(height, width, self.shape, self.min_size, self.max_size)

    @contextmanager
    def resized_to(self, size: int | tuple[int, int]) -> Iterator[None]:
        """Within the block, every image is resized to ``size`` (a side or ``(height, width)``), aspect-preserving
        mode off: a benchmark timing a model trained at 128 px on photo-sized images, say. Convolutional stages
        adapt to any size; a model whose layers fix the input size (a fully-connected head on the whole map) does
        not."""
        saved = self.size, self.shape, self.min_size
        self.size, self.shape = (size if isinstance(size, int) else _shape(size)), _shape(size)
        self.min_size = 0
        try:
            yield
        finally:
            self.size, self.shape, self.min_size = saved

    def _resize(self, image: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """(3, H, W) [0, 1] -> (3, h, w) [0, 1], rounded to 1/255 steps like a stored uint8 copy."""
        return resize_square(image * 255.0, shape) / 255.0

    def batch(self, images: Images) -> Batch:
        if self.resize == "torchvision" and self.min_size > 0:
            return self._torchvision_batch(images)
        if torch.is_tensor(images) and images.dim() == 4:
            sizes = [tuple(images.shape[-2:])] * len(images)
            shapes = [self.resized_shape(*size) for size in sizes]
            if not sizes or shapes[0] == sizes[0]:
                pixels = as_float_image(images)                            # (N, 3, H, W), the fast path
            else:
                pixels = torch.stack([self._resize(image, shapes[0]) for image in as_float_image(images)])
        else:
            if len(images) == 0:
                raise ValueError("no images given")
            for image in images:
                if image.dim() != 3 or image.shape[0] != 3:
                    raise ValueError(f"expected (3, H, W) images, got shape {tuple(image.shape)}")
            sizes = [tuple(image.shape[-2:]) for image in images]
            shapes = [self.resized_shape(*size) for size in sizes]
            pixels = [self._resize(as_float_image(image), shape) if shape != size else as_float_image(image)
                      for image, size, shape in zip(images, sizes, shapes)]
            pixels = pixels if self.keeps_aspect else torch.stack(pixels)   # square: every image is self.shape
        if self.keeps_aspect:
            pixels = self._padded(pixels)
        normalized = (pixels - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
        return Batch(normalized, pixels, sizes, shapes)

    def _torchvision_batch(self, images: Images) -> Batch:
        """Normalise, resize (plain bilinear at torchvision's scale), pad with zeros: torchvision's order."""
        mean, std = self.mean.view(3, 1, 1), self.std.view(3, 1, 1)
        sizes, normalized = [], []
        for image in images:
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"expected (3, H, W) images, got shape {tuple(image.shape)}")
            height, width = image.shape[-2:]
            sizes.append((int(height), int(width)))
            scaled = (as_float_image(image) - mean) / std
            scale = torchvision_scale(height, width, self.min_size, self.max_size)
            normalized.append(F.interpolate(scaled[None], scale_factor=scale, mode="bilinear",
                                            recompute_scale_factor=True, align_corners=False)[0])
        if not normalized:
            raise ValueError("no images given")
        shapes = [tuple(image.shape[-2:]) for image in normalized]
        step = max(1, self.size_divisible)
        height = -(-max(shape[0] for shape in shapes) // step) * step
        width = -(-max(shape[1] for shape in shapes) // step) * step
        batch = normalized[0].new_zeros((len(normalized), 3, height, width))
        for row, image in enumerate(normalized):
            batch[row, :, :image.shape[-2], :image.shape[-1]] = image
        return Batch(batch, batch * self.std.view(1, 3, 1, 1) + self.mean.view(1, 3, 1, 1), sizes, shapes)

    def _padded(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """(3, h_i, w_i) images -> (N, 3, H, W), H and W the largest sides rounded up to ``size_divisible``; the
        padding is the mean colour (zero once normalised)."""
        step = max(1, self.size_divisible)
        height = -(-max(image.shape[-2] for image in images) // step) * step
        width = -(-max(image.shape[-1] for image in images) // step) * step
        if torch.is_tensor(images) and tuple(images.shape[-2:]) == (height, width):
            return images
        batch = self.mean.view(1, 3, 1, 1).expand(len(images), 3, height, width).clone()
        for row, image in enumerate(images):
            batch[row, :, :image.shape[-2], :image.shape[-1]] = image
        return batch

    # ---- targets into the input's pixels, predictions out of them ---------------------------------------------
    def scale_of(self, original_size: tuple[int, int],
                 image_size: tuple[int, int] | None = None) -> tuple[float, float]:
        """(sx, sy) that take the pixels of an image resized to ``image_size`` (default: the square input size)
        back to the original image's pixels."""
        height, width = original_size
        resized_height, resized_width = image_size or self.shape
        return width / resized_width, height / resized_height

    def targets_to_input(self, targets: list[dict], batch: Batch) -> list[dict]:
        """Boxes, proposals and joints scaled, semantic maps resized (nearest), for images that were resized."""
        moved = []
        for index, target in enumerate(targets):
            if batch.resized(index):
                (height, width), shape = batch.original_sizes[index], batch.image_sizes[index]
                target = scale_target(target, shape[1] / width, shape[0] / height, shape)
            moved.append(target)
        return moved

    def boxes_to_original(self, boxes: torch.Tensor, original_size: tuple[int, int],
                          image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(D, 4) xyxy in the pixels of the resized image (``image_size``, default the square input) -> the
        original image's pixels."""
        sx, sy = self.scale_of(original_size, image_size)
        return boxes * boxes.new_tensor([sx, sy, sx, sy])

    def keypoints_to_original(self, keypoints: torch.Tensor, original_size: tuple[int, int],
                              image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """(..., J, 2 or 3) joints in input pixels -> the original image's pixels (a third column is kept)."""
        sx, sy = self.scale_of(original_size, image_size)
        scaled = keypoints.clone()
        scaled[..., 0] *= sx
        scaled[..., 1] *= sy
        return scaled

    def map_to_original(self, scores: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """(C, S, S) score maps -> (C, H, W), bilinear (FCN's last upsampling, to the image's own pixels)."""
        if tuple(scores.shape[-2:]) == tuple(original_size):
            return scores
        return F.interpolate(scores[None], size=original_size, mode="bilinear", align_corners=False)[0]


def stack_targets(targets: list[dict], key: str) -> torch.Tensor:
    """``torch.stack`` of one key over a batch of per-image target dicts."""
    return torch.stack([target[key] for target in targets])
