"""Mask R-CNN: mask and keypoint targets, pasting masks back, decoding joints, learning a few scenes, the task."""
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import heatmaps_to_keypoints, paste_masks_in_image

from detseg import registry
from detseg.config import resolve
from detseg.data.dataset import InstanceDataset
from detseg.data.scenes import ScenesSource
from detseg.models.instance.heads import (decode_keypoints, keypoint_loss, keypoint_targets, mask_loss, mask_targets,
                                          paste_masks)
from detseg.tasks.instance import InstanceTask, instance_target

from .conftest import invoke_cli
from .detection_support import fit


def test_mask_targets_cut_the_object_out_at_the_roi():
    masks = torch.zeros(2, 40, 40, dtype=torch.uint8)
    masks[0, 10:20, 10:30] = 1                        # a 20 x 10 bar
    masks[1, :, :20] = 1                              # the left half
    rois = torch.tensor([[10.0, 10.0, 29.0, 19.0],    # the bar's pixels exactly (corners on pixel centres)
                         [10.0, 0.0, 29.0, 39.0]])    # straddling the half's edge: left part on, right off
    targets = mask_targets(masks, rois, torch.tensor([0, 1]), 28)
    assert targets.shape == (2, 28, 28)
    assert float(targets[0].min()) > 0.99
    assert float(targets[1, :, :12].min()) > 0.99 and float(targets[1, :, 16:].max()) < 0.01


def test_pasted_mask_matches_a_direct_rasterisation_within_a_pixel():
    # A disc drawn in a 28 x 28 mask and pasted at a box must land where the disc drawn at the box is.
    grid = (torch.arange(28) + 0.5) / 28
    disc = ((grid[None] - 0.5) ** 2 + (grid[:, None] - 0.5) ** 2 < 0.4 ** 2).float()
    box = torch.tensor([[30.3, 12.8, 90.1, 60.6]])
    pasted = paste_masks(disc[None], box, (80, 120))[0]
    ys, xs = torch.meshgrid(torch.arange(80) + 0.5, torch.arange(120) + 0.5, indexing="ij")
    centre_x, centre_y = (box[0, 0] + box[0, 2]) / 2, (box[0, 1] + box[0, 3]) / 2
    width, height = box[0, 2] - box[0, 0], box[0, 3] - box[0, 1]
    direct = ((xs - centre_x) / (0.4 * width)) ** 2 + ((ys - centre_y) / (0.4 * height)) ** 2 < 1
    disagree = pasted ^ direct
    # Every pixel that differs lies on the rasterised edge: within one pixel of a pixel of the other kind.
    edge = torch.nn.functional.max_pool2d(direct[None, None].float(), 3, 1, 1)[0, 0] \
        != -torch.nn.functional.max_pool2d(-direct[None, None].float(), 3, 1, 1)[0, 0]
    assert int(disagree.sum()) > 0 and bool((disagree <= edge).all())


def test_paste_and_decode_equal_torchvision_conventions():
    torch.manual_seed(0)
    corners = torch.rand(12, 2) * torch.tensor([100.0, 70.0]) - 10
    boxes = torch.cat([corners, corners + torch.rand(12, 2) * 60 + 0.5], dim=1)
    probabilities = torch.rand(12, 28, 28)
    reference = paste_masks_in_image(probabilities[:, None], boxes, (80, 110))[:, 0] > 0.5
    assert torch.equal(paste_masks(probabilities, boxes, (80, 110)), reference)
    heatmaps = torch.randn(12, 5, 56, 56)
    joints, scores = heatmaps_to_keypoints(heatmaps, boxes)
    decoded = decode_keypoints(heatmaps, boxes)
    assert torch.allclose(decoded[..., :2], joints[..., :2]) and torch.allclose(decoded[..., 2], scores, atol=1e-5)


