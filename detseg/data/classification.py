"""Classification data sets: small images and feature vectors, each generated deterministically from a seed.

The ``cls/*`` models train on these, and HyperQuest draws its random tasks from them (:func:`random_task`). Every
set comes as a :class:`ClassificationData`: float32 inputs already normalised with *training* statistics (the
validation split never leaks into them), int64 labels 0..K-1, and a :meth:`~ClassificationData.summary` of what a
player or a report needs to know about it.

Sources:
- ``gaussians``: a mixture of anisotropic Gaussian blobs, several per class, in any dimension;
- ``spirals``: the CS231n toy problem, interleaved 2-D spiral arms that no linear classifier separates;
- ``moons``: scikit-learn's two interleaved half circles;
- ``digits`` / ``digits_images``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), as
  64-d vectors or upscaled to 3x32x32 images;
- ``scenes``: single-object images rendered by :mod:`detseg.data.scenes` (six shapes and a person).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, make_moons
from torch.utils.data import TensorDataset

from detseg.errors import ConfigError

IMAGE_SIZE = 32  # HyperQuest's images are 3 x 32 x 32, CIFAR-sized


@dataclass
class ClassificationData:
    """A classification task split into train and validation tensors.

    ``x_*`` are float32: images (N, 3, H, W) normalised per channel, or vectors (N, D) standardised per feature,
    both with the training split's statistics, which are kept in ``raw_mean``/``raw_std`` (per channel or per
    feature, in the units of the raw data). ``y_*`` are int64 class ids indexing ``class_names``. ``params`` holds
    the :func:`make_classification_data` arguments that regenerate the set (empty when a generator was called
    directly).
    """

    name: str
    kind: str                    # "image" | "vector"
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    class_names: list[str]
    raw_mean: list[float] | None = None
    raw_std: list[float] | None = None
    params: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example: (3, H, W) or (D,)."""
        return tuple(self.x_train.shape[1:])

    def train_dataset(self) -> TensorDataset:
        return TensorDataset(self.x_train, self.y_train)

    def safe_std(self) -> list[float]:
        """``raw_std`` with constant features' 0 replaced by 1 (they were left unscaled when normalising)."""
        return [1.0 if v < 1e-6 else v for v in self.raw_std]

    def raw_inputs(self, split: str) -> torch.Tensor:
        """The ``train`` / ``val`` inputs in the raw data's units (undoing the normalisation): what a model that
        standardises its inputs itself (:class:`detseg.models.classification.Classifier`) is fed."""
        x = self.x_train if split == "train" else self.x_val
        shape = (1, -1, 1, 1) if self.kind == "image" else (1, -1)
        mean = torch.tensor(self.raw_mean, dtype=torch.float32).view(shape)
        std = torch.tensor(self.safe_std(), dtype=torch.float32).view(shape)
        return x * std + mean

    def val_dataset(self) -> TensorDataset:
        return TensorDataset(self.x_val, self.y_val)

    def summary(self) -> dict:
        """What the data set is, as plain JSON-ready values.

        ``class_balance`` is the smallest over the largest training class count (1.0 = balanced). Means and stds
        are those of the raw training data (per feature for vectors, per channel for images) — the statistics the
        inputs were normalised with.
        """
        counts_train = torch.bincount(self.y_train, minlength=self.num_classes).tolist()
        counts_val = torch.bincount(self.y_val, minlength=self.num_classes).tolist()
        prefix = "pixel" if self.kind == "image" else "feature"
        return {
            "name": self.name,
            "kind": self.kind,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "train_size": len(self.y_train),
            "val_size": len(self.y_val),
            "class_counts_train": counts_train,
            "class_counts_val": counts_val,
            "class_balance": min(counts_train) / max(counts_train) if max(counts_train) else 0.0,
            f"{prefix}_mean": self.raw_mean,
            f"{prefix}_std": self.raw_std,
        }


# ---------------------------------------------------------------------------------------------------------------
# Shared steps: balanced labels, normalisation with training statistics, packaging
# ---------------------------------------------------------------------------------------------------------------


def _balanced_labels(n_train: int, n_val: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Train labels then validation labels, (n_train + n_val,) int64, each split shuffled and balanced: its
    class counts differ by at most one."""
    return np.concatenate([rng.permutation(np.arange(n) % classes) for n in (n_train, n_val)]).astype(np.int64)


def _package(name: str, kind: str, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
             y_val: np.ndarray, class_names: list[str]) -> ClassificationData:
    """Normalise both splits with the training split's statistics and wrap them as float32 / int64 tensors."""
    # Images share statistics across pixels of a channel (N, C, H, W) -> (C,); vectors keep one per feature.
    axes = (0, 2, 3) if kind == "image" else (0,)
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True)
    safe_std = np.where(std < 1e-6, 1.0, std)  # constant features (digit corners are always 0) stay at 0
    return ClassificationData(
        name=name, kind=kind,
        x_train=torch.from_numpy(((x_train - mean) / safe_std).astype(np.float32)),
        y_train=torch.from_numpy(np.asarray(y_train, dtype=np.int64)),
        x_val=torch.from_numpy(((x_val - mean) / safe_std).astype(np.float32)),
        y_val=torch.from_numpy(np.asarray(y_val, dtype=np.int64)),
        class_names=list(class_names),
        raw_mean=[float(v) for v in mean.reshape(-1)], raw_std=[float(v) for v in std.reshape(-1)],
    )


