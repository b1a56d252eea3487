"""RoI-head pieces the region-based family shares, kept below every method that uses them.

* the knobs of the RoI stage every head reads - sampling, loss weight, post-processing - and
  :func:`roi_head_settings`, which turns them into :mod:`.generalized`'s settings;
* the fully-connected trunk (R-CNN's fc6 and fc7) behind R-CNN's, SPP-net's and Fast R-CNN's heads;
* the warped-crop head: cut each region out of the *image*, warp it to a fixed square and run a CNN on it - the
  per-region network of the sliding-window detector and of R-CNN (:mod:`.rcnn` tells its story).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchvision.ops import roi_align

from ...config import Option
from ...errors import ConfigError
from ..backbones import TinyConvNet
from .generalized import BoxPredictor, Postprocess, RoISampling

POOLS = ("roi_pool", "roi_align")

ROI_HEAD_OPTIONS = {
    "pool": Option("roi_align", "how a proposal is cut from the feature map: roi_pool (Fast R-CNN) | roi_align",
                   choices=POOLS),
    "pool_size": Option(7, "RoI pooling output grid (pool_size x pool_size cells)", min=1, max=32),
    "roi_channels": Option(64, "1x1 convolution narrowing the shared features before RoI pooling (0 = keep all): "
                               "per-region cost grows with channels x bins x regions", min=0, max=4096),
    "head_hidden": Option(256, "width of the two fully-connected layers of the RoI head", min=8, max=8192),
    "rois_per_image": Option(64, "sampled RoIs per training image", min=1),
    "positive_fraction": Option(0.25, "share of positives among sampled RoIs at most", min=0, max=1),
    "box_loss_weight": Option(1.0, "weight of the RoI box loss in the multi-task sum", min=0),
    "score_thresh": Option(0.05, "detections below this class probability are dropped", min=0, max=1),
    "nms_thresh": Option(0.5, "per-class non-maximum suppression IoU", min=0, max=1),
    "detections_per_image": Option(100, "detections kept per image after NMS (COCO counts 100)", min=1),
    "min_box_size": Option(1.0, "detections with a side below this many pixels are dropped", min=0),
}


# The RoI-stage knobs every head shares; the others of ROI_HEAD_OPTIONS (pool, pool_size, roi_channels,
# head_hidden) describe the pooling head of Fast R-CNN.
SHARED_ROI_HEAD_KEYS = ("rois_per_image", "positive_fraction", "box_loss_weight", "score_thresh", "nms_thresh",
                        "detections_per_image", "min_box_size")


def roi_head_settings(config: dict) -> tuple[RoISampling, Postprocess, dict[str, float]]:
    """The sampling, post-processing and loss weights every RoI head of the family reads from its config."""
    sampling = RoISampling(batch_per_image=config["rois_per_image"], positive_fraction=config["positive_fraction"])
    # .get: checkpoints saved before detections_per_image was a knob kept COCO's 100.
    postprocess = Postprocess(score_thresh=config["score_thresh"], nms_thresh=config["nms_thresh"],
                              detections_per_image=config.get("detections_per_image", 100),
                              min_size=config.get("min_box_size", 1.0))
    return sampling, postprocess, {"roi_box": config["box_loss_weight"]}



def fully_connected_trunk(in_features: int, hidden: int) -> nn.Sequential:
    """Flatten, then two fully-connected layers with ReLU (R-CNN's fc6 and fc7): ``(R, ...) -> (R, hidden)``."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
    )


# ---- the warped-crop head of the sliding-window detector and R-CNN -------------------------------------------------
WARPED_CROP_OPTIONS = {
    "warp_size": Option(32, "side every region is warped to before the CNN (R-CNN: 227)", min=8, max=512),
    "context_padding": Option(2, "pixels of surrounding image kept around the region inside the warped crop "
                                 "(R-CNN: 16 of 227; 0 = the tight box)", min=0, max=256),
    "width": Option(16, "per-crop CNN: channels of the first stage", min=4, max=1024),
    "depth": Option(3, "per-crop CNN: number of stride-2 stages", min=1, max=5),
    "head_hidden": ROI_HEAD_OPTIONS["head_hidden"],
    "crop_chunk": Option(512, "crops run through the CNN at a time (bounds memory at thousands of regions)", min=1),
}

# Each sampled region costs a full CNN pass in a warped-crop head, so these methods keep 64 per image whatever Fast
# R-CNN's default becomes.
ROI_SETTINGS_OPTIONS = {
    **{key: ROI_HEAD_OPTIONS[key] for key in SHARED_ROI_HEAD_KEYS},
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


