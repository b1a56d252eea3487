"""R-CNN (Girshick et al., 2014): Selective Search proposals, each cropped from the image, warped, and classified.

The first step of the lecture's R-CNN family. Classifying every window at every scale is hopeless
(:mod:`.sliding_window`), so a cheap class-agnostic algorithm, Selective Search, proposes ~2000 regions that may
hold *some* object. Then, for every proposal on its own:

1. cut the region out of the **image** and warp it - whatever its shape - to a fixed square (227 x 227 in the paper,
   ``warp_size`` here), since the fully-connected layers behind the CNN need a fixed input size. The paper first
   grows the box so that ``context_padding`` pixels of surrounding image are kept around the object in the warp;
2. run a CNN on the warped crop, then two fully-connected layers (the paper's fc6 and fc7);
3. predict K+1 class scores (background included) and class-specific box deltas that refine the proposal.

Nothing is shared between proposals: 2000 proposals mean 2000 forward passes of the CNN per image, which is why
R-CNN is slow at test time - the cost SPP-net and Fast R-CNN remove by computing the convolutional features once.
(On the plain 128 px scenes Selective Search finds only ~70 regions per image, so the gap to the 2016 windows of
the sliding-window detector, with the same per-crop network, is the gap the proposals buy.)
The paper scored regions with per-class linear SVMs trained on fc7 features after fine-tuning; here the softmax of
the fine-tuned network scores them, which the paper found only slightly worse and Fast R-CNN adopted.

Training samples regions per image with the lecture's rule: IoU >= 0.5 with a ground-truth box is an example of that
box's class, anything less is background, at most a quarter positives (:class:`.generalized.RoISampling`).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchvision.ops import roi_align

from ...config import Option
from ...errors import ConfigError
from ..backbones import TinyConvNet
from .fast_rcnn import ROI_HEAD_OPTIONS, roi_head_settings
from .generalized import BoxPredictor, RegionDetector
from .proposers import SELECTIVE_SEARCH_OPTIONS, selective_search_proposer

WARPED_CROP_OPTIONS = {
    "warp_size": Option(32, "side every region is warped to before the CNN (R-CNN: 227)", min=8),
    "context_padding": Option(2, "pixels of surrounding image kept around the region inside the warped crop "
                                 "(R-CNN: 16 of 227; 0 = the tight box)", min=0),
    "width": Option(16, "per-crop CNN: channels of the first stage", min=4),
    "depth": Option(3, "per-crop CNN: number of stride-2 stages", min=1, max=5),
    "head_hidden": ROI_HEAD_OPTIONS["head_hidden"],
    "crop_chunk": Option(512, "crops run through the CNN at a time (bounds memory at thousands of regions)", min=1),
}

# The keys roi_head_settings reads (sampling, loss weight, post-processing), shared with Fast R-CNN's table. Each
# sampled region costs a full CNN pass here, so R-CNN keeps 64 per image whatever Fast R-CNN's default becomes.
ROI_SETTINGS_OPTIONS = {
    **{key: ROI_HEAD_OPTIONS[key]
       for key in ("rois_per_image", "positive_fraction", "box_loss_weight", "score_thresh", "nms_thresh")},
    "rois_per_image": dataclasses.replace(ROI_HEAD_OPTIONS["rois_per_image"], default=64),
}


def context_boxes(boxes: torch.Tensor, warp_size: int, context_padding: int) -> torch.Tensor:
    """Grow ``(R, 4)`` boxes about their centres so the original box fills the central ``warp_size - 2 p`` pixels of
    the warp and ``p`` pixels of its surroundings frame it (R-CNN's context padding)."""
    if context_padding == 0:
        return boxes
    growth = warp_size / (warp_size - 2 * context_padding)
    centres = 0.5 * (boxes[:, :2] + boxes[:, 2:])                                    # (R, 2)
    half_sizes = 0.5 * growth * (boxes[:, 2:] - boxes[:, :2])                        # (R, 2)
    return torch.cat([centres - half_sizes, centres + half_sizes], dim=1)


def regions_with_image_index(rois: list[torch.Tensor]) -> torch.Tensor:
    """``[(R_i, 4)] -> (R, 5)`` rows ``(image index, x1, y1, x2, y2)``, the batched form of torchvision's RoI ops."""
    return torch.cat([torch.cat([torch.full_like(boxes[:, :1], index), boxes], dim=1)
                      for index, boxes in enumerate(rois)]) if rois else torch.empty((0, 5))


def warp_regions(images: torch.Tensor, regions: torch.Tensor, warp_size: int) -> torch.Tensor:
    """Crop-and-warp: ``(N, 3, H, W)`` images, ``(R, 5)`` regions -> ``(R, 3, warp_size, warp_size)`` crops.

    RoI Align at scale 1 on the image *is* R-CNN's anisotropic warp: every output pixel is the bilinear average of
    the region's pixels under it (adaptively many samples, so a large region shrinks without aliasing). Parts of a
    padded box beyond the image read as 0, which on the normalised image is the mean colour - what R-CNN filled in.
    """
    return roi_align(images, regions, warp_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def fully_connected_trunk(in_features: int, hidden: int) -> nn.Sequential:
    """Flatten, then two fully-connected layers with ReLU (R-CNN's fc6 and fc7): ``(R, ...) -> (R, hidden)``."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
    )


class WarpedCropHead(nn.Module):
    """R-CNN's per-region network: warp each region out of the image, CNN, fc6, fc7, class scores + box deltas.

    ``forward(images, rois, image_size)`` takes the *normalised images* (a detector without a shared backbone hands
    them over in place of features) and a list of ``(R_i, 4)`` regions per image, and returns logits ``(R, K+1)``
    and deltas ``(R, 4 (K+1))``. Regions go through the CNN ``crop_chunk`` at a time, so thousands of proposals
    never hold their activations at once.
    """

    def __init__(self, num_classes: int, warp_size: int = 32, context_padding: int = 2, width: int = 16,
                 depth: int = 3, hidden: int = 256, crop_chunk: int = 512):
        super().__init__()
        if 2 * context_padding >= warp_size:
            raise ConfigError(f"context_padding={context_padding}: must be less than half of warp_size={warp_size}")
        self.warp_size, self.context_padding, self.crop_chunk = warp_size, context_padding, crop_chunk
        self.cnn = TinyConvNet(width=width, depth=depth)
        side = warp_size
        for _ in range(depth):
            side = (side + 1) // 2                       # each stride-2, padding-1 convolution rounds up
        self.fc = fully_connected_trunk(self.cnn.out_channels * side * side, hidden)
        self.predictor = BoxPredictor(hidden, num_classes)

    def forward(self, images: torch.Tensor, rois: list[torch.Tensor], image_size: tuple[int, int]):
        padded = [context_boxes(boxes, self.warp_size, self.context_padding) for boxes in rois]
        regions = regions_with_image_index(padded).to(images)                                  # (R, 5)
        # (r, 5) -> (r, 3, s, s) crops -> (r, C, s', s') -> (r, hidden), one chunk at a time (an empty R: one chunk)
        vectors = torch.cat([self.fc(self.cnn(warp_regions(images, chunk, self.warp_size)))
                             for chunk in regions.split(self.crop_chunk)])
        return self.predictor(vectors)                                                       # (R, K+1), (R, 4(K+1))


def build_warped_crop_head(config: dict, num_classes: int) -> WarpedCropHead:
    """The :class:`WarpedCropHead` of a run config (``WARPED_CROP_OPTIONS`` keys)."""
    return WarpedCropHead(num_classes, config["warp_size"], config["context_padding"], config["width"],
                          config["depth"], config["head_hidden"], config["crop_chunk"])


OPTIONS = {**SELECTIVE_SEARCH_OPTIONS, **WARPED_CROP_OPTIONS, **ROI_SETTINGS_OPTIONS}


def build(config: dict, info: dict) -> RegionDetector:
    """R-CNN: no shared backbone; Selective Search proposals; a CNN on every warped crop."""
    sampling, postprocess, weights = roi_head_settings(config)
    return RegionDetector(info["num_classes"], selective_search_proposer(config),
                          build_warped_crop_head(config, info["num_classes"]), None,
                          sampling, postprocess, weights)
