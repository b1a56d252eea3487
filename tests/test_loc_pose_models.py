"""Classification + localization, pose regression, their losses and backbones: shapes, losses, freezing, flips,
drawings, config errors, and each model overfitting a tiny batch."""
import inspect

import numpy as np
import pytest
import torch

from detseg.data.records import LSP_JOINTS
from detseg.errors import ConfigError
from detseg.losses import box_regression_loss, coordinate_loss
from detseg.models.backbones import TinyConvNet, torchvision_backbone
from detseg.models.base import SCENES_MEAN, SCENES_STD
from detseg.models.localization import classify_localize, pose_regression
from detseg.models.localization.classify_localize import (
    ClassifyLocalize, boxes_to_normalized, boxes_to_pixels, draw_localization,
)
from detseg.models.localization.pose_regression import PoseRegressor, draw_pose


def single_object_batch(count=4, size=32, seed=0):
    """One filled rectangle per noisy image, class = which colour channel it lights up (3 classes).

    Returns images (N, 3, H, W), labels (N,), boxes (N, 4) normalised (cx, cy, w, h).
    """
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 0.3, (count, 3, size, size)).astype(np.float32)
    labels, boxes = [], []
    for n in range(count):
        w, h = rng.integers(size // 4, size // 2, 2)
        x, y = rng.integers(0, size - w), rng.integers(0, size - h)
        label = n % 3
        images[n, label, y:y + h, x:x + w] += 2.0
        labels.append(label)
        boxes.append([x, y, x + w, y + h])
    boxes = boxes_to_normalized(torch.tensor(boxes, dtype=torch.float32), size, size)
    return torch.from_numpy(images), torch.tensor(labels), boxes


def stick_figure_batch(count=4, size=32, seed=0):
    """Noisy images with a bright dot at each of 14 random joints; returns images, joints (N, 14, 2) normalised
    and visibility (N, 14) with two joints unlabeled per image."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 0.3, (count, 3, size, size)).astype(np.float32)
    joints = rng.integers(2, size - 2, (count, 14, 2))
    for n in range(count):
        for j, (x, y) in enumerate(joints[n]):
            images[n, j % 3, y - 1:y + 2, x - 1:x + 2] += 2.0
    visible = np.ones((count, 14), dtype=np.int64) * 2
    visible[:, :2] = 0
    return torch.from_numpy(images), torch.from_numpy(joints / size).float(), torch.from_numpy(visible)


def as_model_input(normalized):
    """Normalised images -> the [0, 1] images that the model's own transform normalises back to them."""
    mean = torch.tensor(SCENES_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(SCENES_STD).view(1, 3, 1, 1)
    return normalized * std + mean


def localization_targets(labels, boxes_normalized, size):
    """Contract targets for ``single_object_batch``: per image ``{"labels": (1,), "boxes": (1, 4) xyxy pixels}``."""
    boxes = boxes_to_pixels(boxes_normalized, size, size)
    return [{"labels": labels[n:n + 1], "boxes": boxes[n:n + 1]} for n in range(len(labels))]


def pose_targets(joints_normalized, visible, size):
    """Contract targets for ``stick_figure_batch``: per image ``{"keypoints": (1, 14, 3)}`` pixels + visibility."""
    keypoints = torch.cat([joints_normalized * size, visible[..., None].float()], dim=-1)
    return [{"keypoints": keypoints[n:n + 1], "boxes": torch.tensor([[0.0, 0.0, size, size]])}
            for n in range(len(keypoints))]


def train_steps(loss_fn, parameters, steps, lr=3e-3):
    """Plain Adam on one fixed batch; returns the first loss and the mean of the last five."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], sum(losses[-5:]) / 5


# --- losses ------------------------------------------------------------------------------------------------------

def test_regression_losses_on_known_numbers():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float64)
    target = torch.tensor([[0.5, 0.3, 0.2, 0.6]], dtype=torch.float64)      # errors 0, 0.2, 0, 0.4
    assert box_regression_loss(pred, target, "l2").item() == pytest.approx(0.04 + 0.16)
    assert box_regression_loss(pred, target, "l1").item() == pytest.approx(0.2 + 0.4)
    # smooth L1 with beta 0.3: 0.5 * 0.2**2 / 0.3 (quadratic) + (0.4 - 0.15) (linear)
    assert box_regression_loss(pred, target, "smooth_l1", beta=0.3).item() == pytest.approx(0.02 / 0.3 + 0.25)
    with pytest.raises(ConfigError, match="l2, l1, smooth_l1"):
        box_regression_loss(pred, target, "huber")


def test_coordinate_loss_counts_only_weighted_items():
    pred = torch.zeros(2, 3, 2)
    target = torch.ones(2, 3, 2)
    target[0, 0] = 100.0                                    # a wild value on an unlabeled joint
    weight = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert coordinate_loss(pred, target, "l1", weight=weight).item() == pytest.approx(2.0)


# --- backbones ---------------------------------------------------------------------------------------------------

def test_tiny_convnet_stride_and_channels():
    net = TinyConvNet(width=8, depth=3)
    features = net(torch.randn(2, 3, 32, 40))
    assert features.shape == (2, net.out_channels, 4, 5) and net.stride == 8 and net.out_channels == 64
    assert [f.shape[-1] for f in net.forward_stages(torch.randn(1, 3, 32, 32))] == [32, 16, 8, 4]


def test_torchvision_backbones_are_random_and_shaped():
    trunk = torchvision_backbone("resnet18")
    assert trunk(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2) and trunk.out_channels == 512
    pyramid = torchvision_backbone("resnet18", fpn=True)
    levels = pyramid(torch.randn(1, 3, 64, 64))
    assert pyramid.out_channels == 256 and list(levels) == ["0", "1", "2", "3", "pool"]
    assert [levels[k].shape[-1] for k in levels] == [64 // s for s in pyramid.strides]
    with pytest.raises(ConfigError, match="pretrained weights are not used"):
        torchvision_backbone("resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(ConfigError, match="resnet18"):
        torchvision_backbone("vgg16")


# --- classification + localization -------------------------------------------------------------------------------

@pytest.mark.parametrize("box_head, box_shape", [("agnostic", (2, 4)), ("per_class", (2, 7, 4))])
def test_classify_localize_outputs(box_head, box_shape):
    model = ClassifyLocalize(num_classes=7, width=4, depth=2, box_head=box_head)
    outputs = model.outputs(torch.randn(2, 3, 48, 40))
    assert outputs["logits"].shape == (2, 7) and outputs["boxes"].shape == box_shape
    assert outputs["boxes"].min() >= 0 and outputs["boxes"].max() <= 1
    predictions = model.eval()(list(torch.rand(2, 3, 48, 40)))
    assert len(predictions) == 2
    for prediction in predictions:
        assert prediction["boxes"].shape == (1, 4) and prediction["labels"].shape == (1,)
        assert prediction["scores"].shape == (1,) and 0 <= prediction["scores"].item() <= 1
        assert 0 <= prediction["labels"].item() < 7
        boxes = prediction["boxes"]                                       # xyxy in the 48 x 40 image's pixels
        assert boxes.min() >= 0 and boxes[:, 0::2].max() <= 40 + 1e-4 and boxes[:, 1::2].max() <= 48 + 1e-4


def test_per_class_box_loss_trains_only_the_true_class_box():
    model = ClassifyLocalize(num_classes=5, width=4, depth=2, box_head="per_class")
    boxes = torch.rand(3, 5, 4, requires_grad=True)
    labels = torch.tensor([0, 3, 3])
    loss = model.loss({"logits": torch.randn(3, 5), "boxes": boxes}, labels, torch.rand(3, 4))
    loss["box"].backward()
    touched = boxes.grad.abs().sum(dim=2) > 0                             # (N, K): which boxes got a gradient
    assert torch.equal(touched, torch.nn.functional.one_hot(labels, 5).bool())


def test_box_weight_scales_only_the_box_loss():
    outputs = {"logits": torch.randn(2, 3), "boxes": torch.rand(2, 4)}
    labels, gt = torch.tensor([1, 2]), torch.rand(2, 4)
    one = ClassifyLocalize(num_classes=3, width=4, depth=1, box_weight=1.0, box_loss="l2").loss(outputs, labels, gt)
    five = ClassifyLocalize(num_classes=3, width=4, depth=1, box_weight=5.0, box_loss="l2").loss(outputs, labels, gt)
    assert five["box"].item() == pytest.approx(5 * one["box"].item()) and five["cls"] == one["cls"]
    assert one["box"].item() == pytest.approx(((outputs["boxes"] - gt) ** 2).sum(1).mean().item())


def test_freeze_backbone_trains_heads_only_and_keeps_batch_norm_statistics():
    images, labels, boxes = single_object_batch()
    pixels, targets = as_model_input(images), localization_targets(labels, boxes, 32)
    model = ClassifyLocalize(num_classes=3, width=4, depth=2, image_size=32)
    model.freeze_backbone(True)
    model.train()
    backbone_before = {k: v.clone() for k, v in model.features.backbone.state_dict().items()}
    head_before = model.box_head.weight.clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    train_steps(lambda: sum(model(pixels, targets).values()), trainable, steps=2)
    assert not model.features.backbone.training                      # batch norm frozen even in train mode
    assert all(torch.equal(v, backbone_before[k]) for k, v in model.features.backbone.state_dict().items())
    assert not torch.equal(model.box_head.weight, head_before)
    model.freeze_backbone(False)
    assert model.features.backbone.training
    train_steps(lambda: sum(model(pixels, targets).values()), model.parameters(), steps=1)
    assert not torch.equal(model.features.backbone.stem[0].weight, backbone_before["stem.0.weight"])


@pytest.mark.parametrize("box_head, box_loss", [("agnostic", "l2"), ("per_class", "smooth_l1")])
def test_classify_localize_overfits_a_tiny_batch(box_head, box_loss):
    images, labels, boxes = single_object_batch()
    pixels, targets = as_model_input(images), localization_targets(labels, boxes, 32)
    torch.manual_seed(0)
    model = ClassifyLocalize(num_classes=3, width=8, depth=3, hidden=64, box_head=box_head, box_loss=box_loss,
                             image_size=32)
    # The contract's training path is the bare network's loss on the normalised batch.
    losses = model(pixels, targets)
    direct = model.loss(model.outputs(images), labels, boxes)
    assert all(losses[key].item() == pytest.approx(direct[key].item(), rel=1e-4, abs=1e-6) for key in direct)
    loss_fn = lambda: sum(model(pixels, targets).values())  # noqa: E731
    first, last = train_steps(loss_fn, model.parameters(), steps=100)
    assert last < first / 10
    model.eval()
    predictions = model(pixels)
    assert torch.equal(torch.cat([prediction["labels"] for prediction in predictions]), labels)


def test_box_conversions_round_trip_and_drawing():
    xyxy = torch.tensor([[4.0, 8.0, 20.0, 16.0]])
    normalized = boxes_to_normalized(xyxy, height=32, width=40)
    assert torch.allclose(normalized, torch.tensor([[0.3, 0.375, 0.4, 0.25]]))
    assert torch.allclose(boxes_to_pixels(normalized, 32, 40), xyxy)
    image = torch.zeros(3, 32, 40, dtype=torch.uint8)
    drawn = draw_localization(image, xyxy[0], "square 0.9", gt_box_xyxy=torch.tensor([1.0, 1.0, 10.0, 10.0]))
    assert drawn.shape == image.shape and drawn.dtype == torch.uint8
    assert drawn[:, 8, 4:21].sum() > 0 and drawn[:, 1, 1:11].sum() > 0 and drawn[:, 24, 30].sum() == 0


# --- pose --------------------------------------------------------------------------------------------------------

def test_pose_outputs_and_loss_skips_unlabeled_joints():
    model = PoseRegressor(width=4, depth=2, loss="l2")
    pred = model.joints(torch.randn(2, 3, 40, 40))
    assert pred.shape == (2, 14, 2) and pred.min() >= 0 and pred.max() <= 1
    predictions = model.eval()(list(torch.rand(2, 3, 48, 40)))
    assert len(predictions) == 2
    for prediction in predictions:                                        # joints in the 48 x 40 image's pixels
        keypoints = prediction["keypoints"]
        assert keypoints.shape == (1, 14, 3) and keypoints[..., :2].min() >= 0
        assert keypoints[..., 0].max() <= 40 + 1e-4 and keypoints[..., 1].max() <= 48 + 1e-4
    gt = torch.rand(2, 14, 2)
    visible = torch.full((2, 14), 2)
    visible[0, 5] = 0
    moved = gt.clone()
    moved[0, 5] = 50.0                                                    # unlabeled: must not matter
    assert model.loss(pred, gt, visible)["joints"] == model.loss(pred, moved, visible)["joints"]
    assert model.loss(pred, gt, visible)["joints"] != model.loss(pred, gt, torch.full((2, 14), 2))["joints"]


def test_pose_regressor_overfits_a_tiny_batch():
    images, joints, visible = stick_figure_batch()
    pixels, targets = as_model_input(images), pose_targets(joints, visible, 32)
    torch.manual_seed(0)
    model = PoseRegressor(width=8, depth=3, hidden=64, loss="l1", image_size=32)
    # The contract's training path is the bare network's loss on the normalised batch.
    assert model(pixels, targets)["joints"].item() == pytest.approx(
        model.loss(model.joints(images), joints, visible)["joints"].item(), rel=1e-4)
    first, last = train_steps(lambda: model(pixels, targets)["joints"], model.parameters(), steps=100)
    assert last < first / 5


def test_flipping_joints_mirrors_x_and_swaps_sides():
    """The data sets' flip (transforms v2 on KeyPoints + the LSP left/right swap) on a pose target."""
    from detseg.data.records import LSP_FLIP
    from detseg.data.transforms import RandomHorizontalFlipWithJoints, unwrap_target, wrap_target

    width = 20
    flip = RandomHorizontalFlipWithJoints(LSP_FLIP, p=1.0)

    def flipped_of(joints):
        image = torch.zeros(3, 16, width, dtype=torch.uint8)
        _, target = flip(image, wrap_target({"keypoints": joints[None]}, (16, width)))
        return unwrap_target(target, (16, width))["keypoints"][0]

    keypoints = torch.stack([torch.arange(14.0), torch.arange(14.0) + 1, torch.full((14,), 2.0)], dim=1)   # (14, 3)
    flipped = flipped_of(keypoints)
    r_ankle, l_ankle = LSP_JOINTS.index("r_ankle"), LSP_JOINTS.index("l_ankle")
    neck = LSP_JOINTS.index("neck")
    assert flipped[r_ankle].tolist() == [width - 1 - keypoints[l_ankle, 0].item(), keypoints[l_ankle, 1].item(), 2]
    assert flipped[neck, 0] == width - 1 - keypoints[neck, 0]
    assert torch.equal(flipped_of(flipped), keypoints)                    # flipping twice is the identity
    # Agrees with flipping the image: a dot at the left wrist lands where the flipped right wrist says.
    image = torch.zeros(1, 16, width)
    x, y = keypoints[LSP_JOINTS.index("l_wrist"), :2].long().tolist()
    image[0, y, x] = 1
    fx, fy = flipped[LSP_JOINTS.index("r_wrist"), :2].long().tolist()
    assert image.flip(-1)[0, fy, fx] == 1


def test_draw_pose_draws_the_skeleton():
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    keypoints = torch.tensor([[5.0 + 2 * j, 5.0 + 2 * j] for j in range(14)])
    drawn = draw_pose(image, keypoints)
    assert drawn.shape == image.shape and drawn[:, 20, 20].sum() > 0 and drawn[:, 5, 35].sum() == 0
    hidden = draw_pose(image, keypoints, visible=torch.zeros(14))
    assert hidden.sum() == 0


# --- knobs -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module, model_class", [(classify_localize, ClassifyLocalize),
                                                 (pose_regression, PoseRegressor)])
def test_constructor_defaults_are_the_declared_defaults(module, model_class):
    signature = inspect.signature(model_class.__init__).parameters
    assert {key: signature[key].default for key in module.DEFAULTS} == module.DEFAULTS
    assert isinstance(model_class.build(7), model_class)


def test_localization_config_errors_are_clear():
    with pytest.raises(ConfigError, match="box_loss=huber: must be one of l2, l1, smooth_l1"):
        ClassifyLocalize(box_loss="huber")
    with pytest.raises(ConfigError, match="box_head=both: must be one of agnostic, per_class"):
        ClassifyLocalize(box_head="both")
    with pytest.raises(ConfigError, match="box_weight=-1"):
        ClassifyLocalize(box_weight=-1)
    with pytest.raises(ConfigError, match="backbone=vgg: must be one of tiny, resnet18, resnet50"):
        PoseRegressor(backbone="vgg")
    with pytest.raises(ConfigError, match="loss=smooth_l1: must be one of l2, l1"):
        PoseRegressor(loss="smooth_l1")
    with pytest.raises(ConfigError, match="unknown config key 'box_wieght'"):
        ClassifyLocalize.build(7, box_wieght=2.0)
