"""YOLO: the S x S x (5B + C) output, targets on the grid (both responsibility rules), decoding, learning."""
import math

import pytest
import torch
from torchvision.ops import box_iou

from detseg.errors import ConfigError

from .detection_support import fit, objects_found, scene_batch, tiny_detector

BASE = "16x16,8x24,24x8"          # square, tall, wide; at 64 px and stride 8 the grid is 8 x 8, cells 8 px wide
SIZE = (64, 64)


def _target(boxes, labels):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.long),
            "iscrowd": torch.zeros(len(boxes), dtype=torch.long)}


def _no_prediction(batch=1, base=3):
    return torch.zeros(batch, 8, 8, base, 4)      # predicted boxes that overlap nothing: only shapes decide


def _perfect_outputs(model, grid, batch=1, confident=12.0):
    """Raw outputs whose responsible predictors decode exactly to their ground truth, with confidence ~1, the
    right class and every other predictor's confidence ~0: the inverse of YOLO's parametrisation."""
    num_base, classes = len(model.base_boxes), model.num_foreground
    boxes = torch.zeros(batch, 8, 8, num_base, 5)
    logits = torch.zeros(batch, 8, 8, *((num_base,) if model.per_box_classes else ()), classes)
    boxes[..., 4] = -confident
    owner = (grid.image, grid.row, grid.col, grid.base)
    sizes = grid.boxes[:, 2:] - grid.boxes[:, :2]
    boxes[owner + (slice(0, 2),)] = torch.logit(grid.offsets.double()).float()
    boxes[owner + (slice(2, 4),)] = torch.log(sizes / model.base_boxes[grid.base])
    boxes[owner + (4,)] = confident
    if model.per_box_classes:
        logits[owner + (grid.classes,)] = confident
    else:                                         # one class vector per cell: its largest object's
        cells = grid.owns_cell
        logits[grid.image[cells], grid.row[cells], grid.col[cells], grid.classes[cells]] = confident
    return torch.cat([boxes.flatten(3), logits.flatten(3)], dim=3)        # the documented channel layout


def test_output_is_s_by_s_by_5b_plus_c_with_per_cell_or_per_box_classes():
    images = torch.zeros(2, 3, 64, 64)
    for per_box, channels in ((False, 5 * 3 + 7), (True, 5 * 3 + 3 * 7)):
        model = tiny_detector("det/yolo", base_boxes=BASE, per_box_classes=per_box)
        with torch.no_grad():
            _, _, outputs = model.outputs(images)
        assert outputs.shape == (2, 8, 8, channels)
        boxes, scores = model.decode(outputs, SIZE)
        assert boxes.shape == (2, 8 * 8 * 3, 4) and scores.shape == (2, 8 * 8 * 3, 7)


def test_targets_land_in_the_centre_cell_on_the_best_fitting_shape():
    model = tiny_detector("det/yolo", base_boxes=BASE, responsible="shape")
    square, tall = [10, 20, 26, 36], [40, 8, 48, 32]   # centres (18, 28) and (44, 20)
    grid = model.encode_targets([_target([square, tall], [3, 5])], _no_prediction(), SIZE)
    assert grid.col.tolist() == [2, 5] and grid.row.tolist() == [3, 2]
    assert grid.base.tolist() == [0, 1]                                  # 16x16 for the square, 8x24 for the tall
    assert torch.allclose(grid.offsets, torch.tensor([[0.25, 0.5], [0.5, 0.5]]))
    assert torch.allclose(grid.sqrt_sizes, torch.tensor([[0.5, 0.5], [math.sqrt(8 / 64), math.sqrt(24 / 64)]]))
    assert grid.classes.tolist() == [2, 4] and grid.owns_cell.tolist() == [True, True]


def test_predicted_rule_picks_the_base_box_whose_prediction_overlaps_most():
    square = [10, 20, 26, 36]
    predicted = _no_prediction()
    predicted[0, 3, 2, 2] = torch.tensor([11.0, 21.0, 27.0, 37.0])       # the wide base box's prediction fits
    predicted[0, 3, 2, 0] = torch.tensor([0.0, 0.0, 12.0, 24.0])         # the square one's barely overlaps
    for rule, expected in (("predicted", 2), ("shape", 0)):
        model = tiny_detector("det/yolo", base_boxes=BASE, responsible=rule)
        grid = model.encode_targets([_target([square], [1])], predicted, SIZE)
        assert grid.base.tolist() == [expected], rule


