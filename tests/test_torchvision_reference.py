"""det/torchvision_faster_rcnn: torchvision's FasterRCNN behind our detector conventions, on our tiny backbone."""
import torch

from detseg import registry

from .detection_support import scene_batch, tiny_detector

TORCHVISION_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def test_our_backbone_input_size_statistics_and_anchors_are_used():
    model = tiny_detector("det/torchvision_faster_rcnn", anchor_scales="8,16", anchor_ratios="0.5,1,2")
    detector = model.detector
    assert detector.backbone.out_channels == detector.roi_heads.box_head.fc6.in_features // 49
    assert detector.transform.min_size == (64,) and detector.transform.max_size == 64
    assert detector.transform.image_mean == [0.5, 0.5, 0.5]
    assert detector.rpn.anchor_generator.num_anchors_per_location() == [6]
    assert set(registry.get("det/torchvision_faster_rcnn").options) >= {"backbone", "width", "anchor_scales"}


def test_losses_in_train_mode_empty_dict_in_eval_mode_and_empty_images_train():
    model = tiny_detector("det/torchvision_faster_rcnn").train()
    images, targets = scene_batch(range(2), seed=3)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "iscrowd": torch.zeros(0, dtype=torch.long)}
    losses = model(images, [targets[0], empty])
    assert set(losses) == TORCHVISION_LOSSES
    assert all(torch.isfinite(value) and value >= 0 for value in losses.values())
    sum(losses.values()).backward()
    assert model.detector.backbone.stem[0].weight.grad is not None
    model.eval()
    assert model.training_losses(images, targets) == {}     # torchvision has losses in train mode only
    assert len(model(images)) == len(images)                 # eval mode: detections, whatever else is given


def test_crowd_boxes_are_not_trained_as_objects():
    target = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0], [30.0, 30.0, 50.0, 60.0]]),
              "labels": torch.tensor([1, 2]), "iscrowd": torch.tensor([0, 1])}
    converted = tiny_detector("det/torchvision_faster_rcnn")._torchvision_targets([target])[0]
    assert converted["labels"].tolist() == [1] and converted["boxes"].shape == (1, 4)


def test_detections_have_the_contract_format():
    model = tiny_detector("det/torchvision_faster_rcnn").eval()
    with torch.no_grad():
        detections = model(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8))
    assert len(detections) == 3
    for image in detections:
        assert image["boxes"].shape[1] == 4 and len(image["boxes"]) <= 100
        assert len(image["scores"]) == len(image["labels"]) == len(image["boxes"])
        assert image["labels"].dtype == torch.int64 and bool((image["labels"] >= 1).all())
        assert bool((image["boxes"] >= 0).all()) and bool((image["boxes"] <= 64).all())


def test_a_few_steps_reduce_the_loss():
    images, targets = scene_batch(range(2), seed=3)
    model = tiny_detector("det/torchvision_faster_rcnn").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    totals = []
    for _ in range(12):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(float(loss.detach()))
    assert sum(totals[-3:]) / 3 < 0.5 * sum(totals[:3]) / 3, totals


def test_the_references_take_the_test_time_knobs_predict_sets():
    """`detseg predict --conf / --max-det` set score_thresh / detections_per_image; torchvision's rows honour them."""
    from detseg import registry
    from detseg.config import resolve

    for name in ("det/torchvision_faster_rcnn", "det/torchvision_ssd"):
        entry = registry.get(name)
        config = resolve(entry.all_options(), {"width": 8, "image_size": 64, "score_thresh": 0.3,
                                                "detections_per_image": 7})
        detector = entry.build(config, {"num_classes": 8, "image_size": 64}).detector
        heads = getattr(detector, "roi_heads", detector)
        assert heads.score_thresh == 0.3, name
        assert (heads.detections_per_img if hasattr(heads, "detections_per_img") else None) == 7, name
