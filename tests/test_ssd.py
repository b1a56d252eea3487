"""det/ssd: default boxes per level, matching, hard-negative mining, learning a few scenes; det/torchvision_ssd."""
import math

import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from detseg.errors import ConfigError
from detseg.models.detection.ssd import DefaultBoxes, batched_box_iou, hard_negatives, match_default_boxes

from .detection_support import fit, objects_found, scene_batch, tiny_detector

SIZES, RATIOS = (10, 20, 40, 80, 128), [(1.0, 2.0, 0.5)] * 4
MAPS = [(16, 16), (8, 8), (4, 4), (2, 2)]           # the tiny backbone's stride 8 and three extra levels, at 128 px
EMPTY = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
         "iscrowd": torch.zeros(0, dtype=torch.long)}


def _sides(boxes):
    return boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]


def test_default_boxes_per_level_counts_centres_and_sizes():
    default_boxes = DefaultBoxes(SIZES, RATIOS)
    assert default_boxes.boxes_per_location == [4, 4, 4, 4]
    levels = default_boxes.per_level(MAPS, (128, 128))
    for level, ((height, width), boxes) in enumerate(zip(MAPS, levels)):
        stride = 128 / width
        assert boxes.shape == (height * width * 4, 4)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        assert torch.allclose(centres[0], torch.tensor([stride / 2, stride / 2]))             # first cell's centre
        assert torch.allclose(centres[4], torch.tensor([1.5 * stride, stride / 2]))           # then along x
        assert torch.allclose(centres[-1], torch.tensor([128 - stride / 2, 128 - stride / 2]))
        widths, heights = _sides(boxes[:4])                   # one cell: ratios 1, 2, 0.5 at s_k, then sqrt(s_k s_k+1)
        size, between = SIZES[level], math.sqrt(SIZES[level] * SIZES[level + 1])
        assert torch.allclose(widths, torch.tensor([size, size / 2 ** 0.5, size * 2 ** 0.5, between]))
        assert torch.allclose(heights, torch.tensor([size, size * 2 ** 0.5, size / 2 ** 0.5, between]))
    everything = default_boxes(MAPS, (128, 128))
    assert len(everything) == 4 * (256 + 64 + 16 + 4) and default_boxes(MAPS, (128, 128)) is everything   # cached


def test_the_model_lays_its_default_boxes_out_like_its_head():
    model = tiny_detector("det/ssd")                        # 64 px: maps 8x8, 4x4, 2x2, 1x1
    _, _, outputs = model.outputs(torch.zeros(2, 3, 64, 64))
    boxes = model.default_boxes(outputs.feature_sizes, (64, 64))
    assert outputs.feature_sizes == ((8, 8), (4, 4), (2, 2), (1, 1))
    assert outputs.class_logits.shape == (2, len(boxes), 8) and outputs.deltas.shape == (2, len(boxes), 4)
    with pytest.raises(ConfigError, match="box_sizes"):
        tiny_detector("det/ssd", box_sizes="10,20,40")
    with pytest.raises(ConfigError, match="box_ratios"):
        tiny_detector("det/ssd", box_ratios="1,2;1")


def test_every_ground_truth_gets_a_default_box_even_tiny_thin_or_shared_ones():
    boxes = DefaultBoxes(SIZES, RATIOS)(MAPS, (128, 128))
    gt = torch.tensor([[20.0, 20.0, 50.0, 50.0],       # an ordinary object
                       [61.0, 61.0, 63.0, 64.0],       # 2 x 3 px: IoU far below 0.5 with every default box
                       [4.0, 100.0, 124.0, 104.0],     # a 120 x 4 px stick
                       [90.0, 10.0, 100.0, 20.0],      # two identical boxes: the same best default box
                       [90.0, 10.0, 100.0, 20.0]])
    iou = batched_box_iou(gt[None], boxes)                                              # (1, G, P)
    assert torch.allclose(iou[0], box_iou(gt, boxes))
    matches = match_default_boxes(iou, torch.ones(1, len(gt), dtype=torch.bool))[0]
    assert set(matches[matches >= 0].tolist()) == set(range(len(gt)))
    good = iou[0].max(dim=0).values >= 0.5
    assert bool((matches[good] >= 0).all())                                             # IoU >= 0.5: positive
    # Padding rows are never matched, and an image without objects is all background.
    padded = torch.cat([gt[:1], torch.zeros(1, 4)])[None]
    matches = match_default_boxes(batched_box_iou(padded, boxes), torch.tensor([[True, False]]))
    assert set(matches[matches >= 0].tolist()) == {0}
    empty = match_default_boxes(torch.zeros(2, 0, len(boxes)), torch.zeros(2, 0, dtype=torch.bool))
    assert empty.shape == (2, len(boxes)) and bool((empty == -1).all())


