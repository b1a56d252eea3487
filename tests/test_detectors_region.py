"""R-CNN, sliding-window detection and SPP-net: crop-and-warp, the spatial pyramid, the window count, overfitting
tiny scenes, empty images, output format and stage timing."""
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from detseg.config import resolve
from detseg.errors import ConfigError
from detseg.models.detection import heads, rcnn, sliding_window, spp_net
from detseg.models.detection.heads import ROI_HEAD_OPTIONS
from detseg.ops.proposals import selective_search

from .detection_support import scene_batch

SIZE = 64
CROPS = {"width": 8, "warp_size": 16, "depth": 2, "head_hidden": 64, "rois_per_image": 32}
TINY = {
    rcnn: CROPS,
    sliding_window: {**CROPS, "window_scales": "12,24,48"},
    spp_net: {"width": 8, "head_hidden": 64, "rois_per_image": 32},
}


@pytest.fixture(autouse=True)
def proposal_cache(tmp_path, monkeypatch):
    """Selective Search results of these tests go to a fresh directory, never to the user's cache."""
    monkeypatch.setenv("DETSEG_CACHE", str(tmp_path / "cache"))


def tiny_model(module, **overrides):
    config = resolve(module.OPTIONS, {**TINY[module], **overrides})
    return module.build(config, {"num_classes": 8, "image_size": SIZE})


@pytest.fixture(scope="module")
def scenes():
    """Four 64 px scenes, their targets, and proposals: Selective Search plus jittered copies of the true boxes.

    The jittered boxes make sure every object has proposals at IoU >= 0.5 (Selective Search on 64 px images misses
    some), so the tests check the detectors rather than the proposal recall.
    """
    images, targets = scene_batch(range(4), size=SIZE)
    generator = torch.Generator().manual_seed(0)
    proposals = []
    for image, target in zip(images, targets):
        boxes = target["boxes"]
        sizes = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2).repeat(6, 1)                       # (6G, 4)
        jittered = boxes.repeat(6, 1) + 0.15 * sizes * torch.randn(sizes.shape, generator=generator)
        proposals.append(torch.cat([torch.from_numpy(selective_search(image, "fast")), jittered.clamp(0, SIZE)]))
    return images, targets, proposals


def with_proposals(targets, proposals):
    """The targets with precomputed ``proposals`` (P, 4) per image, as the Selective Search data sets feed them."""
    if proposals is None:
        return targets
    return [{**target, "proposals": boxes} for target, boxes in zip(targets, proposals)]


@contextmanager
def given_proposals(model, images, proposals):
    """Eval mode with ``proposals`` in place of the model's own Selective Search on ``images``."""
    search = model.proposer.compute

    def fixed(pixels):
        assert torch.equal(pixels.round(), images.float()), "the proposer sees the images as given (64 px, 0-255)"
        return proposals

    model.proposer.compute = fixed
    try:
        yield
    finally:
        model.proposer.compute = search