def test_keypoint_heatmap_encode_decode_round_trip():
    rois = torch.tensor([[10.0, 20.0, 66.0, 76.0], [0.0, 0.0, 112.0, 56.0]])
    joints = torch.tensor([[[11.5, 21.5, 2], [40.2, 70.9, 1], [80.0, 30.0, 2], [30.0, 30.0, 0]],
                           [[0.0, 0.0, 2], [111.9, 55.9, 2], [56.0, 28.0, 2], [112.0, 56.0, 2]]])
    cells, valid = keypoint_targets(joints, rois, 56)
    assert valid.tolist() == [[True, True, False, False], [True, True, True, True]]   # outside / invisible
    heatmaps = torch.full((2, 4, 56, 56), -10.0)
    heatmaps.view(2, 4, -1).scatter_(2, cells[..., None], 10.0)                          # a peak at each target
    decoded = decode_keypoints(heatmaps, rois)
    error = (decoded[..., :2] - joints[..., :2]).abs()
    # Back within one heat-map cell (1 px for the first RoI, 2 x 1 px for the second), for every valid joint.
    cell_size = torch.tensor([[1.0, 1.0], [2.0, 1.0]])[:, None]
    assert bool((error <= cell_size + 1e-4)[valid].all()), error
    assert float(keypoint_loss(heatmaps, joints, rois)) < 1e-3                           # the peaks are right


def test_losses_on_empty_sets_are_zero_but_part_of_the_graph():
    logits = torch.randn(0, 3, 28, 28, requires_grad=True)
    assert float(mask_loss(logits.detach(), torch.zeros(0, dtype=torch.long), torch.zeros(0, 28, 28))) == 0.0
    heatmaps = torch.randn(2, 4, 56, 56, requires_grad=True)
    loss = keypoint_loss(heatmaps, torch.zeros(2, 4, 3), torch.tensor([[0.0, 0, 10, 10]] * 2))
    assert float(loss) == 0.0
    loss.backward()


def tiny_mask_rcnn(**overrides):
    entry = registry.get("inst/mask_rcnn")
    config = resolve(entry.all_options(), {"width": 16, "image_size": 96, **overrides})
    info = InstanceTask(config).extend_info({"num_classes": 8, "image_size": config["image_size"]},
                                            ScenesSource(1, size=config["image_size"]))
    torch.manual_seed(0)
    return entry.build(config, info), info


def instance_batch(indices, size: int = 96, seed: int = 0):
    dataset = InstanceDataset(ScenesSource(max(indices) + 1, size=size, seed=seed))
    pairs = [dataset[index] for index in indices]
    images = torch.stack([image.as_subclass(torch.Tensor) for image, _ in pairs])
    return images, [instance_target(target) for _, target in pairs]


def mask_iou(first: torch.Tensor, second: torch.Tensor) -> float:
    return float((first & second).sum()) / max(1, int((first | second).sum()))


def test_mask_rcnn_overfits_a_few_scenes_masks_and_joints():
    images, targets = instance_batch([0, 1, 2, 3], size=80, seed=5)
    assert any(bool((t["keypoints"][..., 2] > 0).any()) for t in targets)      # the batch has people
    model, info = tiny_mask_rcnn(image_size=80, keypoint_channels="32,32,32")
    before = {k: float(v) for k, v in model(images, targets).items()}
    assert set(before) == {"rpn_objectness", "rpn_box", "roi_class", "roi_box", "mask", "keypoint"}
    fit(model, images, targets, steps=100, lr=3e-3)
    after = {k: float(v) for k, v in model(images, targets).items()}
    assert after["mask"] < 0.4 * before["mask"] and after["keypoint"] < 0.6 * before["keypoint"], (before, after)
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    ious, joint_errors = [], []
    for output, target in zip(outputs, targets):
        assert output["masks"].shape[1:] == images.shape[2:] and output["masks"].dtype == torch.bool
        for gt_mask, gt_label, gt_joints in zip(target["masks"].bool(), target["labels"], target["keypoints"]):
            same = (output["labels"] == gt_label) & (output["scores"] > 0.5)
            best = max((mask_iou(mask, gt_mask) for mask in output["masks"][same]), default=0.0)
            ious.append(best)
            if gt_label == info["keypoint_class"] and same.any():
                row = int(torch.nonzero(same)[0])
                visible = gt_joints[:, 2] > 0
                joint_errors.append(float((output["keypoints"][row, visible, :2] - gt_joints[visible, :2])
                                          .norm(dim=1).median()))
    assert np.mean(ious) > 0.6, ious
    assert joint_errors and np.median(joint_errors) < 6.0, joint_errors


