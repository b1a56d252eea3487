"""Faster R-CNN and its region proposal network: the four losses, empty images, learning a few images."""
import pytest
import torch

from .detection_support import fit, objects_found, scene_batch, tiny_detector


def test_four_named_losses_and_empty_images_give_zero_box_losses():
    model = tiny_detector("det/faster_rcnn")
    images = torch.zeros(2, 3, 64, 64)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "iscrowd": torch.zeros(0, dtype=torch.long)}
    losses = model(images, [empty, empty])
    assert set(losses) == {"rpn_objectness", "rpn_box", "roi_class", "roi_box"}
    assert float(losses["rpn_box"]) == 0.0 and float(losses["roi_box"]) == 0.0
    assert float(losses["rpn_objectness"]) > 0 and float(losses["roi_class"]) > 0
    sum(losses.values()).backward()          # still a graph: an all-background batch trains the classifiers


def test_detections_have_the_contract_format():
    model = tiny_detector("det/faster_rcnn").eval()
    with torch.no_grad():
        detections = model(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8))
    assert len(detections) == 3
    for image in detections:
        assert image["boxes"].shape[1] == 4 and len(image["boxes"]) <= 100
        assert len(image["scores"]) == len(image["labels"]) == len(image["boxes"])
        assert image["labels"].dtype == torch.int64 and bool((image["labels"] >= 1).all())
        assert bool((image["boxes"] >= 0).all()) and bool((image["boxes"] <= 64).all())


def test_faster_rcnn_overfits_a_few_images_and_finds_their_objects():
    images, targets = scene_batch(range(4), seed=3)
    model = tiny_detector("det/faster_rcnn", lr=0.0)
    first, last = fit(model, images, targets, steps=120)
    assert last < 0.25 * first, (first, last)
    model.eval()
    with torch.no_grad():
        found, total = objects_found(model(images), targets)
    assert found >= 0.7 * total, (found, total)


def test_stage_timings_are_recorded():
    model = tiny_detector("det/faster_rcnn").eval()
    model.time_stages = True
    with torch.no_grad():
        model(torch.zeros(2, 3, 64, 64))
    assert all(model.stage_seconds[name] > 0 for name in ("shared_conv", "proposals", "per_region"))


@pytest.mark.parametrize("overrides", [{"backbone": "resnet18"},
                                       {"backbone": "resnet18", "fpn": True, "anchor_scales": "16,32,64,128,256"}])
def test_resnet_backbones_with_and_without_a_feature_pyramid_train_and_detect(overrides):
    model = tiny_detector("det/faster_rcnn", **overrides)
    images, targets = scene_batch(range(2), seed=3)
    losses = model(images, targets)
    assert set(losses) == {"rpn_objectness", "rpn_box", "roi_class", "roi_box"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and detections[0]["boxes"].shape[1] == 4
