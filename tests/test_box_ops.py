"""detseg.ops.boxes and detseg.ops.anchors on hand-checked cases: delta coding, matching, sampling, anchors, windows."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou

from detseg.errors import ConfigError
from detseg.ops.anchors import AnchorGenerator, anchor_shapes, flatten_head_output, grid_anchors
from detseg.ops.boxes import (
    DEFAULT_SCALE_CLAMP, IGNORED, NEGATIVE, Matcher, assign_targets, clip_and_filter, decode_box_deltas,
    encode_box_deltas, ignore_crowd_overlaps, sample_balanced, sliding_windows,
)


def _random_boxes(count: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    corner = torch.rand(count, 2, generator=generator, dtype=dtype) * 100
    size = torch.rand(count, 2, generator=generator, dtype=dtype) * 50 + 1
    return torch.cat([corner, corner + size], dim=1)


# --- delta coding -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_decode_inverts_encode_on_random_boxes(weights):
    generator = torch.Generator().manual_seed(0)
    reference, target = _random_boxes(200, generator), _random_boxes(200, generator)
    deltas = encode_box_deltas(reference, target, weights)
    assert deltas.shape == (200, 4)
    torch.testing.assert_close(decode_box_deltas(reference, deltas, weights), target, rtol=0, atol=1e-9)


def test_hand_computed_delta():
    # reference: centre (20, 30), 20 x 40; target: centre (25, 20), 40 x 10
    reference = torch.tensor([[10.0, 10.0, 30.0, 50.0]], dtype=torch.float64)
    target = torch.tensor([[5.0, 15.0, 45.0, 25.0]], dtype=torch.float64)
    expected = torch.tensor([[5 / 20, -10 / 40, math.log(40 / 20), math.log(10 / 40)]], dtype=torch.float64)
    torch.testing.assert_close(encode_box_deltas(reference, target), expected)
    torch.testing.assert_close(encode_box_deltas(reference, target, (10, 10, 5, 5)),
                               expected * torch.tensor([10.0, 10.0, 5.0, 5.0], dtype=torch.float64))
    assert torch.equal(encode_box_deltas(reference, reference), torch.zeros(1, 4, dtype=torch.float64))


def test_decode_clamps_the_log_size_ratio():
    reference = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    huge = torch.tensor([[0.0, 0.0, 50.0, 50.0]])
    boxes = decode_box_deltas(reference, huge)
    assert torch.isfinite(boxes).all()
    side = 16 * math.exp(DEFAULT_SCALE_CLAMP)   # = 1000: at most 1000/16 times the reference
    torch.testing.assert_close(boxes, torch.tensor([[8 - side / 2, 8 - side / 2, 8 + side / 2, 8 + side / 2]]))
    # shrinking is not clamped; a custom clamp applies to width and height separately
    torch.testing.assert_close(decode_box_deltas(reference, torch.tensor([[0.0, 0.0, -math.log(2), 0.0]])),
                               torch.tensor([[4.0, 0.0, 12.0, 16.0]]))
    torch.testing.assert_close(decode_box_deltas(reference, torch.tensor([[0.0, 0.0, 5.0, 0.0]]), scale_clamp=0.0),
                               reference)


def test_decode_class_specific_deltas():
    reference = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 30.0, 20.0]])
    deltas = torch.zeros(2, 3 * 4)
    deltas[:, 4] = 0.5                                   # class 1 moves right by half a width
    boxes = decode_box_deltas(reference, deltas).view(2, 3, 4)
    torch.testing.assert_close(boxes[:, 0], reference)
    torch.testing.assert_close(boxes[:, 1], reference + torch.tensor([[5.0, 0, 5.0, 0], [10.0, 0, 10.0, 0]]))


# --- matching -----------------------------------------------------------------------------------------------------

def test_matcher_thresholds_are_inclusive_at_high_and_exclusive_at_low():
    iou = torch.tensor([
        # proposals: 0.7 (=high), 0.69, 0.3 (=low), 0.29, 0.0, 0.9 for gt 1
        [0.70, 0.69, 0.30, 0.29, 0.00, 0.10],
        [0.10, 0.20, 0.00, 0.00, 0.00, 0.90],
    ])
    matches = Matcher(high=0.7, low=0.3).match(iou)
    assert matches.dtype == torch.long
    assert matches.tolist() == [0, IGNORED, IGNORED, NEGATIVE, NEGATIVE, 1]
    # equal thresholds leave no ignored band
    assert Matcher(high=0.5, low=0.5).match(torch.tensor([[0.5, 0.49]])).tolist() == [0, NEGATIVE]


def test_matcher_low_quality_matches_give_every_gt_a_positive():
    iou = torch.tensor([
        [0.40, 0.40, 0.10, 0.00, 0.00],    # gt 0: best 0.4, tied on proposals 0 and 1
        [0.00, 0.45, 0.20, 0.80, 0.00],    # gt 1: already has a positive (0.8)
        [0.00, 0.00, 0.00, 0.00, 0.00],    # gt 2: overlaps nothing - must not make everything positive
    ])
    plain = Matcher(high=0.7, low=0.3).match(iou)
    assert plain.tolist() == [IGNORED, IGNORED, NEGATIVE, 1, NEGATIVE]
    matches = Matcher(high=0.7, low=0.3, allow_low_quality=True).match(iou)
    # proposal 1 is gt 0's best (tie) but overlaps gt 1 more; it is not gt 1's best, so it goes to gt 0
    assert matches.tolist() == [0, 0, NEGATIVE, 1, NEGATIVE]


def test_matcher_empty_gt_and_empty_proposals():
    matcher = Matcher(0.5, 0.4, allow_low_quality=True)
    assert matcher.match(torch.zeros(0, 6)).tolist() == [NEGATIVE] * 6
    assert matcher.match(torch.zeros(3, 0)).shape == (0,)
    with pytest.raises(ConfigError):
        Matcher(high=0.3, low=0.5)


def test_crowd_overlaps_become_ignored_not_negative():
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [60.0, 60.0, 70.0, 70.0], [45.0, 45.0, 55.0, 55.0],
                              [200.0, 200.0, 210.0, 210.0]])
    crowd = torch.tensor([[50.0, 50.0, 150.0, 150.0]])
    matches = torch.tensor([0, NEGATIVE, NEGATIVE, NEGATIVE])
    # proposal 1 lies inside the crowd (IoA 1, IoU 0.01); proposal 2 is a quarter inside (IoA 0.25)
    assert ignore_crowd_overlaps(matches, proposals, crowd, 0.5).tolist() == [0, IGNORED, NEGATIVE, NEGATIVE]
    assert ignore_crowd_overlaps(matches, proposals, crowd, 0.25).tolist() == [0, IGNORED, IGNORED, NEGATIVE]
    assert ignore_crowd_overlaps(matches, proposals, crowd, 0.5, use_ioa=False).tolist() == matches.tolist()
    assert matches.tolist() == [0, NEGATIVE, NEGATIVE, NEGATIVE]    # input untouched


def test_assign_targets_labels_boxes_and_crowd():
    gt_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 100.0, 100.0], [20.0, 20.0, 30.0, 30.0]])
    gt_labels = torch.tensor([3, 5, 7])
    crowd = torch.tensor([False, True, False])
    proposals = torch.tensor([[0.0, 0.0, 10.0, 11.0], [21.0, 20.0, 30.0, 30.0], [60.0, 60.0, 70.0, 70.0],
                              [200.0, 200.0, 220.0, 220.0], [18.0, 18.0, 28.0, 28.0]])
    targets = assign_targets(proposals, gt_boxes, gt_labels, Matcher(0.5, 0.3), crowd=crowd)
    # proposal 2 lies inside the crowd box; proposal 4 has IoU 64/136 = 0.47 with gt 2, between the thresholds
    assert targets.labels.tolist() == [3, 7, -1, 0, -1]
    assert targets.matches.tolist() == [0, 2, IGNORED, NEGATIVE, IGNORED]   # indices into the full gt list
    torch.testing.assert_close(targets.boxes[:2], gt_boxes[[0, 2]])
    torch.testing.assert_close(targets.boxes[2:], proposals[2:])            # not positive: the proposal itself
    objectness = assign_targets(proposals, gt_boxes, None, Matcher(0.5, 0.3), crowd=crowd)
    assert objectness.labels.tolist() == [1, 1, -1, 0, -1]
    without_crowd = assign_targets(proposals, gt_boxes[[0, 2]], gt_labels[[0, 2]], Matcher(0.5, 0.3))
    assert without_crowd.labels.tolist() == [3, 7, 0, 0, -1]


def test_image_without_objects_gives_background_and_zero_box_loss():
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 40.0, 30.0]])
    targets = assign_targets(proposals, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), Matcher(0.5, 0.5))
    assert targets.labels.tolist() == [0, 0]
    assert targets.matches.tolist() == [NEGATIVE, NEGATIVE]
    deltas = encode_box_deltas(proposals, targets.boxes)
    assert torch.equal(deltas, torch.zeros(2, 4))
    predicted = torch.randn(2, 4, requires_grad=True)
    positive = targets.labels > 0
    loss = torch.nn.functional.smooth_l1_loss(predicted[positive], deltas[positive], reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(predicted.grad, torch.zeros(2, 4))
    empty = assign_targets(torch.zeros(0, 4), torch.zeros(0, 4), None, Matcher(0.5, 0.5))
    assert empty.labels.shape == (0,) and empty.boxes.shape == (0, 4)


# --- sampling -----------------------------------------------------------------------------------------------------

def test_sampler_respects_fraction_and_batch_size():
    matches = torch.tensor([0] * 40 + [NEGATIVE] * 100 + [IGNORED] * 10)
    positives, negatives = sample_balanced(matches, 64, 0.25, torch.Generator().manual_seed(0))
    assert len(positives) == 16 and len(negatives) == 48
    assert (matches[positives] >= 0).all() and (matches[negatives] == NEGATIVE).all()
    assert len(set(positives.tolist())) == 16 and len(set(negatives.tolist())) == 48


def test_sampler_fills_with_negatives_when_positives_are_few():
    matches = torch.tensor([1, 2, 0] + [NEGATIVE] * 100 + [IGNORED] * 50)
    positives, negatives = sample_balanced(matches, 64, 0.5)
    assert sorted(positives.tolist()) == [0, 1, 2] and len(negatives) == 61
    # too few of both: a smaller batch, never an ignored proposal
    positives, negatives = sample_balanced(torch.tensor([0, NEGATIVE, IGNORED, NEGATIVE]), 64, 0.5)
    assert positives.tolist() == [0] and sorted(negatives.tolist()) == [1, 3]
    positives, negatives = sample_balanced(torch.empty(0, dtype=torch.long), 8, 0.5)
    assert len(positives) == len(negatives) == 0


def test_sampler_is_reproducible_with_a_generator():
    matches = torch.tensor([0] * 30 + [NEGATIVE] * 300)
    first = sample_balanced(matches, 32, 0.25, torch.Generator().manual_seed(7))
    second = sample_balanced(matches, 32, 0.25, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# --- filtering ----------------------------------------------------------------------------------------------------

def test_clip_and_filter():
    boxes = torch.tensor([
        [-10.0, -10.0, 30.0, 30.0],   # clipped to (0, 0, 30, 30), score 0.9
        [1.0, 1.0, 31.0, 31.0],       # IoU 0.88 with box 0 after clipping: suppressed
        [50.0, 50.0, 52.0, 80.0],     # 2 px wide: too small
        [40.0, 0.0, 60.0, 20.0],      # score below threshold
        [60.0, 60.0, 120.0, 90.0],    # clipped to (60, 60, 100, 90)
    ])
    scores = torch.tensor([0.9, 0.8, 0.95, 0.01, 0.5])
    result = clip_and_filter(boxes, scores, (100, 100), min_size=4, score_thresh=0.05, nms_thresh=0.5)
    assert result.keep.tolist() == [0, 4] and result.labels is None
    torch.testing.assert_close(result.boxes, torch.tensor([[0.0, 0.0, 30.0, 30.0], [60.0, 60.0, 100.0, 90.0]]))
    torch.testing.assert_close(result.scores, torch.tensor([0.9, 0.5]))
    # per-class NMS: different labels never suppress each other; top_k keeps the best
    labelled = clip_and_filter(boxes, scores, (100, 100), min_size=4, nms_thresh=0.5,
                               labels=torch.tensor([1, 2, 1, 1, 1]))
    assert labelled.keep.tolist() == [0, 1, 4, 3] and labelled.labels.tolist() == [1, 2, 1, 1]
    assert clip_and_filter(boxes, scores, (100, 100), nms_thresh=None, top_k=2).keep.tolist() == [2, 0]
    assert len(clip_and_filter(torch.zeros(0, 4), torch.zeros(0), (10, 10), min_size=1).boxes) == 0


# --- anchors ------------------------------------------------------------------------------------------------------

def test_anchor_shapes_area_and_ratio():
    shapes = anchor_shapes((32, 64), (0.5, 1.0, 2.0))
    assert shapes.shape == (6, 4)
    widths, heights = shapes[:, 2] - shapes[:, 0], shapes[:, 3] - shapes[:, 1]
    torch.testing.assert_close(widths * heights, torch.tensor([32.0**2] * 3 + [64.0**2] * 3))
    torch.testing.assert_close(heights / widths, torch.tensor([0.5, 1.0, 2.0] * 2))
    torch.testing.assert_close(shapes[:, :2], -shapes[:, 2:])                   # zero-centred
    torch.testing.assert_close(shapes[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))


def test_grid_anchors_are_centred_on_cells():
    anchors = grid_anchors((2, 3), 16, anchor_shapes((32,), (1.0,)))
    assert anchors.shape == (6, 4)
    torch.testing.assert_close(anchors[0], torch.tensor([-8.0, -8.0, 24.0, 24.0]))   # centre (8, 8)
    torch.testing.assert_close(anchors[1], anchors[0] + torch.tensor([16.0, 0, 16.0, 0]))   # x moves first
    torch.testing.assert_close(anchors[3], anchors[0] + torch.tensor([0, 16.0, 0, 16.0]))   # then y
    rectangular = grid_anchors((1, 2), (8, 4), anchor_shapes((2,), (1.0,)))
    torch.testing.assert_close(rectangular, torch.tensor([[1.0, 3.0, 3.0, 5.0], [5.0, 3.0, 7.0, 5.0]]))


def test_anchor_order_matches_flattened_head_output():
    height, width, k = 3, 4, 2
    shapes = anchor_shapes((16, 32), (0.5, 1.0, 2.0))
    num_anchors = len(shapes)
    anchors = grid_anchors((height, width), 8, shapes)
    # a head output whose channel a*k + j at (y, x) holds an id of (y, x, a) and j
    y, x, a, j = torch.meshgrid(torch.arange(height), torch.arange(width), torch.arange(num_anchors),
                                torch.arange(k), indexing="ij")
    codes = (((y * width + x) * num_anchors + a) * 10 + j).float()                # (h, w, A, k)
    head = codes.permute(2, 3, 0, 1).reshape(1, num_anchors * k, height, width)   # (1, A*k, h, w)
    flat = flatten_head_output(head, k)                                            # (1, h*w*A, k)
    assert flat.shape == (1, height * width * num_anchors, k)
    rows = torch.arange(height * width * num_anchors)
    assert torch.equal(flat[0, :, 0], rows.float() * 10) and torch.equal(flat[0, :, 1], rows.float() * 10 + 1)
    # and anchor row i is anchor a = i % A centred at cell (y, x) = divmod(i // A, w)
    for row in (0, 7, 25, len(rows) - 1):
        cell_y, cell_x = divmod(row // num_anchors, width)
        centre = (anchors[row, :2] + anchors[row, 2:]) / 2
        torch.testing.assert_close(centre, torch.tensor([(cell_x + 0.5) * 8, (cell_y + 0.5) * 8]))
        torch.testing.assert_close(anchors[row] - torch.cat([centre, centre]), shapes[row % num_anchors])


def test_anchor_generator_levels_and_cache():
    generator = AnchorGenerator(((32,), (64,)), (0.5, 1.0, 2.0))
    assert generator.num_anchors_per_location == [3, 3]
    features = [torch.zeros(2, 8, 16, 16), torch.zeros(2, 8, 8, 8)]
    level0, level1 = generator(features, (128, 128))
    assert level0.shape == (16 * 16 * 3, 4) and level1.shape == (8 * 8 * 3, 4)
    torch.testing.assert_close(level1[1], torch.tensor([-24.0, -24.0, 40.0, 40.0]))    # stride 16, centre (8, 8)
    assert generator(features, (128, 128))[0] is level0                                # cached
    single = AnchorGenerator((16, 32), (1.0,))
    assert single.num_anchors_per_location == [2]
    with pytest.raises(ConfigError):
        AnchorGenerator(((32,), (64,)), ((1.0,), (0.5,), (2.0,)))


# --- sliding windows ----------------------------------------------------------------------------------------------

def test_sliding_window_count_formula_and_placement():
    windows = sliding_windows((64, 96), scales=(32,), aspect_ratios=(1.0,), stride_frac=0.5)
    # nx = floor((96 - 32) / 16) + 1 = 5, ny = floor((64 - 32) / 16) + 1 = 3
    assert windows.shape == (15, 4)
    torch.testing.assert_close(windows[0], torch.tensor([0.0, 0.0, 32.0, 32.0]))
    torch.testing.assert_close(windows[1], torch.tensor([16.0, 0.0, 48.0, 32.0]))
    torch.testing.assert_close(windows[-1], torch.tensor([64.0, 32.0, 96.0, 64.0]))

    image_size, scales, ratios, stride_frac = (100, 120), (20, 40, 200), (0.5, 1.0, 2.0), 0.25
    expected = 0
    for scale in scales:
        for ratio in ratios:
            w, h = scale / math.sqrt(ratio), scale * math.sqrt(ratio)
            nx = math.floor((image_size[1] - w) / (stride_frac * w)) + 1 if w <= image_size[1] else 0
            ny = math.floor((image_size[0] - h) / (stride_frac * h)) + 1 if h <= image_size[0] else 0
            expected += nx * ny
    windows = sliding_windows(image_size, scales, ratios, stride_frac)
    assert len(windows) == expected > 0
    assert (windows >= 0).all() and (windows[:, 2] <= 120 + 1e-4).all() and (windows[:, 3] <= 100 + 1e-4).all()
    assert box_iou(windows, windows).diagonal().min() > 0.99     # all windows are proper boxes
