"""Augmentation knobs: crops and scale jitter keep boxes, masks, semantic maps and joints consistent; all off by
default."""
import pytest
import torch
from torchvision.ops import masks_to_boxes

from detseg import registry
from detseg.config import resolve
from detseg.data.transforms import AUGMENT_OPTIONS, IGNORE_LABEL, Augmentation, refit_instances
from detseg.errors import ConfigError

HEIGHT, WIDTH = 60, 84     # not square: crops keep the image's aspect ratio range
# (x0, y0, side) of square objects; the first ones sit in corners, so crops often cut them away entirely.
SQUARES = [(0, 0, 6), (WIDTH - 7, HEIGHT - 7, 7), (0, HEIGHT - 8, 8), (30, 20, 10), (50, 8, 12), (12, 30, 9)]


def _sample() -> tuple[torch.Tensor, dict]:
    """An image with square objects, each with a mask, a tight box, one joint at its centre, a caption and a
    unique label, plus the semantic map painted from the masks and a few proposals."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, HEIGHT, WIDTH), dtype=torch.uint8, generator=generator)
    masks = torch.zeros(len(SQUARES), HEIGHT, WIDTH, dtype=torch.uint8)
    semantic = torch.zeros(HEIGHT, WIDTH, dtype=torch.uint8)
    boxes, joints = [], []
    for row, (x0, y0, side) in enumerate(SQUARES):
        masks[row, y0:y0 + side, x0:x0 + side] = 1
        semantic[y0:y0 + side, x0:x0 + side] = row + 1
        boxes.append([x0, y0, x0 + side, y0 + side])                  # one past the last pixel, like the scenes'
        joints.append([[x0 + side / 2, y0 + side / 2, 2.0]])
    labels = torch.arange(1, len(SQUARES) + 1)
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": labels,
              "iscrowd": torch.zeros(len(SQUARES), dtype=torch.int64),
              "area": masks.flatten(1).sum(1).float(), "masks": masks, "keypoints": torch.tensor(joints),
              "semantic": semantic, "captions": [f"object {int(label)}" for label in labels],
              "proposals": torch.tensor([[0.0, 0.0, 20.0, 20.0], [60.0, 40.0, 84.0, 60.0], [10, 10, 70, 50]]),
              "image_id": 7, "size": (HEIGHT, WIDTH)}
    return image, target


def _check_consistent(image: torch.Tensor, target: dict, joint_slack: float = 1.0) -> None:
    """Everything a transformed sample must satisfy, whatever the crop."""
    assert image.shape == (3, HEIGHT, WIDTH) and image.dtype == torch.uint8      # fixed size: batches still stack
    count = len(target["boxes"])
    assert all(len(target[key]) == count for key in ("labels", "iscrowd", "area", "masks", "keypoints", "captions"))
    assert target["captions"] == [f"object {int(label)}" for label in target["labels"]]   # the same rows kept
    masks = target["masks"].bool()
    assert masks.shape == (count, HEIGHT, WIDTH) and masks.flatten(1).any(1).all()        # no empty instance left
    tight = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert (target["boxes"] - tight).abs().max() <= 1.0 if count else True
    sides = target["boxes"][:, 2:] - target["boxes"][:, :2]
    assert (sides >= 1).all()
    assert torch.equal(target["area"], masks.flatten(1).sum(1).float())
    # The semantic map moved exactly as the masks did (both nearest-neighbour); the border padding is "ignore".
    painted = torch.zeros(HEIGHT, WIDTH, dtype=torch.uint8)
    for mask, label in zip(masks, target["labels"]):
        painted[mask] = int(label)
    labeled = target["semantic"] != IGNORE_LABEL
    assert torch.equal(target["semantic"][labeled], painted[labeled])
    # Joints follow: an uncut square (not touching the border) still has its joint at its centre.
    for box, joint in zip(target["boxes"], target["keypoints"][:, 0]):
        inside = box[0] > 0 and box[1] > 0 and box[2] < WIDTH and box[3] < HEIGHT
        if inside:
            assert joint[2] == 2 and (joint[:2] - (box[:2] + box[2:]) / 2).abs().max() <= joint_slack
    proposals = target["proposals"]
    assert ((proposals[:, 2:] - proposals[:, :2]) >= 1).all()
    assert target["image_id"] == 7 and target["size"] == (HEIGHT, WIDTH)


@pytest.mark.parametrize("knobs, drops, joint_slack", [
    ({"random_crop": 0.2}, True, 1.0), ({"scale_jitter": "0.5,2.0"}, True, 1.0),
    ({"scale_jitter": "0.3,0.6"}, False, 1.0),           # zooming out only: every object stays, smaller
    # Two resamplings: a nearest-neighbour resize can shift a mask by up to a pixel (PyTorch's "nearest" takes the
    # top-left source pixel), and the second resize scales the first one's shift.
    ({"scale_jitter": (0.5, 1.5), "random_crop": 0.4, "color_jitter": 0.4}, True, 2.5),
    # torchvision flips points about pixel centres (x -> W - 1 - x) and boxes about edges (x -> W - x): 1 px that a
    # later zoom (here up to ~1.8x) enlarges.
    ({"hflip": True, "random_crop": 0.4}, True, 2.5)])
def test_geometry_keeps_boxes_masks_semantic_and_joints_consistent(knobs, drops, joint_slack):
    image, target = _sample()
    augment = Augmentation(**knobs)
    counts, changed = set(), 0
    for seed in range(16):
        out_image, out_target = augment(image, target, seed)
        _check_consistent(out_image, out_target, joint_slack)
        counts.add(len(out_target["boxes"]))
        changed += not torch.equal(out_target["boxes"], target["boxes"][:len(out_target["boxes"])])
    assert changed >= 12                             # the geometry really moved things
    # Some crops dropped instances (consistently across keys, as checked) - or none when only zooming out.
    assert (min(counts) < len(SQUARES)) == drops
    assert torch.equal(target["boxes"], _sample()[1]["boxes"])  # the input was not modified in place


def test_an_object_whose_mask_left_the_crop_goes_even_when_its_clamped_box_did_not():
    """An L-shaped object cut so that only the empty corner of its box remains: the clamped box is no object."""
    masks = torch.zeros(3, 20, 20, dtype=torch.uint8)
    masks[0, 2:6, 2:6] = 1                                           # a square, still there
    # masks[1]: the L, nothing of it left in the crop; masks[2]: an annotation that never had a mask (kept)
    target = {"boxes": torch.tensor([[2.0, 2.0, 6.0, 6.0], [10.0, 10.0, 20.0, 20.0], [0.0, 12.0, 5.0, 18.0]]),
              "labels": torch.tensor([1, 2, 3]), "masks": masks, "captions": ["square", "L", "box only"],
              "keypoints": torch.zeros(3, 1, 3), "area": torch.zeros(3)}
    refit = refit_instances(dict(target), had_mask=torch.tensor([True, True, False]))
    assert refit["labels"].tolist() == [1, 3] and refit["captions"] == ["square", "box only"]
    assert refit["boxes"].tolist() == [[2.0, 2.0, 6.0, 6.0], [0.0, 12.0, 5.0, 18.0]]
    assert refit["masks"].shape == (2, 20, 20) and refit["keypoints"].shape == (2, 1, 3)
    assert refit["area"].tolist() == [16.0, 30.0]                    # mask pixels, else the box's area


def test_zooming_out_pads_the_image_black_and_the_semantic_map_with_ignore():
    image, target = _sample()
    out_image, out_target = Augmentation(scale_jitter="0.5,0.5")(image, target, 3)
    padded = out_target["semantic"] == IGNORE_LABEL
    assert 0.6 < padded.float().mean() < 0.9                          # 3/4 of the area is new border
    assert (out_image[:, padded] == 0).all()
    assert len(out_target["boxes"]) == len(SQUARES)                   # nothing leaves when zooming out
    assert torch.allclose(out_target["area"], target["area"] / 4, rtol=0.35)


def test_same_seed_same_augmentation_different_seed_different():
    image, target = _sample()
    augment = Augmentation(hflip=True, scale_jitter="0.5,2.0", random_crop=0.3, color_jitter=0.4)
    first, again, other = augment(image, target, 11), augment(image, target, 11), augment(image, target, 12)
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(first[1][key], again[1][key]) for key in ("boxes", "masks", "keypoints", "semantic"))
    assert not torch.equal(first[0], other[0])


def test_color_jitter_changes_pixels_only():
    image, target = _sample()
    augment = Augmentation(color_jitter=0.5)
    for seed in range(4):
        out_image, out_target = augment(image, target, seed)
        assert out_image.shape == image.shape and not torch.equal(out_image, image)
        for key in ("boxes", "labels", "masks", "keypoints", "semantic", "proposals", "area"):
            assert torch.equal(out_target[key], target[key]), key
        assert out_target["captions"] == target["captions"]


def test_defaults_are_identity():
    image, target = _sample()
    defaults = {key: option.default for key, option in AUGMENT_OPTIONS.items()}
    augment = Augmentation(**defaults)
    assert not augment                                # falsy: data sets skip it
    out_image, out_target = augment(image, target, 0)
    assert out_image is image and out_target is target
    for name in ("det/faster_rcnn", "seg/fcn_fullres", "loc/classify_localize", "pose/regress"):
        config = resolve(registry.get(name).all_options())
        assert {key: config[key] for key in AUGMENT_OPTIONS} == defaults, name


def test_keep_instances_never_loses_the_one_object():
    """Localization and pose regress exactly one object: their crops are redrawn until it survives."""
    image, target = _sample()
    corner = {key: (value[:1] if key in ("boxes", "labels", "keypoints") else value) for key, value in target.items()
              if key in ("boxes", "labels", "keypoints")}
    augment = Augmentation(random_crop=0.1, keep_instances=True)
    cropped = 0
    for seed in range(12):
        out_image, out_target = augment(image, corner, seed)
        assert len(out_target["boxes"]) == 1 and len(out_target["labels"]) == 1
        assert out_target["keypoints"].shape == (1, 1, 3)
        cropped += not torch.equal(out_image, image)
    assert cropped >= 9, cropped       # redrawn crops that keep the corner object, rarely the uncropped fallback


@pytest.mark.parametrize("knobs", [{"scale_jitter": "2,1"}, {"scale_jitter": "0.5"}, {"scale_jitter": "a,b"},
                                   {"random_crop": 1.5}, {"color_jitter": -0.1}])
def test_bad_knobs_are_config_errors(knobs):
    with pytest.raises(ConfigError, match=next(iter(knobs))):
        Augmentation(**knobs)


def test_segmentation_task_passes_its_knobs_to_the_training_set():
    entry = registry.get("seg/fcn_fullres")
    config = resolve(entry.all_options(), {"train_size": 2, "val_size": 2, "image_size": 32, "random_crop": 0.5,
                                           "scale_jitter": "0.8,1.2"})
    bundle = entry.make_task(config).make_data(None, None)
    assert bundle.train.augment and bundle.train.augment.geometric and not bundle.val.augment
    image, target = bundle.train[0]
    assert image.shape == (3, 32, 32) and target["semantic"].shape == (32, 32)
