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

The warped-crop head itself lives in :mod:`.heads`, shared with the sliding-window detector. Training samples
regions per image with the lecture's rule: IoU >= 0.5 with a ground-truth box is an example of that
box's class, anything less is background, at most a quarter positives (:class:`.generalized.RoISampling`).
"""
from __future__ import annotations

from .generalized import RegionDetector, detector_transform
from .heads import ROI_SETTINGS_OPTIONS, WARPED_CROP_OPTIONS, build_warped_crop_head, roi_head_settings
from .proposers import SELECTIVE_SEARCH_OPTIONS, selective_search_proposer


OPTIONS = {**SELECTIVE_SEARCH_OPTIONS, **WARPED_CROP_OPTIONS, **ROI_SETTINGS_OPTIONS}


def build(config: dict, info: dict) -> RegionDetector:
    """R-CNN: no shared backbone; Selective Search proposals; a CNN on every warped crop."""
    sampling, postprocess, weights = roi_head_settings(config)
    return RegionDetector(info["num_classes"], selective_search_proposer(config),
                          build_warped_crop_head(config, info["num_classes"]), None,
                          sampling, postprocess, weights, transform=detector_transform(config, info))
