"""detseg.metrics against hand-computed numbers and against pycocotools on hand-made ground truth."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.ops import box_iou

from detseg.data.records import LSP_FLIP, LSP_JOINTS
from detseg.errors import DetsegError
from detseg.metrics import (
    LSP_OKS_SIGMAS, ConfusionMatrix, box_iou_pairs, coco_eval, loc_metrics, pck, results_from_detections,
    results_from_keypoints, results_from_masks, top1,
)

SIZE = 96


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def _box_mask(x: int, y: int, w: int, h: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[y:y + h, x:x + w] = 1
    return mask


def _person_joints(x: float, y: float) -> np.ndarray:
    """14 distinct joints inside a 30 x 60 box at (x, y): (14, 2)."""
    rows = np.linspace(y + 2, y + 58, 14)
    cols = x + 2 + (np.arange(14) % 5) * 6.5
    return np.stack([cols, rows], axis=1)


def _annotation(ann_id, image_id, category_id, x, y, w, h, joints=None, iscrowd=0):
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h],
           "area": float(w * h), "iscrowd": iscrowd, "segmentation": _rle(_box_mask(x, y, w, h))}
    if joints is not None:
        flags = np.full((14, 1), 2.0)
        flags[3] = 0  # one unlabeled joint: OKS must skip it
        ann["keypoints"] = np.concatenate([joints, flags], axis=1).reshape(-1).tolist()
        ann["num_keypoints"] = 13
    return ann


@pytest.fixture()
def gt() -> dict:
    """Two images: squares and circles of several sizes, and a person with 14 joints; no 'info'/'licenses'."""
    categories = [{"id": 1, "name": "square", "supercategory": "shape"},
                  {"id": 2, "name": "circle", "supercategory": "shape"},
                  {"id": 3, "name": "person", "supercategory": "person", "keypoints": list(LSP_JOINTS),
                   "skeleton": [[1, 2]]}]
    images = [{"id": 1, "file_name": "1.png", "width": SIZE, "height": SIZE},
              {"id": 2, "file_name": "2.png", "width": SIZE, "height": SIZE}]
    annotations = [
        _annotation(1, 1, 1, 4, 4, 20, 20),     # small
        _annotation(2, 1, 2, 40, 10, 40, 40),   # medium
        _annotation(3, 2, 1, 5, 50, 12, 12),    # small
        _annotation(4, 2, 3, 50, 20, 30, 60, joints=_person_joints(50, 20)),
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def _perfect_boxes(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9}
            for a in gt["annotations"]]


# --- COCO evaluation ------------------------------------------------------------------------------------------------


def test_perfect_boxes_score_one_and_gt_is_untouched(gt):
    before = copy.deepcopy(gt)
    stats = coco_eval(gt, _perfect_boxes(gt), "bbox")
    assert stats["ap"] == pytest.approx(1.0) and stats["ap50"] == pytest.approx(1.0)
    assert stats["ap_small"] == pytest.approx(1.0) and stats["ar100"] == pytest.approx(1.0)
    assert stats["ap_large"] == -1.0  # no large ground truth: pycocotools' -1 is kept
    assert set(stats) == {"ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
                          "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large"}
    assert gt == before


def test_results_from_detections_converts_xyxy_and_categories(gt):
    boxes = [torch.tensor([[4.0, 4, 24, 24], [40, 10, 80, 50]]), torch.tensor([[5.0, 50, 17, 62], [50, 20, 80, 80]])]
    scores = [torch.tensor([0.9, 0.8]), torch.tensor([0.7, 0.6])]
    labels = [torch.tensor([0, 1]), torch.tensor([0, 2])]
    results = results_from_detections([1, 2], boxes, scores, labels, category_of={0: 1, 1: 2, 2: 3})
    assert results[1] == {"image_id": 1, "category_id": 2, "bbox": [40.0, 10.0, 40.0, 40.0],
                          "score": pytest.approx(0.8)}
    assert coco_eval(gt, results, "bbox")["ap"] == pytest.approx(1.0)


def test_box_at_iou_0_6_counts_at_three_of_ten_thresholds():
    # gt 40x40 (medium); the detection slides 10 px: overlap 30x40 / union 50x40 = 0.6 exactly. pycocotools
    # matches at IoU >= threshold, so thresholds .50 .55 .60 count it: with one TP the 101-point precision is 1
    # everywhere, hence AP = 3/10 exactly, AP50 = 1, AP75 = 0.
    single = {"images": [{"id": 7, "width": SIZE, "height": SIZE}],
              "categories": [{"id": 1, "name": "square"}],
              "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 40, 40]}]}
    results = results_from_detections([7], [np.array([[20.0, 10, 60, 50]])], [np.array([1.0])], [np.array([1])])
    assert box_iou_pairs(torch.tensor([[20.0, 10, 60, 50]]), torch.tensor([[10.0, 10, 50, 50]])).item() \
        == pytest.approx(0.6)
    stats = coco_eval(single, results, "bbox")
    assert stats["ap"] == pytest.approx(0.3, abs=1e-12)
    assert stats["ap50"] == pytest.approx(1.0) and stats["ap75"] == 0.0
    assert stats["ap_medium"] == pytest.approx(0.3) and stats["ap_small"] == -1.0


def test_empty_results_give_zero_not_a_crash(gt):
    for iou_type in ("bbox", "segm", "keypoints"):
        stats = coco_eval(gt, [], iou_type)
        assert stats["ap"] == 0.0 and stats["ap50"] == 0.0
    assert coco_eval(gt, [], "bbox")["ar100"] == 0.0


def test_detection_on_crowd_region_is_not_a_false_positive(gt):
    crowd_box = [60, 70, 30, 20]
    with_crowd = copy.deepcopy(gt)
    crowd = _annotation(9, 1, 1, *crowd_box, iscrowd=1)
    with_crowd["annotations"].append(crowd)
    # The extra detection outscores everything, so were it a false positive, precision at recall 1/4.. would drop.
    extra = {"image_id": 1, "category_id": 1, "bbox": list(crowd_box), "score": 0.99}
    assert coco_eval(with_crowd, _perfect_boxes(gt) + [extra], "bbox")["ap"] == pytest.approx(1.0)
    # Control: the same detection without the crowd region is a false positive and costs AP.
    assert coco_eval(gt, _perfect_boxes(gt) + [extra], "bbox")["ap"] < 0.95


def test_perfect_masks_score_one(gt):
    by_image = {1: [], 2: []}
    for ann in gt["annotations"]:
        by_image[ann["image_id"]].append(ann)
    masks = [np.stack([mask_utils.decode(a["segmentation"]) for a in by_image[i]]).astype(bool) for i in (1, 2)]
    scores = [np.full(len(by_image[i]), 0.9) for i in (1, 2)]
    labels = [np.array([a["category_id"] for a in by_image[i]]) for i in (1, 2)]
    results = results_from_masks([1, 2], masks, scores, labels)
    assert isinstance(results[0]["segmentation"]["counts"], str)
    assert coco_eval(gt, results, "segm")["ap"] == pytest.approx(1.0)
    # Dilating every predicted mask by 2 px must lower mask AP.
    grown = [torch.nn.functional.max_pool2d(torch.tensor(m, dtype=torch.float32)[None], 5, 1, 2)[0].numpy() > 0
             for m in masks]
    assert coco_eval(gt, results_from_masks([1, 2], grown, scores, labels), "segm")["ap"] < 0.9


def test_keypoints_perfect_and_displaced(gt):
    joints = _person_joints(50, 20)
    perfect = results_from_keypoints([2], [joints[None]], [np.array([0.9])], category_id=3)
    assert len(perfect[0]["keypoints"]) == 42
    stats = coco_eval(gt, perfect, "keypoints")
    assert stats["ap"] == pytest.approx(1.0)
    assert set(stats) == {"ap", "ap50", "ap75", "ap_medium", "ap_large", "ar", "ar50", "ar75", "ar_medium", "ar_large"}
    shifted = results_from_keypoints([2], [joints[None] + 4.0], [np.array([0.9])], category_id=3)
    assert coco_eval(gt, shifted, "keypoints")["ap"] < 1.0
    # The wide sigmas of COCO's 17 would be wrong here; a wrong-length override must be refused.
    with pytest.raises(DetsegError, match="14 joints"):
        coco_eval(gt, perfect, "keypoints", kpt_oks_sigmas=np.full(17, 0.05))


def test_ready_coco_object_is_accepted(gt):
    coco = COCO()
    coco.dataset = copy.deepcopy(gt)
    coco.createIndex()
    assert coco_eval(coco, _perfect_boxes(gt), "bbox")["ap"] == pytest.approx(1.0)


def test_bad_results_raise_clear_errors(gt):
    results = _perfect_boxes(gt)
    with pytest.raises(DetsegError, match="image id 99"):
        coco_eval(gt, results + [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(DetsegError, match="category id 42"):
        coco_eval(gt, results + [{"image_id": 1, "category_id": 42, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(DetsegError, match="'segmentation'"):
        coco_eval(gt, results, "segm")
    with pytest.raises(DetsegError, match="iou_type"):
        coco_eval(gt, results, "boxes")


def test_quiet_hides_pycocotools_output(gt, capsys):
    coco_eval(gt, _perfect_boxes(gt), "bbox", quiet=True)
    assert capsys.readouterr().out == ""
    coco_eval(gt, _perfect_boxes(gt), "bbox", quiet=False)
    assert "Average Precision" in capsys.readouterr().out


def test_lsp_sigmas_follow_joint_order_and_are_left_right_symmetric():
    assert len(LSP_OKS_SIGMAS) == len(LSP_JOINTS) == 14
    np.testing.assert_array_equal(LSP_OKS_SIGMAS, LSP_OKS_SIGMAS[list(LSP_FLIP)])
    assert LSP_OKS_SIGMAS[LSP_JOINTS.index("r_hip")] == 0.107


# --- segmentation -----------------------------------------------------------------------------------------------


def test_confusion_matrix_hand_case_with_ignored_pixels():
    target = torch.tensor([[[0, 1, 255], [2, 2, 1]]])
    pred = torch.tensor([[[0, 1, 1], [2, 0, 0]]])
    cm = ConfusionMatrix(num_classes=4)  # class 3 never occurs: excluded from the mean
    cm.update(pred, target)
    # Labeled pixels: (t0,p0) (t1,p1) (t2,p2) (t2,p0) (t1,p0). IoU0 = 1/3, IoU1 = 1/2, IoU2 = 1/2.
    iou = cm.per_class_iou()
    assert iou[:3].tolist() == pytest.approx([1 / 3, 1 / 2, 1 / 2]) and torch.isnan(iou[3])
    assert cm.miou() == pytest.approx(4 / 9)
    assert cm.pixel_acc() == pytest.approx(3 / 5)
    # Accumulating the same batch again changes no ratio; a class only predicted counts with IoU 0.
    cm.update(pred, target)
    assert cm.miou() == pytest.approx(4 / 9) and cm.matrix.sum() == 10
    cm.update(torch.tensor([[[3]]]), torch.tensor([[[0]]]))
    assert cm.per_class_iou()[3] == 0.0 and cm.miou() < 4 / 9


def test_confusion_matrix_rejects_out_of_range_and_empty_is_zero():
    cm = ConfusionMatrix(num_classes=2)
    assert cm.miou() == 0.0 and cm.pixel_acc() == 0.0
    with pytest.raises(ValueError):
        cm.update(torch.tensor([[[2]]]), torch.tensor([[[0]]]))


# --- classification, localization, pose ---------------------------------------------------------------------------


def test_top1_from_logits_and_from_predictions():
    labels = torch.tensor([0, 2, 1, 1])
    logits = torch.tensor([[5.0, 0, 0], [0, 0, 1], [1, 0, 0], [0, 3, 0]])
    assert top1(logits, labels) == pytest.approx(0.75)
    assert top1(torch.tensor([0, 2, 0, 0]), labels) == pytest.approx(0.5)


def test_box_iou_pairs_is_the_diagonal_of_box_iou():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(20, 2, 2, generator=generator) * 50
    boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)
    others = boxes.roll(1, dims=0) + torch.rand(20, 4, generator=generator)
    torch.testing.assert_close(box_iou_pairs(boxes, others), box_iou(boxes, others).diagonal())
    disjoint = box_iou_pairs(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[2.0, 2, 3, 3]]))
    assert disjoint.item() == 0.0


def test_loc_metrics_hand_case():
    gt_boxes = torch.tensor([[0.0, 0, 10, 10]] * 3)
    pred_boxes = torch.tensor([[2.5, 0, 12.5, 10],     # IoU 75/125 = 0.6
                               [0.0, 0, 4, 10],        # IoU 0.4
                               [0.0, 0, 10, 10]])      # IoU 1
    scores = loc_metrics(torch.tensor([1, 2, 0]), torch.tensor([1, 2, 3]), pred_boxes, gt_boxes)
    assert scores["top1"] == pytest.approx(2 / 3)
    assert scores["box_iou"] == pytest.approx((0.6 + 0.4 + 1.0) / 3)
    assert scores["loc_acc"] == pytest.approx(1 / 3)  # only the first: right class and IoU >= 0.5


def test_pck_hand_case():
    gt = torch.zeros(1, 4, 2)
    pred = torch.tensor([[[1.0, 0], [0, 2], [3, 0], [9, 9]]])  # distances 1, 2, 3, far
    visible = torch.tensor([[2, 1, 2, 0]])                     # the far joint is unlabeled
    # alpha 0.2 of a 10 px person: radius 2, so 1 and 2 (on the radius) count, 3 does not.
    assert pck(pred, gt, visible, torch.tensor([10.0])) == pytest.approx(2 / 3)
    assert pck(pred, gt, torch.zeros(1, 4), torch.tensor([10.0])) == 0.0