def test_training_run_writes_segm_and_keypoint_metrics_and_loadable_rle(tmp_path):
    run = tmp_path / "run"
    result = invoke_cli("train", "inst/mask_rcnn", "--epochs", "1", "--out", run, "train_size=8", "val_size=4",
                        "image_size=64", "width=8", "batch_size=4")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("ap", "segm_ap", "segm_ap50", "segm_ap75", "segm_ap_small", "segm_ap_medium", "segm_ap_large",
                "kp_ap", "kp_ap50", "kp_ap75", "kp_ap_medium", "kp_ap_large"):
        assert key in metrics, key
    segm = json.loads((run / "predictions_segm.json").read_text())
    assert segm and all(set(r) >= {"image_id", "category_id", "score", "segmentation"} for r in segm)
    decoded = mask_utils.decode([{"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}
                                 for r in segm[:5]])
    assert decoded.shape[:2] == (64, 64)
    keypoints = json.loads((run / "predictions_keypoints.json").read_text())
    assert all(len(r["keypoints"]) == 14 * 3 for r in keypoints)
    assert (run / "val_predictions.png").stat().st_size > 0


@pytest.mark.parametrize("flags", [["masks=false"], ["keypoints=false"]])
def test_either_head_can_be_switched_off(flags):
    model, _ = tiny_mask_rcnn(**dict(flag.split("=") for flag in flags))
    images, targets = instance_batch([0, 1])
    losses = model(images, targets)
    assert ("mask" in losses) == ("masks=false" not in flags)
    assert ("keypoint" in losses) == ("keypoints=false" not in flags)
    model.eval()
    with torch.no_grad():
        output = model(images)[0]
    assert ("masks" in output) == ("masks=false" not in flags)
    assert ("keypoints" in output) == ("keypoints=false" not in flags)


def test_bench_roialign_trains_the_three_runs_and_reports_them(tmp_path):
    from detseg.bench import roialign
    settings = {"train_size": 6, "val_size": 3, "epochs": 1,
                "knobs": {"image_size": 64, "width": 8, "batch_size": 3}}
    results = roialign.run(tmp_path, settings=settings)
    names = [row["name"] for row in results["rows"]]
    assert names == ["mask_rcnn_roialign", "mask_rcnn_roipool", "faster_rcnn"]
    assert "segm_ap" in results["rows"][1] and "segm_ap" not in results["rows"][2]
    text = (tmp_path / "report.md").read_text()
    assert "RoIAlign over RoIPool" in text and "| mask_rcnn_roipool |" in text
    pooled = torch.load(tmp_path / "runs" / "mask_rcnn_roipool" / "best.pt", weights_only=False)
    assert pooled["config"]["pool"] == "roi_pool"


def test_mask_pixels_refines_the_masks_with_the_regions_pixels():
    model, _ = tiny_mask_rcnn(mask_pixels="true")
    head = model.mask_head
    assert head.refine is not None
    images, targets = instance_batch([0, 1])
    batch = model.transform.batch(images)
    features = model.backbone(batch.normalized)
    features = model.roi_head.per_image(features) if hasattr(model.roi_head, "per_image") else features
    boxes = [target["boxes"][:2].float() for target in targets]
    logits = head(features, boxes, batch.input_size, batch.normalized)
    assert logits.shape[0] == sum(len(b) for b in boxes) and logits.shape[-1] == 2 * head.pooling.size
    changed = batch.normalized.clone()
    changed[:, :, :, :] += 1.0                                     # other pixels, same features: other masks
    assert not torch.allclose(logits, head(features, boxes, batch.input_size, changed))
    with pytest.raises(ValueError, match="normalised images"):
        head(features, boxes, batch.input_size)
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        assert "masks" in model(images)[0]
