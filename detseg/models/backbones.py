"""Backbones: the convolutional trunk every method starts from, and the pooled fully-connected trunk of the
regression heads.

* :class:`TinyConvNet` - the default for the 128 px scenes: a few conv-BN-ReLU stages, each halving the resolution.
  Small enough to train from scratch in minutes on two CPU cores.
* :func:`torchvision_backbone` - ResNet-18/50 (optionally with a feature pyramid) from ``torchvision.models``,
  always randomly initialised: nothing is downloaded.
* :class:`PooledMLP` - the lecture's "CNN features -> fully-connected vector" trunk of classification+localization
  and pose regression: pool the feature map to a fixed small grid (keeping *where* things are, which a global
  average would throw away), flatten, one hidden fully-connected layer. :class:`FeatureVector` chains a backbone
  and it, and can freeze the backbone for the lecture's "train the heads first, then fine-tune" schedule.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..config import Option
from ..errors import ConfigError

BACKBONES = ("tiny", "resnet18", "resnet50")
_RESNET_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    """The building block of every small network here: convolution (no bias, BN has one), batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def stage_widths(width: int, depth: int, max_multiplier: int = 8) -> list[int]:
    """Channels at resolution levels 0..depth: doubling with every halving, capped at ``max_multiplier * width``.

    The cap keeps the deepest stages (where a 3x3 convolution's weights grow with channels squared) from dominating
    the parameter count of a network meant to train on a laptop.
    """
    return [width * min(2 ** level, max_multiplier) for level in range(depth + 1)]


