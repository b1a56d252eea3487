"""Sliding-window detection: classify a crop at every position, scale and aspect ratio - the lecture's brute force.

The idea detection starts from: apply a CNN to many different crops of the image, and let it say for each crop
"background" or one of the K classes (plus a box refinement). The trouble is the number of crops: objects can be
anywhere, of any size and shape, so the windows must cover every position at several scales and aspect ratios, and
the CNN runs once per window. R-CNN (:mod:`.rcnn`) keeps exactly this crop classifier and only swaps the proposer
stage: a couple of thousand Selective Search regions *chosen for the image* instead of every window.

With the defaults - square-root areas 12, 18, 27, 40, 60 and 90 px, aspect ratios 0.5, 1 and 2, a step of half the
window's side - a 128 x 128 image gets **2016 windows** (1212 of them of the smallest size; 397 at 64 x 64), each a
full CNN pass at test time. They still cover 96% of the 128 px scenes' objects at IoU >= 0.5 but only 17% at 0.7:
a window grid is coarse, which is what the class-specific box deltas make up for.

Training samples windows like R-CNN samples proposals (IoU >= 0.5 positive, less background, the ground-truth boxes
added as extra positives), and detection ends with the shared per-class non-maximum suppression, which merges the
many overlapping windows that fire on one object.
"""
from __future__ import annotations

from ...config import Option, number_list
from .generalized import RegionDetector, detector_transform
from .heads import ROI_SETTINGS_OPTIONS, WARPED_CROP_OPTIONS, build_warped_crop_head, roi_head_settings
from .proposers import SlidingWindowProposer

SLIDING_WINDOW_OPTIONS = {
    "window_scales": Option("12,18,27,40,60,90", "window sizes in pixels (square root of the area)"),
    "window_ratios": Option("0.5,1,2", "window aspect ratios (height / width)"),
    "window_stride": Option(0.5, "step between windows, as a fraction of the window's width (across) and height "
                                 "(down)", min=0.05, max=1),
}

# Classifying ~2000 windows costs seconds per image on a CPU, so by default this method validates on fewer images
# than the others (the benchmark evaluates every detector on the same images instead).
OPTIONS = {**SLIDING_WINDOW_OPTIONS, **WARPED_CROP_OPTIONS, **ROI_SETTINGS_OPTIONS,
           "val_size": Option(50, "validation images (scenes); each costs seconds here", min=1)}


def build_window_proposer(config: dict) -> SlidingWindowProposer:
    """The :class:`SlidingWindowProposer` of a run config (``SLIDING_WINDOW_OPTIONS`` keys)."""
    return SlidingWindowProposer(number_list("window_scales", config["window_scales"]),
                                 number_list("window_ratios", config["window_ratios"]), config["window_stride"])


def build(config: dict, info: dict) -> RegionDetector:
    """Sliding windows: no shared backbone; every window of every shape; a CNN on every warped crop; NMS."""
    sampling, postprocess, weights = roi_head_settings(config)
    return RegionDetector(info["num_classes"], build_window_proposer(config),
                          build_warped_crop_head(config, info["num_classes"]), None,
                          sampling, postprocess, weights, transform=detector_transform(config, info))