def test_hard_negative_mining_keeps_three_negatives_per_positive_the_hardest_ones():
    generator = torch.Generator().manual_seed(0)
    loss = torch.rand(3, 200, generator=generator)
    positive = torch.zeros(3, 200, dtype=torch.bool)
    positive[0, :5] = True                   # 5 positives -> 15 negatives
    positive[2, :150] = True                 # 150 positives, only 50 negatives left -> all 50
    negatives = hard_negatives(loss, positive, ratio=3, min_negatives=4)
    assert negatives.sum(dim=1).tolist() == [15, 4, 50]   # image 1 has no objects: its min_negatives hardest
    assert not bool((negatives & positive).any())
    for image in range(2):
        background = loss[image].masked_fill(positive[image], -1)
        hardest = background.topk(int(negatives[image].sum())).indices
        assert set(torch.nonzero(negatives[image]).squeeze(1).tolist()) == set(hardest.tolist())
    assert hard_negatives(loss, positive, ratio=3, min_negatives=0)[1].sum() == 0        # the paper's rule


def test_an_image_without_objects_gives_a_finite_loss_and_trains_the_background():
    model = tiny_detector("det/ssd")
    images, targets = scene_batch(range(1), seed=3)
    for batch in ([EMPTY, EMPTY], [targets[0], EMPTY]):
        model.zero_grad()
        losses = model(torch.cat([images, images]) if len(batch) == 2 else images, batch)
        assert set(losses) == {"ssd_class", "ssd_box"}
        assert all(torch.isfinite(value) for value in losses.values())
        assert float(losses["ssd_class"].detach()) > 0
        sum(losses.values()).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()
    losses = model(torch.zeros(2, 3, 64, 64), [EMPTY, EMPTY])
    assert float(losses["ssd_box"].detach()) == 0.0 and float(losses["ssd_class"].detach()) > 0
    losses["ssd_class"].backward()
    assert model.head.convs[0].weight.grad.abs().sum() > 0


def test_ssd_overfits_a_few_scenes_and_finds_their_objects():
    images, targets = scene_batch(range(4), seed=3)
    model = tiny_detector("det/ssd", box_sizes="7,16,32,56,72")     # the default sizes halved, for 64 px scenes
    first, last = fit(model, images, targets, steps=100)
    assert last < 0.1 * first, (first, last)
    model.eval()
    with torch.no_grad():
        found, total = objects_found(model(images), targets)
    assert found >= 0.8 * total, (found, total)


def test_torchvision_ssd_uses_the_same_feature_maps_and_default_boxes():
    ours, reference = tiny_detector("det/ssd"), tiny_detector("det/torchvision_ssd")
    assert type(reference.detector.backbone) is type(ours.backbone)
    assert reference.detector.transform.min_size == (64,) and reference.detector.transform.image_mean == [0.5] * 3
    with torch.no_grad():
        maps = list(reference.detector.backbone.eval()(torch.zeros(1, 3, 64, 64)).values())
    theirs = reference.detector.anchor_generator(ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)]), maps)[0]
    mine = ours.default_boxes([tuple(m.shape[-2:]) for m in maps], (64, 64))
    assert theirs.shape == mine.shape
    assert torch.allclose(torch.unique(theirs.round(decimals=3), dim=0), torch.unique(mine.round(decimals=3), dim=0))


def test_torchvision_ssd_trains_a_step_and_predicts_in_the_contract_format():
    model = tiny_detector("det/torchvision_ssd").train()
    images, targets = scene_batch(range(2), seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = model(images, [targets[0], EMPTY])
    assert set(losses) == {"bbox_regression", "classification"}
    assert all(torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()
    optimizer.step()
    model.eval()
    assert model.training_losses(images, targets) == {}
    with torch.no_grad():
        detections = model(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8))
    assert len(detections) == 3
    for image in detections:
        assert image["boxes"].shape[1] == 4
        assert len(image["scores"]) == len(image["labels"]) == len(image["boxes"])
        assert image["labels"].dtype == torch.int64 and bool((image["labels"] >= 1).all())
        assert bool((image["boxes"] >= 0).all()) and bool((image["boxes"] <= 64).all())


@pytest.mark.parametrize("name", ["det/ssd", "det/yolo"])
def test_single_shot_convolutions_run_channels_last_unless_turned_off(name):
    """channels_last=true (the default) lays every convolution's weights out channels-last, backbone and head;
    false leaves PyTorch's default layout (the single-shot base class once reset det/ssd's to it)."""
    def weights(model):   # 3 x 3 kernels: a 1 x 1 kernel's weight is contiguous in both layouts
        return [p for module in (model.backbone, model.head) for p in module.parameters()
                if p.dim() == 4 and p.shape[-1] > 1]

    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
               for w in weights(tiny_detector(name)))
    assert all(w.is_contiguous() and not w.is_contiguous(memory_format=torch.channels_last)
               for w in weights(tiny_detector(name, channels_last=False)))
