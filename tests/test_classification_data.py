"""Classification data sets: determinism, shapes, normalisation, disjoint splits, summaries, random tasks."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from detseg.data.classification import (
    GENERATORS, ClassificationData, digits, gaussian_mixture, make_classification_data, moons, random_task,
    random_task_spec, spirals,
)
from detseg.errors import ConfigError

SMALL = {
    "gaussians": dict(n_train=120, n_val=40, classes=4, dim=5, seed=3),
    "spirals": dict(n_train=120, n_val=40, classes=3, seed=3),
    "moons": dict(n_train=120, n_val=40, seed=3),
    "digits": dict(n_train=120, n_val=40, seed=3),
    "digits_images": dict(n_train=120, n_val=40, seed=3),
    "scenes": dict(n_train=30, n_val=10, seed=3),
}
VECTOR_NAMES = ["gaussians", "spirals", "moons", "digits"]


def _has_scenes() -> bool:
    if importlib.util.find_spec("detseg.data.scenes") is None:
        return False
    from detseg.data import scenes
    return hasattr(scenes, "render_single_object_images")


def _names():
    return [pytest.param(name, marks=pytest.mark.skipif(name == "scenes" and not _has_scenes(),
                                                         reason="detseg.data.scenes not available"))
            for name in SMALL]


@pytest.mark.parametrize("name", _names())
def test_shapes_dtypes_normalisation_and_summary(name):
    data = make_classification_data(name, **SMALL[name])
    n_train, n_val = SMALL[name]["n_train"], SMALL[name]["n_val"]
    assert isinstance(data, ClassificationData) and data.name == name
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert len(data.x_train) == len(data.y_train) == n_train and len(data.x_val) == len(data.y_val) == n_val
    if data.kind == "image":
        assert data.input_shape == (3, 32, 32)
        channel_mean = data.x_train.mean(dim=(0, 2, 3))
        channel_std = data.x_train.std(dim=(0, 2, 3))
    else:
        assert data.x_train.dim() == 2 and data.input_shape == (data.x_train.shape[1],)
        varying = data.x_train.std(dim=0) > 0  # digit corners are constant zero and stay zero
        channel_mean, channel_std = data.x_train.mean(dim=0), data.x_train.std(dim=0)[varying]
    torch.testing.assert_close(channel_mean, torch.zeros_like(channel_mean), atol=1e-4, rtol=0)
    torch.testing.assert_close(channel_std, torch.ones_like(channel_std), atol=0.02, rtol=0)
    assert int(data.y_train.min()) >= 0 and int(data.y_train.max()) < data.num_classes

    summary = data.summary()
    assert summary["train_size"] == n_train and summary["val_size"] == n_val
    assert sum(summary["class_counts_train"]) == n_train and sum(summary["class_counts_val"]) == n_val
    assert summary["class_counts_train"] == torch.bincount(data.y_train, minlength=data.num_classes).tolist()
    counts = summary["class_counts_train"]
    assert summary["class_balance"] == pytest.approx(min(counts) / max(counts))
    assert summary["num_classes"] == len(summary["class_names"]) == data.num_classes
    stat = "pixel" if data.kind == "image" else "feature"
    assert len(summary[f"{stat}_mean"]) == (3 if data.kind == "image" else data.input_shape[0])
    x, y = data.train_dataset()[0]
    assert x.shape == data.input_shape and y.dim() == 0
    assert len(data.val_dataset()) == n_val


@pytest.mark.parametrize("name", _names())
def test_same_seed_same_data_other_seed_other_data(name):
    first = make_classification_data(name, **SMALL[name])
    again = make_classification_data(**first.params)  # params regenerate the set exactly
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_val, again.y_val)
    other = make_classification_data(name, **{**SMALL[name], "seed": 4})
    assert not torch.equal(first.x_train, other.x_train)


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_train_and_validation_share_no_example(name):
    data = make_classification_data(name, **SMALL[name])
    train_rows = {tuple(row) for row in data.x_train.numpy().round(5).tolist()}
    val_rows = {tuple(row) for row in data.x_val.numpy().round(5).tolist()}
    assert not train_rows & val_rows


def test_balanced_generators_have_every_class_equally():
    counts = torch.bincount(gaussian_mixture(100, 20, classes=5, dim=3, seed=0).y_train)
    assert counts.max() - counts.min() <= 1  # each split is balanced on its own
    assert spirals(90, 30, classes=3, seed=0).summary()["class_counts_val"] == [10, 10, 10]


def test_separation_controls_difficulty():
    """A nearest-class-mean classifier does better on well-separated blobs than on overlapping ones."""
    def nearest_mean_accuracy(data):
        means = torch.stack([data.x_train[data.y_train == k].mean(0) for k in range(data.num_classes)])
        predicted = torch.cdist(data.x_val, means).argmin(1)
        return (predicted == data.y_val).float().mean().item()
    easy = gaussian_mixture(600, 300, classes=3, dim=8, seed=1, separation=12.0, components_per_class=1)
    hard = gaussian_mixture(600, 300, classes=3, dim=8, seed=1, separation=0.5, components_per_class=1)
    assert nearest_mean_accuracy(easy) > 0.9 > nearest_mean_accuracy(hard) + 0.2


def test_spirals_and_moons_are_two_dimensional():
    assert spirals(30, 10, classes=5, seed=0, arms_per_class=2).input_shape == (2,)
    assert moons(30, 10, seed=0).class_names == ["upper moon", "lower moon"]


def test_digits_beyond_available_originals_are_augmented_and_subset_classes_relabelled():
    plain = digits(n_val=50, seed=0, classes=[3, 7])
    # About 360 originals of 3 and 7; 30% go to validation, the rest to training, used as is.
    assert 230 <= len(plain.y_train) <= 270 and plain.class_names == ["3", "7"]
    assert set(plain.y_train.tolist()) == {0, 1}
    big = digits(n_train=1000, n_val=50, seed=0, classes=[3, 7])
    assert len(big.y_train) == 1000
    # Every training original appears once; the rest are shifted + noisy copies, so rows are (almost) all unique.
    assert len(np.unique(big.x_train.numpy().round(4), axis=0)) > 990
    images = digits(n_train=20, n_val=10, seed=0, image=True)
    assert images.kind == "image" and images.input_shape == (3, 32, 32)
    assert torch.equal(images.x_train[:, 0], images.x_train[:, 2])  # grey replicated into RGB


def test_bad_names_and_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown classification data set"):
        make_classification_data("cifar")
    with pytest.raises(ConfigError, match="moons"):
        make_classification_data("moons", n_train=10, n_val=5, classes=3)
    with pytest.raises(ConfigError):
        make_classification_data("digits", image=True)
    with pytest.raises(ConfigError, match="classes"):
        make_classification_data("gaussians", n_train=10, n_val=5, classes=1)
    with pytest.raises(ConfigError, match="n_train"):
        make_classification_data("spirals", n_train=0, n_val=5)
    assert set(GENERATORS) == {"scenes", "gaussians", "spirals", "moons", "digits", "digits_images"}


def test_random_task_spec_stays_in_hyperquest_ranges():
    specs = [random_task_spec(seed) for seed in range(200)]
    assert specs[0] == random_task_spec(0)
    assert {spec["name"] for spec in specs} == {"scenes", "digits_images", "gaussians", "spirals"}
    for spec in specs:
        assert 5000 <= spec["n_train"] <= 10000 and 1000 <= spec["n_val"] <= 2000
        classes = 7 if spec["name"] == "scenes" else spec["classes"]
        assert 2 <= classes <= 10
    assert sum(spec.get("classes") == 10 for spec in specs) > 40  # ten classes is common where the source allows


def test_random_task_generates_what_its_spec_says():
    kinds = ("vector", "image") if _has_scenes() else ("vector",)
    for seed in range(6):
        spec = random_task_spec(seed, kinds=kinds, train_range=(60, 90), val_range=(20, 30))
        if spec["name"] == "scenes" and not _has_scenes():
            continue
        data = random_task(seed, kinds=kinds, train_range=(60, 90), val_range=(20, 30))
        assert data.name == spec["name"] and data.params == {**data.params, **spec}
        assert 60 <= len(data.y_train) <= 90 and 20 <= len(data.y_val) <= 30
        assert data.kind == ("image" if spec["name"] in ("scenes", "digits_images") else "vector")
        if data.kind == "image":
            assert data.input_shape == (3, 32, 32)
