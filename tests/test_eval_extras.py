"""What a practitioner reads after a detector run: AP per class, precision-recall curves, a confusion matrix."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detseg.metrics import coco_eval, coco_evaluator, detection_confusion, per_class_ap, precision_recall_curves

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 5, "name": "star"}]


def _box(x, y, w=20, h=20):
    return [float(x), float(y), float(w), float(h)]


def ground_truth() -> dict:
    """Two 100 x 100 images: three circles, two squares and a crowd of squares; no star anywhere."""
    annotations = [
        (1, 1, _box(10, 10), 0), (1, 2, _box(50, 10), 0), (1, 1, _box(10, 60), 0), (1, 2, _box(50, 50, 40, 40), 1),
        (2, 1, _box(30, 30, 30, 30), 0), (2, 2, _box(5, 70), 0),
    ]
    return {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.png"},
                       {"id": 2, "width": 100, "height": 100, "file_name": "2.png"}],
            "categories": CATEGORIES,
            "annotations": [{"id": k, "image_id": image, "category_id": category, "bbox": box, "iscrowd": crowd,
                             "area": box[2] * box[3]}
                            for k, (image, category, box, crowd) in enumerate(annotations, start=1)]}


def _result(image_id, category_id, box, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}


# On image 1: the first circle found, twice; the square called a circle (and, lower, a square); a false square in
# empty space; a circle inside the crowd; the second circle only at score 0.3. On image 2: a loose circle, the
# square, and a star that has no ground truth anywhere.
RESULTS = [
    _result(1, 1, _box(10, 10), 0.9), _result(1, 1, _box(11, 11), 0.6),
    _result(1, 1, _box(51, 10), 0.8), _result(1, 2, _box(50, 10), 0.5),
    _result(1, 2, _box(0, 85, 10, 10), 0.7), _result(1, 1, _box(55, 55, 10, 10), 0.95),
    _result(1, 1, _box(10, 62), 0.3),
    _result(2, 1, _box(35, 35, 30, 30), 0.85), _result(2, 2, _box(5, 70), 0.4), _result(2, 5, _box(60, 5), 0.75),
]


def _pycocotools(gt: dict, results: list[dict], category_ids=None) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(json.loads(json.dumps(results))), "bbox")
        if category_ids is not None:
            evaluator.params.catIds = category_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_per_class_ap_is_pycocotools_per_category_and_averages_to_ap():
    evaluator = coco_evaluator(ground_truth(), RESULTS)
    per_class = per_class_ap(evaluator)
    assert set(per_class) == {"circle", "square"}                 # no star in the ground truth: no AP, left out
    assert 0 < per_class["circle"] < 1 and 0 < per_class["square"] < 1
    stats = coco_eval(ground_truth(), RESULTS)
    assert np.mean(list(per_class.values())) == pytest.approx(stats["ap"], abs=1e-12)
    for name, category_id in (("circle", 1), ("square", 2)):     # each class evaluated alone by pycocotools
        assert per_class[name] == pytest.approx(_pycocotools(ground_truth(), RESULTS, [category_id])[0], abs=1e-12)


def test_precision_recall_curves_at_iou_half_average_to_ap50():
    evaluator = coco_evaluator(ground_truth(), RESULTS)
    recall, curves = precision_recall_curves(evaluator, iou=0.5)
    assert recall.shape == (101,) and recall[0] == 0 and recall[-1] == 1
    assert set(curves) == {"circle", "square"}
    assert all(np.all(np.diff(curve) <= 1e-12) for curve in curves.values())   # COCO's interpolation: monotone
    assert np.mean([curve.mean() for curve in curves.values()]) == pytest.approx(coco_eval(ground_truth(),
                                                                                           RESULTS)["ap50"])
    with pytest.raises(Exception, match="0.52"):
        precision_recall_curves(evaluator, iou=0.52)


def test_confusion_matrix_of_hand_made_boxes():
    matrix, names = detection_confusion(ground_truth(), RESULTS)
    assert names == ["background", "circle", "square", "star"]
    expected = torch.tensor([
        # detected as: background, circle, square, star
        [0, 1, 2, 1],   # nothing there: the duplicate circle; the false square and the square beaten to its object
        [1, 2, 0, 0],   # circles: two found (the loose one at IoU 0.53), one missed (its detection scored 0.3)
        [1, 1, 0, 0],   # squares: one called a circle, one missed (found only at score 0.4)
        [0, 0, 0, 0],   # no stars
    ])
    assert torch.equal(matrix, expected), matrix
    # The crowd is no miss and the circle inside it no false positive; without the crowd that circle is one.
    no_crowd = ground_truth()
    no_crowd["annotations"] = [ann for ann in no_crowd["annotations"] if not ann["iscrowd"]]
    assert int(detection_confusion(no_crowd, RESULTS)[0][0, 1]) == 2
    # A lower IoU threshold, and a lower score threshold that lets the 0.3 circle find its object.
    assert int(detection_confusion(ground_truth(), RESULTS, score_threshold=0.2)[0][1, 1]) == 3
    assert int(detection_confusion(ground_truth(), [], score_threshold=0.2)[0][:, 0].sum()) == 5   # all missed


def _check_run_outputs(directory, val_json):
    for name in ("pr_curves.png", "confusion.png", "confusion.json", "predictions.json", "metrics.json"):
        assert (directory / name).is_file(), name
    metrics = json.loads((directory / "metrics.json").read_text())
    per_class = metrics["per_class_ap"]
    if per_class:
        assert np.mean(list(per_class.values())) == pytest.approx(metrics["ap"], abs=1e-12)
    confusion = json.loads((directory / "confusion.json").read_text())
    gt = json.loads(val_json.read_text())
    assert confusion["classes"] == ["background"] + [category["name"] for category in gt["categories"]]
    assert confusion["score_threshold"] == 0.5 and confusion["iou_threshold"] == 0.5
    # Every ground-truth object is either matched (some column) or missed (background column): a row per class
    # sums to its number of objects, crowds excluded.
    matrix = np.array(confusion["matrix"])
    for label, category in enumerate(gt["categories"], start=1):
        objects = sum(1 for ann in gt["annotations"] if ann["category_id"] == category["id"] and not ann["iscrowd"])
        assert matrix[label].sum() == objects, category["name"]


def test_a_tiny_detector_run_and_its_eval_write_pr_curves_and_confusion(tmp_path, cli, scenes_files):
    run = tmp_path / "run"
    result = cli("train", "det/faster_rcnn", "--data", scenes_files / "train.json", "--val",
                 scenes_files / "val.json", "--epochs", "1", "--out", run, "image_size=64", "batch_size=4",
                 "width=8", "rois_per_image=16")
    assert result.returncode == 0, result.stderr
    _check_run_outputs(run, scenes_files / "val.json")
    result = cli("eval", run / "best.pt", "--data", scenes_files / "train.json", "--val", scenes_files / "val.json",
                 "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    assert "per_class_ap" in json.loads(result.stdout)
    _check_run_outputs(tmp_path / "eval", scenes_files / "val.json")
