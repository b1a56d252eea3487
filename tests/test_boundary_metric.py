"""The boundary IoU on hand-made masks: exact values where the bands can be counted by hand."""
import numpy as np
import pytest

from detseg.metrics import BoundaryIoU, ConfusionMatrix, inner_band


def square(size=20, top=5, left=5, side=10, label=1):
    image = np.zeros((size, size), dtype=np.int64)
    image[top:top + side, left:left + side] = label
    return image


def test_inner_band_of_a_square_is_its_rings():
    mask = square() == 1
    assert inner_band(mask, 1).sum() == 100 - 64          # the outer ring of a 10 x 10 square: 36 px
    assert inner_band(mask, 2).sum() == 100 - 36          # two rings
    assert not inner_band(mask, 1)[7:13, 7:13].any()       # the inside stays out


def test_the_image_edge_is_no_contour():
    half = np.zeros((16, 16), dtype=bool)
    half[:, :8] = True                                     # touches the top, bottom and left edges
    band = inner_band(half, 1)
    assert band.sum() == 16 and band[:, 7].all()           # only the column next to the inside edge


def test_identical_maps_score_one():
    metric = BoundaryIoU(num_classes=3, width=2)
    truth = square() + square(top=2, left=2, side=3, label=2) * (square() == 0)
    metric.update(truth, truth)
    assert metric.mean() == pytest.approx(1.0)


def test_a_shrunken_square_scores_far_below_its_region_iou():
    truth, pred = square(side=10), square(top=6, left=6, side=8)          # 8 x 8 inside the 10 x 10
    region = ConfusionMatrix(2)
    region.update(np.asarray(pred)[None], np.asarray(truth)[None])
    assert region.per_class_iou()[1].item() == pytest.approx(64 / 100)
    thin = BoundaryIoU(2, width=1)
    thin.update(pred, truth)
    assert thin.mean() == 0.0                              # the 8 x 8's ring is the truth's second ring
    wide = BoundaryIoU(2, width=2)
    wide.update(pred, truth)
    # truth band 64 px (rings 1-2), prediction band 48 px (the truth's rings 2-3), shared ring 2: 28 px.
    assert wide.mean() == pytest.approx(28 / (64 + 48 - 28))


def test_ignored_pixels_background_and_absent_classes():
    truth, pred = square(), square(top=6, left=6, side=8)
    truth[:, :11] = 255                                    # columns 0-10 count nowhere
    metric = BoundaryIoU(3, width=1, ignore_index=255)
    metric.update(pred, truth)
    per_class = metric.per_class()
    assert np.isnan(per_class[0]) and np.isnan(per_class[2])   # background never scored, class 2 never seen
    # Truth: the 10 x 4 rest of the square (rows 5-14, columns 11-14), its ring 24 px. Prediction: the 8 x 8's
    # ring in the labelled columns, 12 px; shared: (6, 11) and (13, 11).
    assert (metric.intersection[1], metric.union[1]) == (2, 34)
    assert per_class[1] == pytest.approx(2 / 34)


def test_batches_accumulate_and_shapes_must_agree():
    metric = BoundaryIoU(2, width=1)
    metric.update(np.stack([square(), square()]), np.stack([square(), square(top=6, left=6, side=8)]))
    assert metric.intersection[1] == 36 and metric.union[1] == 36 + 36 + 28
    with pytest.raises(ValueError, match="prediction"):
        metric.update(np.zeros((4, 4)), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="width"):
        BoundaryIoU(2, width=0)