def test_objects_sharing_a_cell_take_free_base_boxes_largest_first():
    model = tiny_detector("det/yolo", base_boxes=BASE, responsible="shape")
    # Four objects centred in cell (row 3, col 2): 12x4, 16x16, 8x12 and 2x2.
    boxes = [[12, 26, 24, 30], [10, 20, 26, 36], [14, 22, 22, 34], [17, 27, 19, 29]]
    grid = model.encode_targets([_target(boxes, [1, 2, 3, 4])], _no_prediction(), SIZE)
    # Largest first: the 16x16 square takes the square base box, the 8x12 the tall one, the 12x4 the wide one
    # left over; the 2x2 finds the cell full and is not trained on.
    assert sorted(zip(grid.classes.tolist(), grid.base.tolist())) == [(0, 2), (1, 0), (2, 1)]
    assert grid.classes[grid.owns_cell].tolist() == [1]                  # the cell's class vector: the largest's


def test_a_prediction_equal_to_the_target_decodes_to_the_ground_truth_and_costs_nothing():
    boxes = [[10, 20, 26, 36], [40, 8, 48, 32], [3.5, 40, 30, 63], [14, 22, 22, 34]]
    for per_box in (False, True):
        model = tiny_detector("det/yolo", base_boxes=BASE, per_box_classes=per_box, responsible="shape")
        target = _target(boxes, [3, 5, 7, 2])
        grid = model.encode_targets([target], _no_prediction(), SIZE)
        outputs = _perfect_outputs(model, grid)
        decoded = model.grid_boxes(model.split(outputs)[0], SIZE)[grid.image, grid.row, grid.col, grid.base]
        assert torch.allclose(decoded, grid.boxes, atol=1e-3)
        losses = model.losses(outputs, [target], SIZE)
        assert set(losses) == {"coord", "object", "no_object", "class"}
        assert all(float(value.detach()) < 1e-3 for value in losses.values()), losses
        flat_boxes, scores = model.decode(outputs, SIZE)
        best = scores.flatten(1).topk(len(boxes)).indices[0]
        found = flat_boxes[0, torch.div(best, 7, rounding_mode="floor")]
        assert torch.allclose(box_iou(target["boxes"], found).max(dim=1).values, torch.ones(4), atol=1e-3)


def test_an_image_without_objects_has_only_the_no_object_term_and_trains():
    model = tiny_detector("det/yolo")
    images, targets = scene_batch(range(1), seed=3)
    empty = _target([], [])
    crowd = {**_target([[5, 5, 40, 40]], [2]), "iscrowd": torch.ones(1, dtype=torch.long)}   # removed: empty too
    losses = model(torch.cat([torch.zeros(2, 3, 64, 64), images]), [empty, crowd, targets[0]])
    assert all(torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    only_empty = model(images, [empty])
    assert float(only_empty["no_object"].detach()) > 0
    assert all(float(only_empty[key].detach()) == 0.0 for key in ("coord", "object", "class"))
    sum(only_empty.values()).backward()


def test_yolo_overfits_a_few_images_and_finds_their_objects():
    images, targets = scene_batch(range(4), seed=3)
    model = tiny_detector("det/yolo", lr=0.0)
    first, last = fit(model, images, targets, steps=100)
    assert last < 0.1 * first, (first, last)
    model.eval()
    with torch.no_grad():
        found, total = objects_found(model(images), targets, min_score=0.3)
    assert found >= 0.8 * total, (found, total)


@pytest.mark.parametrize("overrides", [{"base_boxes": "16x"}, {"base_boxes": "16x-4"}, {"backbone": "resnet18",
                                                                                       "fpn": True}])
def test_bad_knobs_are_one_line_config_errors(overrides):
    with pytest.raises(ConfigError):
        tiny_detector("det/yolo", **overrides)
