"""Segmentation, localization and pose through the engine: data, losses, metrics, files, predictions."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from detseg import api, registry
from detseg.config import resolve
from detseg.engine.trainer import Trainer

TINY = {"train_size": 24, "val_size": 8, "image_size": 48, "batch_size": 8}


def _trainer(name, **overrides):
    entry = registry.get(name)
    config = resolve(entry.all_options(), {**TINY, **overrides})
    api.seed_everything(0)
    task = entry.make_task(config)
    bundle = task.make_data(None, None)
    return Trainer(entry.build(config, bundle.info), task, bundle, config, progress=False)


@pytest.mark.parametrize("name, overrides", [
    # Plain per-pixel loss for segmentation: class weighting (the default) shifts the loss towards the hard
    # classes, so its fall on a tiny set says less about whether the network learns.
    ("seg/fcn_fullres", {"width": 8, "depth": 3, "class_weighting": "none"}),
    ("seg/encoder_decoder", {"up": "max_unpool", "depth": 2, "class_weighting": "none"}),
    ("seg/encoder_decoder", {"up": "transposed", "kernel": 3, "down": "strided", "depth": 2,
                             "class_weighting": "none"}),
    ("seg/sliding_window", {"crop": 9, "depth": 2}),
    ("loc/classify_localize", {"width": 8, "depth": 3}),
    ("pose/regress", {"width": 8, "depth": 3}),
])
def test_each_model_fits_a_small_set(name, overrides):
    """Repeated epochs on 24 images: the training loss must fall well below its start (the model learns)."""
    trainer = _trainer(name, **overrides, lr=3e-3, schedule="constant", hflip=False)
    first = trainer.run_epoch()["loss"]
    for _ in range(14):
        last = trainer.run_epoch()["loss"]
    assert last < 0.6 * first, (first, last)
    metrics = trainer.evaluate()
    assert trainer.task.main_metric in metrics and 0.0 <= metrics[trainer.task.main_metric] <= 1.0


def test_freeze_epochs_keeps_the_backbone_fixed_then_releases_it():
    trainer = _trainer("loc/classify_localize", width=8, depth=2, freeze_epochs=1)
    backbone = {k: v.clone() for k, v in trainer.model.features.backbone.state_dict().items() if v.is_floating_point()}
    head = trainer.model.box_head.weight.clone()
    trainer.run_epoch()
    after_frozen = trainer.model.features.backbone.state_dict()
    assert all(torch.equal(backbone[k], after_frozen[k]) for k in backbone if "running" not in k)
    assert not torch.equal(head, trainer.model.box_head.weight)
    trainer.run_epoch()
    after_joint = trainer.model.features.backbone.state_dict()
    assert any(not torch.equal(backbone[k], after_joint[k]) for k in backbone if "running" not in k)


def test_pose_flip_swaps_left_and_right():
    from detseg.data.records import LSP_FLIP
    from detseg.data.transforms import Augmentation

    keypoints = torch.zeros(1, 14, 3)
    keypoints[0, 0] = torch.tensor([10.0, 20.0, 2])   # r_ankle
    keypoints[0, 5] = torch.tensor([30.0, 20.0, 2])   # l_ankle
    boxes = torch.tensor([[5.0, 5.0, 40.0, 45.0]])
    image = torch.zeros(3, 48, 48, dtype=torch.uint8)
    image[:, :, :10] = 255
    augment = Augmentation(hflip=True, flip_index=LSP_FLIP)
    outcomes = [augment(image, {"keypoints": keypoints, "boxes": boxes}, seed) for seed in range(12)]
    flipped = [(picture, target) for picture, target in outcomes if picture[0, 0, -1] == 255]
    kept = [(picture, target) for picture, target in outcomes if picture[0, 0, 0] == 255]
    assert flipped and kept and len(flipped) + len(kept) == 12      # a coin per sample, drawn from the seed
    for picture, target in flipped:
        assert target["keypoints"][0, 0].tolist() == [17.0, 20.0, 2.0]   # the new right ankle: the old left one
        assert target["keypoints"][0, 5].tolist() == [37.0, 20.0, 2.0]
        assert target["boxes"][0].tolist() == [8.0, 5.0, 43.0, 45.0]
    for picture, target in kept:
        assert torch.equal(target["keypoints"], keypoints) and torch.equal(target["boxes"], boxes)
    again = augment(image, {"keypoints": keypoints, "boxes": boxes}, 3)
    assert torch.equal(again[0], outcomes[3][0]) and torch.equal(again[1]["keypoints"], outcomes[3][1]["keypoints"])


@pytest.mark.parametrize("name, key", [("seg/encoder_decoder", "pixel_share"), ("loc/classify_localize", "box_xyxy"),
                                       ("pose/regress", "keypoints_xy")])
def test_train_then_predict_draws_on_any_image(tmp_path, cli, name, key):
    run = tmp_path / "run"
    overrides = [f"{k}={v}" for k, v in TINY.items()] + ["depth=2"]
    result = cli("train", name, "--epochs", "1", "--out", run, "--quiet", *overrides)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert len(rows) == 1 and registry.get(name).task.main_metric in rows[0]
    assert (run / "val_predictions.png").is_file()
    assert metrics["params"] > 0
    image = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90), dtype=np.uint8)).save(image)
    result = cli("predict", run / "best.pt", image, "--out", tmp_path / "pred")
    assert result.returncode == 0, result.stderr
    assert key in json.loads(result.stdout.splitlines()[0])
    with Image.open(tmp_path / "pred" / "odd_pred.png") as drawn:
        assert drawn.size == (90, 70)


def test_coco_files_train_a_segmenter(tmp_path, cli):
    from detseg.data.export import write_scenes

    write_scenes(tmp_path / "data", train=12, val=4, size=48, seed=2, progress=False)
    result = cli("train", "seg/fcn_fullres", "--data", tmp_path / "data" / "train.json", "--val",
                 tmp_path / "data" / "val.json", "--epochs", "1", "--out", tmp_path / "run", "--quiet",
                 "image_size=48", "depth=2")
    assert result.returncode == 0, result.stderr
    missing_val = cli("train", "seg/fcn_fullres", "--data", tmp_path / "data" / "train.json", "--epochs", "1")
    assert missing_val.returncode == 2 and "--val" in missing_val.stderr


def test_max_unpool_needs_maxpool_is_a_clear_error(cli):
    result = cli("train", "seg/encoder_decoder", "up=max_unpool", "down=strided", "--epochs", "0")
    assert result.returncode == 2 and "max_unpool" in result.stderr and "Traceback" not in result.stderr