class TinyConvNet(nn.Module):
    """A stem convolution, then ``depth`` stages that each halve the resolution (stride-2 conv + conv).

    ``stem_stride=2`` starts at half resolution: a quarter of the cost of every layer, for tasks (classification,
    box and joint regression) that do not need full-resolution features.

    ``forward`` returns the last feature map (N, out_channels, H / stride, W / stride); ``forward_stages`` returns
    every level's map (strides 1, 2, 4, ...) for methods that want several scales.
    """

    def __init__(self, width: int = 32, depth: int = 4, in_channels: int = 3, stem_stride: int = 1):
        super().__init__()
        widths = stage_widths(width, depth)
        self.stem = conv_bn_relu(in_channels, widths[0], stride=stem_stride)
        self.stages = nn.ModuleList(
            nn.Sequential(conv_bn_relu(widths[level - 1], widths[level], stride=2),
                          conv_bn_relu(widths[level], widths[level]))
            for level in range(1, depth + 1)
        )
        self.out_channels = widths[-1]
        self.stride = stem_stride * 2 ** depth
        self.stage_channels = widths

    def forward_stages(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = [self.stem(images)]                       # (N, 3, H, W) -> (N, w, H, W)
        for stage in self.stages:
            features.append(stage(features[-1]))             # halves H and W, doubles channels (up to the cap)
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(images)[-1]


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without its pooling and classifier: (N, 3, H, W) -> (N, 512|2048, H/32, W/32)."""

    def __init__(self, resnet: nn.Module, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(OrderedDict(
            (name, getattr(resnet, name))
            for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        ))
        self.out_channels = out_channels
        self.stride = 32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


def torchvision_backbone(name: str = "resnet18", fpn: bool = False, weights=None, norm: str = "batch",
                         eps: float = 1e-5) -> nn.Module:
    """A randomly initialised torchvision ResNet trunk, or ResNet + feature pyramid (``fpn=True``).

    Without FPN the module returns one map with ``out_channels`` 512 (resnet18) or 2048 (resnet50) at stride 32.
    With FPN it is torchvision's ``BackboneWithFPN``: an ``OrderedDict`` of 256-channel maps ``'0'..'3'`` and
    ``'pool'`` at strides 4, 8, 16, 32, 64 (listed in ``strides``). Batch norm is the trainable kind, not the frozen
    kind torchvision defaults to, because frozen statistics only make sense for pretrained weights;
    ``norm="frozen"`` gives torchvision's ``FrozenBatchNorm2d`` (with ``eps``) for its converted checkpoints.
    """
    if weights is not None:
        raise ConfigError(f"weights={weights!r}: pretrained weights are not used; backbones train from scratch "
                          "(weights=None)")
    if name not in _RESNET_CHANNELS:
        raise ConfigError(f"backbone={name}: choose one of {', '.join(_RESNET_CHANNELS)}")
    import functools

    import torchvision
    from torchvision.ops import FrozenBatchNorm2d
    norm_layer = functools.partial(FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d, eps=eps)
    if fpn:
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
        model = resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=norm_layer, trainable_layers=5)
        model.strides = (4, 8, 16, 32, 64)
        return model
    resnet = torchvision.models.get_model(name, weights=None, norm_layer=norm_layer)
    return ResNetTrunk(resnet, _RESNET_CHANNELS[name])


def build_backbone(name: str = "tiny", width: int = 32, depth: int = 4, stem_stride: int = 1) -> nn.Module:
    """``tiny`` -> :class:`TinyConvNet` (``width``, ``depth``); ``resnet18|50`` -> :func:`torchvision_backbone`."""
    if name == "tiny":
        return TinyConvNet(width=width, depth=depth, stem_stride=stem_stride)
    if name in BACKBONES:
        return torchvision_backbone(name)
    raise ConfigError(f"backbone={name}: choose one of {', '.join(BACKBONES)}")


class PooledMLP(nn.Module):
    """Feature map -> fixed-length vector: 1x1 channel reduction, average pool to ``grid x grid``, flatten, FC.

    (N, C, h, w) -> (N, C', grid, grid) -> (N, C' * grid**2) -> (N, hidden). The fixed grid makes the head work for
    any input size, and keeps a coarse map of where the evidence is, which box and joint regression need.
    """

    def __init__(self, in_channels: int, reduce_channels: int = 64, grid: int = 4, hidden: int = 256,
                 dropout: float = 0.0):
        super().__init__()
        self.reduce = conv_bn_relu(in_channels, reduce_channels, kernel=1)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(reduce_channels * grid * grid, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.out_features = hidden

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.reduce(features)))


class FeatureVector(nn.Module):
    """Image -> fixed-length vector: a backbone, then :class:`PooledMLP`. The shared trunk of classification +
    localization and pose regression, whose heads are single linear layers on this vector.

    ``freeze_backbone(True)`` stops training the convolutional backbone (no gradients, batch-norm statistics
    fixed) while the pooled MLP and the heads keep learning - the lecture's transfer-learning schedule: train the new
    heads on fixed features first, then fine-tune everything jointly.
    """

    def __init__(self, backbone: str = "tiny", width: int = 16, depth: int = 4, stem_stride: int = 2, grid: int = 4,
                 hidden: int = 256):
        super().__init__()
        self.backbone = build_backbone(backbone, width, depth, stem_stride)
        self.pooled = PooledMLP(self.backbone.out_channels, grid=grid, hidden=hidden)
        self.out_features = hidden
        self.backbone_frozen = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pooled(self.backbone(images))       # (N, 3, H, W) -> (N, C, h, w) -> (N, hidden)

    def freeze_backbone(self, flag: bool = True) -> None:
        self.backbone_frozen = bool(flag)
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(not flag)
        self.train(self.training)                        # re-apply the batch-norm mode below

    def train(self, mode: bool = True) -> "FeatureVector":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()                         # frozen means frozen: running statistics stay put
        return self


# Knobs of :class:`FeatureVector`, shared by the models built on it.
FEATURE_OPTIONS = {
    "backbone": Option("tiny", "feature extractor: tiny|resnet18|resnet50 (random init)", choices=BACKBONES),
    "width": Option(16, "tiny backbone: channels of the first stage", min=4, max=1024),
    "depth": Option(4, "tiny backbone: number of stride-2 stages", min=1, max=6),
    "stem_stride": Option(2, "tiny backbone: stride of the first convolution (2 = start at half resolution)",
                          choices=(1, 2)),
    "grid": Option(4, "features are average-pooled to grid x grid before the fully-connected layer", min=1, max=32),
    "hidden": Option(256, "size of the fully-connected feature vector", min=8, max=8192),
}
