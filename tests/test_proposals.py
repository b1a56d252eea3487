"""detseg.ops.proposals: Selective Search on a synthetic image, the on-disk proposal cache, proposal recall."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from detseg.errors import ConfigError, DataError
from detseg.ops import proposals as proposals_module
from detseg.ops.proposals import ProposalCache, proposal_recall, selective_search

# Two coloured rectangles on a plain grey background, xyxy in pixels.
RECTANGLES = np.array([[8, 10, 40, 34], [44, 30, 76, 70]], dtype=np.float32)


def _two_rectangles(height: int = 80, width: int = 88, scale: int = 1) -> np.ndarray:
    image = np.full((height * scale, width * scale, 3), 128, dtype=np.uint8)
    for (x1, y1, x2, y2), colour in zip(RECTANGLES.astype(int) * scale, [(220, 30, 30), (30, 60, 210)]):
        image[y1:y2, x1:x2] = colour
    return image


def _best_iou_per_rectangle(boxes: np.ndarray, rectangles: np.ndarray) -> torch.Tensor:
    return box_iou(torch.from_numpy(rectangles), torch.from_numpy(boxes)).max(dim=1).values


@pytest.mark.parametrize("mode", ["fast", "quality"])
def test_selective_search_finds_both_rectangles(mode):
    boxes = selective_search(_two_rectangles(), mode)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 2
    assert len(np.unique(boxes, axis=0)) == len(boxes)                              # deduplicated
    assert (boxes[:, 2] - boxes[:, 0] >= 4).all() and (boxes[:, 3] - boxes[:, 1] >= 4).all()
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= 88).all() and (boxes[:, [1, 3]] <= 80).all()
    assert (_best_iou_per_rectangle(boxes, RECTANGLES) >= 0.7).all()


def test_selective_search_on_a_shrunk_image_returns_original_coordinates():
    boxes = selective_search(_two_rectangles(scale=3), "fast", max_side=100)       # 264 px wide, searched at 100
    assert boxes[:, 2].max() > 100                                                  # scaled back up
    assert (_best_iou_per_rectangle(boxes, RECTANGLES * 3) >= 0.7).all()
    assert len(selective_search(_two_rectangles(), "fast", max_proposals=3)) == 3


def test_selective_search_accepts_tensors_and_rejects_bad_input():
    image = _two_rectangles()
    from_tensor = selective_search(torch.from_numpy(image).permute(2, 0, 1), "fast")   # (3, H, W) like a dataset
    from_array = selective_search(image, "fast")
    # OpenCV's ranking is pseudo-random, so compare the sets of boxes
    assert np.array_equal(np.unique(from_tensor, axis=0), np.unique(from_array, axis=0))
    with pytest.raises(ConfigError, match="mode"):
        selective_search(image, "slow")
    with pytest.raises(DataError, match="uint8"):
        selective_search(image.astype(np.float32), "fast")


def test_cache_hits_on_second_call_without_recomputing(tmp_path, monkeypatch):
    cache = ProposalCache(tmp_path / "ss")
    image = _two_rectangles()
    first = cache.get(image, "fast")
    assert (cache.hits, cache.misses) == (0, 1)

    def fail(*args, **kwargs):
        raise AssertionError("selective search ran on a cache hit")

    monkeypatch.setattr(proposals_module, "selective_search", fail)
    second = cache.get(image.copy(), "fast")                   # same content, another array
    assert (cache.hits, cache.misses) == (1, 1)
    assert np.array_equal(first, second) and second.dtype == np.float32
    assert not list((tmp_path / "ss").glob("*.tmp"))          # atomic writes leave no temporary files
    # a fresh cache object on the same directory reads the same file
    assert np.array_equal(ProposalCache(tmp_path / "ss").get(image, "fast"), first)


def test_cache_keys_distinguish_mode_content_and_parameters(tmp_path):
    cache = ProposalCache(tmp_path)
    image = _two_rectangles()
    paths = {cache.path(image, "fast"), cache.path(image, "quality"), cache.path(image, "fast", max_side=50)}
    edited = image.copy()
    edited[0, 0] = 0
    paths.add(cache.path(edited, "fast"))
    assert len(paths) == 4

    fast = cache.get(image, "fast")
    quality = cache.get(image, "quality")
    assert (cache.hits, cache.misses) == (0, 2)
    assert len(list(tmp_path.glob("ss-*.npy"))) == 2
    assert len(quality) > 0 and len(fast) > 0
    assert np.array_equal(cache.get(image, "quality"), quality) and cache.hits == 1


def test_cache_recomputes_a_damaged_file(tmp_path):
    cache = ProposalCache(tmp_path)
    image = _two_rectangles()
    cache.path(image, "fast", max_proposals=2000, max_side=500, min_size=4.0).write_bytes(b"not a numpy file")
    boxes = cache.get(image, "fast")
    assert cache.misses == 1 and boxes.shape[1] == 4
    assert np.array_equal(cache.get(image, "fast"), boxes) and cache.hits == 1


def test_proposal_recall_hand_computed():
    gt = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float32),
          torch.tensor([[50.0, 50.0, 60.0, 60.0]]),
          np.zeros((0, 4), dtype=np.float32)]                                       # an image without objects
    proposals = [
        np.array([[0, 0, 10, 10], [20, 20, 30, 36]], dtype=np.float32),           # IoU 1.0 and 100/160 = 0.625
        torch.tensor([[50.0, 50.0, 60.0, 70.0], [0.0, 0.0, 5.0, 5.0]]),            # IoU 0.5 exactly
        np.array([[1, 1, 5, 5]], dtype=np.float32),
    ]
    result = proposal_recall(proposals, gt)
    assert result["recall_50"] == pytest.approx(1.0)
    assert result["recall_70"] == pytest.approx(1 / 3)
    assert result["mean_best_iou"] == pytest.approx((1.0 + 0.625 + 0.5) / 3)
    assert result["proposals_per_image"] == pytest.approx(5 / 3)
    assert result["num_gt"] == 3
    missed = proposal_recall([np.zeros((0, 4))], [np.array([[0, 0, 4, 4]])], thresholds=(0.3,))
    assert missed["recall_30"] == 0.0 and missed["mean_best_iou"] == 0.0
    assert math.isnan(proposal_recall([np.zeros((0, 4))], [np.zeros((0, 4))])["recall_50"])


def test_an_empty_cache_dir_means_no_cache(tmp_path, monkeypatch):
    from detseg.models.detection.proposers import SelectiveSearch

    monkeypatch.chdir(tmp_path)
    search = SelectiveSearch("fast", 50, cache_dir="")
    assert search.cache is None
    search.one(np.zeros((32, 32, 3), dtype=np.uint8))
    assert list(tmp_path.iterdir()) == []                 # nothing written into the working directory
