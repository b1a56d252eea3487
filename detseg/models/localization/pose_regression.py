"""Human pose as regression: 14 joints, 28 numbers, straight out of a CNN's feature vector (the lecture's DeepPose).

Once the set of things to locate is fixed (always 14 LSP joints), localization is just more regressed numbers: the
feature vector feeds one linear layer with 2 x 14 outputs, squashed to [0, 1] as fractions of the image width and
height, trained with an L2 or L1 loss over the joints that are labeled (invisible or unannotated joints carry no
target). Quality is PCK: the share of joints within 0.2 of the person box's larger side of the truth.

Joints follow the LSP order of :data:`detseg.data.records.LSP_JOINTS`; a horizontal flip of the image must also swap
left and right joints (the data sets' augmentation does, :mod:`detseg.data.transforms`), or the flipped "right
ankle" label would sit on the left ankle.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.utils import draw_keypoints

from ...config import Option
from ...data.records import LSP_FLIP, LSP_JOINTS, LSP_SKELETON
from ...losses import coordinate_loss
from .. import build_with_options, check_knobs, defaults_of
from ..backbones import FEATURE_OPTIONS, FeatureVector
from ..base import DetsegModel, Images, ImageTransform, stack_targets

NUM_JOINTS = len(LSP_JOINTS)
POSE_LOSSES = ("l2", "l1")

OPTIONS: dict[str, Option] = {
    **FEATURE_OPTIONS,
    "loss": Option("l1", "joint regression loss: l2|l1", choices=POSE_LOSSES),
}
DEFAULTS = defaults_of(OPTIONS)


class PoseRegressor(DetsegModel):
    """One person per image, 14 joints regressed.

    Training mode: ``model(images, targets)`` with ``targets[i]["keypoints"]`` (1, 14, 3) pixels + COCO visibility
    -> ``{"joints": loss}``. Eval mode: per image ``{"keypoints": (1, 14, 3)}`` (x, y in the image's pixels, 1) in LSP
    order. :meth:`joints` is the bare network: normalised (N, 3, S, S) -> (N, 14, 2) fractions (x / W, y / H).

    ``num_classes`` is accepted for the shared constructor signature and ignored (there is one kind of person).
    """

    def __init__(self, num_classes: int = 1, backbone: str = "tiny", width: int = 16, depth: int = 4,
                 stem_stride: int = 2, grid: int = 4, hidden: int = 256, loss: str = "l1", image_size: int = 128):
        super().__init__()
        self.transform = ImageTransform(image_size)
        knobs = check_knobs(OPTIONS, backbone=backbone, width=width, depth=depth, stem_stride=stem_stride,
                            grid=grid, hidden=hidden, loss=loss)
        self.loss_kind = knobs["loss"]
        self.features = FeatureVector(knobs["backbone"], knobs["width"], knobs["depth"], knobs["stem_stride"],
                                      knobs["grid"], knobs["hidden"])
        self.joint_head = nn.Linear(self.features.out_features, 2 * NUM_JOINTS)

    @classmethod
    def build(cls, num_classes: int = 1, image_size: int = 128, **knobs) -> "PoseRegressor":
        return build_with_options(cls, OPTIONS, num_classes, knobs, image_size=image_size)

    def freeze_backbone(self, flag: bool = True) -> None:
        """Stop (``True``) or resume (``False``) training the convolutional backbone."""
        self.features.freeze_backbone(flag)

    def joints(self, images: torch.Tensor) -> torch.Tensor:
        vector = self.features(images)                                    # (N, 3, H, W) -> (N, hidden)
        joints = torch.sigmoid(self.joint_head(vector))                   # (N, 28) in [0, 1]
        return joints.view(-1, NUM_JOINTS, 2)                             # (N, 28) -> (N, 14, 2)

    def training_losses(self, images: Images, targets: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.transform.batch(images)
        keypoints = stack_targets(self.transform.targets_to_input(targets, batch), "keypoints")[:, 0].float()
        height, width = batch.input_size
        truth = keypoints[..., :2] / keypoints.new_tensor([width, height])     # (N, 14, 3) px -> (N, 14, 2) in [0, 1]
        return self.loss(self.joints(batch.normalized), truth, keypoints[..., 2])

    def inference(self, images: Images) -> list[dict]:
        batch = self.transform.batch(images)
        height, width = batch.input_size
        pixels = self.joints(batch.normalized) * batch.normalized.new_tensor([width, height])   # (N, 14, 2) input px
        joints = torch.cat([pixels, torch.ones_like(pixels[..., :1])], dim=-1)                 # (N, 14, 3)
        return [{"keypoints": self.transform.keypoints_to_original(joints[i:i + 1], batch.original_sizes[i])}
                for i in range(len(joints))]

    def loss(self, pred: torch.Tensor, gt: torch.Tensor, visible: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"joints": mean over labeled joints of the L2/L1 distance}``.

        ``pred``, ``gt`` (N, 14, 2) normalised; ``visible`` (N, 14): COCO visibility flags or booleans, a joint
        counts when its flag is > 0 (labeled, visible or not).
        """
        return {"joints": coordinate_loss(pred, gt, self.loss_kind, weight=(visible > 0))}


def draw_pose(image: torch.Tensor, keypoints: torch.Tensor, visible: torch.Tensor | None = None,
              color: str = "yellow") -> torch.Tensor:
    """Image (3, H, W) uint8 with the skeleton drawn: ``keypoints`` (14, 2) or (P, 14, 2) in pixels.

    Bones touching a joint with ``visible`` <= 0 are left out.
    """
    keypoints = keypoints.reshape(-1, NUM_JOINTS, 2).float()
    visibility = None if visible is None else (visible.reshape(-1, NUM_JOINTS) > 0)
    return draw_keypoints(image, keypoints, connectivity=list(LSP_SKELETON), colors=color, radius=1, width=1,
                          visibility=visibility)