def _split(x: np.ndarray, y: np.ndarray, n_train: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut one generated draw into disjoint train and validation parts."""
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_sizes(n_train: int, n_val: int, classes: int | None = None) -> None:
    _require(int(n_train) >= 1 and int(n_val) >= 1, f"classification data: n_train and n_val must be >= 1 "
             f"(got {n_train}, {n_val})")
    if classes is not None:
        _require(int(classes) >= 2, f"classification data: classes must be >= 2 (got {classes})")


# ---------------------------------------------------------------------------------------------------------------
# Vector data sets
# ---------------------------------------------------------------------------------------------------------------


def gaussian_mixture(n_train: int, n_val: int, classes: int = 5, dim: int = 16, seed: int = 0,
                     separation: float = 4.0, components_per_class: int = 2) -> ClassificationData:
    """Each class is a mixture of ``components_per_class`` Gaussian blobs with random orientation and scales.

    Several blobs per class make the boundary non-linear. ``separation`` is the typical distance between two blob
    centres in units of a blob's standard deviation (centres ~ N(0, separation^2 / (2 dim) I), so the expected
    squared distance between two is separation^2 in any dimension): around 2 the classes overlap badly, around 6
    they barely touch.
    """
    _check_sizes(n_train, n_val, classes)
    _require(dim >= 1 and components_per_class >= 1, "gaussians: dim and components_per_class must be >= 1")
    rng = np.random.default_rng(seed)
    num_blobs = classes * components_per_class
    centres = rng.normal(scale=separation / np.sqrt(2 * dim), size=(num_blobs, dim))
    # A random rotation and per-axis scales in [0.5, 1.5] give every blob its own elongated shape.
    rotations = np.linalg.qr(rng.normal(size=(num_blobs, dim, dim)))[0]            # (B, D, D)
    scales = rng.uniform(0.5, 1.5, size=(num_blobs, dim))                            # (B, D)
    labels = _balanced_labels(n_train, n_val, classes, rng)
    blob = labels * components_per_class + rng.integers(components_per_class, size=len(labels))
    noise = rng.normal(size=(len(labels), dim)) * scales[blob]                       # (N, D)
    points = np.empty_like(noise)
    for b in range(num_blobs):  # per blob, not one (N, D, D) gather: that would take gigabytes at 64-d
        members = blob == b
        points[members] = centres[b] + noise[members] @ rotations[b]
    return _package("gaussians", "vector", *_split(points, labels, n_train),
                    [f"class {k}" for k in range(classes)])


def spirals(n_train: int, n_val: int, classes: int = 3, seed: int = 0, noise: float = 0.2,
            arms_per_class: int = 1, turns: float = 0.75) -> ClassificationData:
    """Interleaved 2-D spiral arms, ``arms_per_class`` per class (CS231n's "spiral" data set).

    A point at radius r in [0, 1] on arm a sits at angle 2 pi (a / arms + turns * r) plus N(0, noise^2) radians
    of jitter; arms of the same class are spread evenly between the others.
    """
    _check_sizes(n_train, n_val, classes)
    _require(arms_per_class >= 1, "spirals: arms_per_class must be >= 1")
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(n_train, n_val, classes, rng)
    num_arms = classes * arms_per_class
    arm = labels + classes * rng.integers(arms_per_class, size=len(labels))  # class k owns arms k, k+K, k+2K, ...
    radius = rng.uniform(0.0, 1.0, size=len(labels))
    angle = 2 * np.pi * (arm / num_arms + turns * radius) + noise * rng.normal(size=len(labels))
    points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)      # (N, 2)
    return _package("spirals", "vector", *_split(points, labels, n_train), [f"arm {k}" for k in range(classes)])


def moons(n_train: int, n_val: int, seed: int = 0, noise: float = 0.2) -> ClassificationData:
    """Two interleaved half circles in 2-D (scikit-learn's ``make_moons``), shuffled, then split."""
    _check_sizes(n_train, n_val)
    points, labels = make_moons(n_samples=n_train + n_val, noise=noise, shuffle=True, random_state=seed)
    return _package("moons", "vector", *_split(points, labels, n_train), ["upper moon", "lower moon"])


# ---------------------------------------------------------------------------------------------------------------
# Image data sets
# ---------------------------------------------------------------------------------------------------------------


def _shift_and_jitter(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Augment 8x8 digits: shift each by one pixel in a random direction (zero fill) and add N(0, 1) noise.

    (N, 8, 8) on the 0..16 scale -> same. One pixel is an eighth of the digit (4 px once upscaled to 32), as much
    as the 8x8 frame allows without cutting strokes off; the noise keeps two copies of one digit from being equal.
    """
    n, height, width = images.shape
    offsets = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)])
    shift = offsets[rng.integers(len(offsets), size=n)]                              # (N, 2)
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))                               # (N, 10, 10)
    # Output pixel (y, x) of image i reads padded pixel (y - dy_i + 1, x - dx_i + 1).
    rows = np.arange(height)[None, :] - shift[:, :1] + 1                             # (N, 8)
    cols = np.arange(width)[None, :] - shift[:, 1:] + 1                              # (N, 8)
    shifted = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return np.clip(shifted + rng.normal(size=shifted.shape), 0.0, 16.0)


def _digits_as_images(flat: np.ndarray) -> np.ndarray:
    """(N, 64) grey 0..16 -> (N, 3, 32, 32) in [0, 1]: bilinear upscaling, grey copied to the three channels."""
    grey = torch.from_numpy(flat.reshape(-1, 1, 8, 8) / 16.0).float()
    large = F.interpolate(grey, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return large.expand(-1, 3, -1, -1).numpy()


def _draw_digits(pixels: np.ndarray, labels: np.ndarray, pool: np.ndarray, n: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n examples from the originals in ``pool``: a subset if the pool is big enough, else every original once
    plus augmented resamples (:func:`_shift_and_jitter`), shuffled together. (N, 64) and (N,)."""
    if n <= len(pool):
        return pixels[pool[:n]], labels[pool[:n]]
    extra = rng.choice(pool, size=n - len(pool), replace=True)
    augmented = _shift_and_jitter(pixels[extra].reshape(-1, 8, 8), rng).reshape(-1, 64)
    mixed = rng.permutation(n)
    return np.concatenate([pixels[pool], augmented])[mixed], np.concatenate([labels[pool], labels[extra]])[mixed]


def digits(n_train: int | None = None, n_val: int | None = None, seed: int = 0, image: bool = False,
           classes: int | list[int] | None = None, val_fraction: float = 0.3) -> ClassificationData:
    """scikit-learn's handwritten digits, as 64-d vectors or (``image=True``) as 3x32x32 images.

    ``classes``: None for all ten, k for digits 0..k-1, or a list of digits (relabelled 0..K-1 in that order).
    The 1,797 originals (about 180 per digit) are first divided, ``val_fraction`` to validation and the rest to
    training, so no original image — and no augmented copy of one — is in both splits. ``n_train``/``n_val`` None
    take each part as it is; a smaller number takes a random subset; a larger one uses every original of the part
    once and fills up with augmented resamples of them (one-pixel shift + noise), so a large set holds more
    variations of the same handwriting, not new handwriting.
    """
    wanted = list(range(10)) if classes is None else (list(range(classes)) if isinstance(classes, int)
                                                     else [int(d) for d in classes])
    _require(2 <= len(wanted) <= 10 and set(wanted) <= set(range(10)) and len(set(wanted)) == len(wanted),
             f"digits: classes must be 2..10 distinct digits 0-9 (got {classes!r})")
    _require(0.0 < val_fraction < 1.0, f"digits: val_fraction must be in (0, 1) (got {val_fraction})")
    pixels, digit_labels = load_digits(return_X_y=True)                              # (1797, 64), (1797,)
    keep = np.isin(digit_labels, wanted)
    relabel = np.full(10, -1)
    relabel[wanted] = np.arange(len(wanted))                                         # digit -> position in wanted
    pixels, labels = pixels[keep], relabel[digit_labels[keep]]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_val_pool = int(round(val_fraction * len(order)))
    val_pool, train_pool = order[:n_val_pool], order[n_val_pool:]
    n_train = len(train_pool) if n_train is None else int(n_train)
    n_val = len(val_pool) if n_val is None else int(n_val)
    _check_sizes(n_train, n_val)
    x_train, y_train = _draw_digits(pixels, labels, train_pool, n_train, rng)
    x_val, y_val = _draw_digits(pixels, labels, val_pool, n_val, rng)
    names = [str(d) for d in wanted]
    if image:
        return _package("digits_images", "image", _digits_as_images(x_train), y_train, _digits_as_images(x_val),
                        y_val, names)
    return _package("digits", "vector", x_train, y_train, x_val, y_val, names)


def scenes_images(n_train: int, n_val: int, size: int = IMAGE_SIZE, seed: int = 0) -> ClassificationData:
    """Single-object scenes (one shape or person per image, on a textured background) to classify by category.

    Train and validation are rendered as separate splits of the scenes generator, so they share no image.
    """
    _check_sizes(n_train, n_val)
    from detseg.data.scenes import render_single_object_images  # imported late: scenes is a heavier module

    def render(n: int, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        images, labels, names = render_single_object_images(n, size, seed, split)  # (N, H, W, 3) uint8, (N,)
        if len(labels) and not 0 <= int(np.min(labels)) <= int(np.max(labels)) < len(names):
            raise ValueError(f"scenes: single-object labels must index the {len(names)} class names")
        pixels = np.asarray(images).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)  # (N, 3, H, W)
        return pixels, np.asarray(labels), list(names)

    x_train, y_train, class_names = render(n_train, "train")
    x_val, y_val, _ = render(n_val, "val")
    return _package("scenes", "image", x_train, y_train, x_val, y_val, class_names)


# ---------------------------------------------------------------------------------------------------------------
# By name, and at random for HyperQuest
# ---------------------------------------------------------------------------------------------------------------

GENERATORS = {
    "scenes": scenes_images,
    "gaussians": gaussian_mixture,
    "spirals": spirals,
    "moons": moons,
    "digits": partial(digits, image=False),
    "digits_images": partial(digits, image=True),
}


def make_classification_data(name: str, **kwargs) -> ClassificationData:
    """Generate the data set ``name`` (a key of :data:`GENERATORS`) with the generator's keyword arguments.

    The returned set's ``params`` repeat ``name`` and every argument, defaults included, so that
    ``make_classification_data(**data.params)`` regenerates it exactly.
    """
    if name not in GENERATORS:
        raise ConfigError(f"unknown classification data set {name!r}; choose one of {sorted(GENERATORS)}")
    generator = GENERATORS[name]
    signature = inspect.signature(generator)
    # "digits" and "digits_images" fix `image` themselves; it is not the caller's to pass.
    signature = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "image"])
    try:
        bound = signature.bind(**kwargs)
    except TypeError as error:
        raise ConfigError(f"classification data set {name!r}: {error}; it takes {list(signature.parameters)}") \
            from None
    bound.apply_defaults()
    data = generator(**bound.arguments)
    data.params = {"name": name, **bound.arguments}
    return data


def random_task_spec(seed: int, *, kinds: tuple[str, ...] = ("image", "vector"),
                     train_range: tuple[int, int] = (5000, 10000),
                     val_range: tuple[int, int] = (1000, 2000)) -> dict:
    """Draw the arguments of a random HyperQuest task (without generating it): a dict for
    :func:`make_classification_data`.

    Images are 3x32x32 scenes (7 classes) or upscaled digits (all 10 half the time, else 2-9); vectors are Gaussian
    mixtures (2-64 dimensions, 10 classes 40% of the time, else 2-9) or spirals (2-10 arms, jitter scaled to the
    gap between arms). Sizes are uniform in ``train_range`` / ``val_range`` (inclusive).
    """
    rng = np.random.default_rng(seed)
    kind = str(rng.choice(list(kinds)))
    sizes = {"n_train": int(rng.integers(train_range[0], train_range[1] + 1)),
             "n_val": int(rng.integers(val_range[0], val_range[1] + 1)),
             "seed": int(rng.integers(2 ** 31))}
    if kind == "image":
        if rng.random() < 0.5:
            return {"name": "scenes", **sizes, "size": IMAGE_SIZE}
        classes = 10 if rng.random() < 0.5 else int(rng.integers(2, 10))
        return {"name": "digits_images", **sizes, "classes": classes}
    if rng.random() < 0.6:
        classes = 10 if rng.random() < 0.4 else int(rng.integers(2, 10))
        return {"name": "gaussians", **sizes, "classes": classes, "dim": int(rng.choice([2, 4, 8, 16, 32, 64])),
                "separation": round(float(rng.uniform(3.0, 7.0)), 2),
                "components_per_class": int(rng.integers(1, 4))}
    classes = int(rng.integers(2, 11))
    gap = 2 * np.pi / classes  # angle between neighbouring arms
    return {"name": "spirals", **sizes, "classes": classes,
            "noise": round(float(rng.uniform(0.05, 0.2) * gap), 3), "turns": round(float(rng.uniform(0.5, 1.0)), 2)}


def random_task(seed: int, **spec_overrides) -> ClassificationData:
    """A random HyperQuest data set, reproducible from ``seed`` (see :func:`random_task_spec` for the ranges;
    ``spec_overrides`` are passed to it, e.g. smaller size ranges)."""
    return make_classification_data(**random_task_spec(seed, **spec_overrides))