def train(model, images, targets, proposals, steps, lr=3e-3):
    """Adam on one fixed batch; returns the first total loss and the mean of the last five."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    targets = with_proposals(targets, proposals)
    totals = []
    for _ in range(steps):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    return totals[0], float(np.mean(totals[-5:]))


def matched_fraction(detections, targets, min_score=0.5):
    """Share of true boxes with a detection of their class at IoU > 0.5 and score > min_score, and the share of
    such confident detections that hit some true box of their class."""
    found, confident, correct = 0, 0, 0
    for result, target in zip(detections, targets):
        keep = result["scores"] > min_score
        boxes, labels = result["boxes"][keep], result["labels"][keep]
        same_class = labels[:, None] == target["labels"][None, :]                               # (D, G)
        hits = (box_iou(boxes, target["boxes"]) > 0.5) & same_class
        found += int(hits.any(dim=0).sum())
        confident += len(boxes)
        correct += int(hits.any(dim=1).sum())
    total = sum(len(target["boxes"]) for target in targets)
    return found / total, correct / max(1, confident)


# --- the pieces ---------------------------------------------------------------------------------------------------

def test_warp_crops_the_region_and_context_padding_shows_its_surroundings():
    image = torch.zeros(1, 3, 40, 40)
    image[0, 0, 10:30, 4:20] = 1.0                               # a red 16 x 20 rectangle
    box = torch.tensor([[4.0, 10.0, 20.0, 30.0]])
    regions = heads.regions_with_image_index([box])
    tight = heads.warp_regions(image, regions, warp_size=8)
    assert tight.shape == (1, 3, 8, 8)
    # Warped to a square, it is all rectangle (bilinear sampling blurs the outermost samples by a few percent).
    torch.testing.assert_close(tight[0, 0], torch.ones(8, 8), atol=0.05, rtol=0)
    torch.testing.assert_close(tight[0, 0, 1:-1, 1:-1], torch.ones(6, 6))
    assert tight[0, 1:].abs().max() == 0

    padded_box = heads.context_boxes(box, warp_size=8, context_padding=2)
    torch.testing.assert_close(padded_box, torch.tensor([[-4.0, 0.0, 28.0, 40.0]]))   # twice as big, same centre
    padded = heads.warp_regions(image, heads.regions_with_image_index([padded_box]), warp_size=8)
    # The box fills the central 8 - 2 * 2 pixels...
    torch.testing.assert_close(padded[0, 0, 2:6, 2:6], torch.ones(4, 4), atol=0.05, rtol=0)
    assert padded[0, 0, 0].max() == 0 and padded[0, 0, :, 0].max() == 0   # ...framed by its surroundings


def test_warped_crop_head_processes_regions_in_chunks_with_the_same_result():
    torch.manual_seed(0)
    head = heads.WarpedCropHead(num_classes=3, warp_size=16, width=4, depth=2, hidden=16, crop_chunk=1000).eval()
    images = torch.randn(2, 3, 32, 32)
    rois = [torch.tensor([[0.0, 0.0, 16.0, 16.0], [4.0, 6.0, 30.0, 20.0]]),
            torch.tensor([[1.0, 2.0, 9.0, 30.0], [0.0, 0.0, 32.0, 32.0], [10.0, 10.0, 20.0, 20.0]])]
    logits, deltas = head(images, rois, (32, 32))
    assert logits.shape == (5, 3) and deltas.shape == (5, 12)
    head.crop_chunk = 2
    chunked_logits, chunked_deltas = head(images, rois, (32, 32))
    torch.testing.assert_close(chunked_logits, logits)
    torch.testing.assert_close(chunked_deltas, deltas)
    # Each region is classified on its own: its scores do not depend on the other regions in the batch.
    alone, _ = head(images[1:], rois[1:2], (32, 32))
    torch.testing.assert_close(alone, logits[2:])
    with pytest.raises(ConfigError, match="context_padding"):
        heads.WarpedCropHead(num_classes=3, warp_size=16, context_padding=8)


def test_spatial_pyramid_pools_each_level_with_maxima_of_the_regions_window():
    features = torch.arange(2 * 8 * 8, dtype=torch.float32).view(1, 2, 8, 8)     # increasing right and down
    rois = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 8.0, 48.0, 40.0],     # image 64 px: map scale 1/8
                          [8.0, 8.0, 14.0, 14.0]])]                             # a 6 px box inside cell (1, 1)
    pooled = spp_net.spatial_pyramid_pool(features, rois, (64, 64), (1, 2, 4))
    assert pooled.shape == (3, 2 * (1 + 4 + 16))
    # Level 1: the maximum of each channel over the window = its bottom-right cell.
    torch.testing.assert_close(pooled[0, :2], features[0, :, 3, 3])
    torch.testing.assert_close(pooled[1, :2], features[0, :, 4, 5])
    one_cell = torch.cat([features[0, :, 1, 1].repeat_interleave(k * k) for k in (1, 2, 4)])
    torch.testing.assert_close(pooled[2], one_cell)                    # the 6 px box: its one cell in every bin
    # Level 2, first RoI, channel 0: the maxima of four 2 x 2 quadrants of cells 0..3.
    torch.testing.assert_close(pooled[0, 2:6], features[0, 0, [1, 1, 3, 3], [1, 3, 1, 3]])
    head = spp_net.SpatialPyramidHead(2, num_classes=4, levels=(1, 2, 4), hidden=16)
    logits, deltas = head(features, rois, (64, 64))
    assert logits.shape == (3, 4) and deltas.shape == (3, 16)


def test_options_share_the_fast_rcnn_tables_and_reject_bad_lists():
    for module in (rcnn, sliding_window, spp_net):
        for key in ("positive_fraction", "box_loss_weight", "score_thresh", "nms_thresh", "head_hidden"):
            assert module.OPTIONS[key] is ROI_HEAD_OPTIONS[key]
        assert "pool" not in module.OPTIONS and "pool_size" not in module.OPTIONS
    assert rcnn.OPTIONS["rois_per_image"].default == 64 and "ss_mode" in rcnn.OPTIONS
    assert "ss_mode" in spp_net.OPTIONS and "fpn" not in spp_net.OPTIONS and "ss_mode" not in sliding_window.OPTIONS
    assert "roi_channels" in spp_net.OPTIONS and "roi_channels" not in rcnn.OPTIONS
    assert spp_net.pyramid_levels("1, 2,4") == (1, 2, 4)
    with pytest.raises(ConfigError, match="pyramid"):
        tiny_model(spp_net, pyramid="1,2.5")
    with pytest.raises(ConfigError, match="window_scales"):
        tiny_model(sliding_window, window_scales="12,big")


def test_default_window_counts_per_image_size():
    config = resolve(sliding_window.OPTIONS, {})
    proposer = sliding_window.build_window_proposer(config)
    assert len(proposer.windows((128, 128), "cpu")) == 2016
    assert len(proposer.windows((64, 64), "cpu")) == 397


# --- training -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module, steps", [(rcnn, 80), (spp_net, 100)])
def test_selective_search_detectors_overfit_four_scenes_and_detect_their_objects(scenes, module, steps):
    images, targets, proposals = scenes
    torch.manual_seed(0)
    model = tiny_model(module)
    first, last = train(model, images, targets, proposals, steps)
    assert last < first / 3, (first, last)
    model.eval()
    with torch.no_grad(), given_proposals(model, images, proposals):
        detections = model(images)
    recall, precision = matched_fraction(detections, targets)
    assert recall >= 0.9 and precision >= 0.7, (recall, precision)


def test_sliding_windows_overfit_four_scenes(scenes):
    images, targets, _ = scenes
    torch.manual_seed(0)
    model = tiny_model(sliding_window)
    first, last = train(model, images, targets, None, steps=60)
    assert last < first / 3, (first, last)


@pytest.mark.parametrize("module", [rcnn, sliding_window, spp_net])
def test_empty_image_trains_with_zero_box_loss(scenes, module):
    images, _, proposals = scenes
    torch.manual_seed(0)
    model = tiny_model(module).train()
    empty = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64),
              "iscrowd": torch.zeros(0, dtype=torch.int64)}] * 2
    given = proposals[:2] if module is not sliding_window else None
    losses = model(images[:2], with_proposals(empty, given))
    assert set(losses) == {"roi_class", "roi_box"}
    assert losses["roi_box"].item() == 0.0 and torch.isfinite(losses["roi_class"])
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("module", [sliding_window, spp_net])
def test_output_format_and_stage_timing(scenes, module):
    images, _, proposals = scenes
    torch.manual_seed(0)
    model = tiny_model(module, score_thresh=0.0).eval()
    model.time_stages = True
    with torch.no_grad():
        if module is spp_net:
            with given_proposals(model, images[:2], proposals[:2]):
                detections = model(images[:2])
        else:
            detections = model(images[:2])
    assert len(detections) == 2
    for result in detections:
        assert set(result) == {"boxes", "scores", "labels"}
        assert 0 < len(result["boxes"]) <= 100
        assert result["boxes"].shape == (len(result["scores"]), 4) and result["labels"].dtype == torch.int64
        assert result["labels"].min() >= 1 and result["labels"].max() <= 7
        assert (result["boxes"] >= 0).all() and (result["boxes"] <= SIZE).all()
        assert (result["scores"][:-1] >= result["scores"][1:]).all()
    assert model.stage_seconds["per_region"] > 0 and model.stage_seconds["proposals"] > 0
    if module is spp_net:
        assert model.stage_seconds["shared_conv"] > 0


def test_rcnn_computes_and_caches_selective_search_for_new_images(scenes, tmp_path):
    images, _, _ = scenes
    torch.manual_seed(0)
    model = tiny_model(rcnn, proposal_cache=str(tmp_path), proposals_per_image=50, score_thresh=0.0).eval()
    model.time_stages = True
    with torch.no_grad():
        detections = model(images[:1])                                   # no proposals given: search them
    assert len(list(tmp_path.glob("ss-fast-*.npy"))) == 1
    cached = np.load(next(tmp_path.glob("ss-fast-*.npy")))
    assert 0 < len(cached) <= 50
    assert 0 < len(detections[0]["boxes"]) <= 100
    assert model.stage_seconds["proposals"] > 0 and model.stage_seconds["per_region"] > 0
