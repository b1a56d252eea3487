"""torchvision's detection checkpoints as detseg checkpoints: ``detseg convert torchvision NAME STATE_DICT.pth``.

torchvision's ``fasterrcnn_resnet50_fpn``, ``maskrcnn_resnet50_fpn`` and ``keypointrcnn_resnet50_fpn`` are the
lecture's last three detectors at full scale: a ResNet-50 with a feature pyramid, an RPN over five levels, a box head
of two 1024-wide fully-connected layers, and the mask and keypoint heads of He et al. detseg builds the same networks
from its own stages (:mod:`detseg.models.detection`, :mod:`detseg.models.instance`) - torchvision supplies only the
ResNet / FPN modules and ``torchvision.ops`` - and this module renames a torchvision state dict's tensors into them.
Four knobs make the stages follow torchvision's conventions where detseg's differ, so that both give the same
detections from the same weights:

* ``resize=torchvision``: normalise, then plain bilinear resizing at torchvision's scale (sizes floored);
* ``anchor_grid=torchvision``: anchors with whole-pixel shapes at the cells' corners, strides ``size // cells``;
* ``rpn_per_level=true``: the best 1000 boxes *of each level* before NMS, NMS within each level;
* ``rpn_min_size`` / ``min_box_size`` of 1e-3 / 1e-2 px, and ``backbone_norm=frozen`` with ``bn_eps``.

Two key layouts exist: torchvision's published files predate ``Conv2dNormActivation`` (``fpn.inner_blocks.0.weight``,
``rpn.head.conv.weight``, ``mask_head.mask_fcn1.weight``) and current models save ``fpn.inner_blocks.0.0.weight``,
``rpn.head.conv.0.0.weight``, ``mask_head.0.0.weight``; both are accepted. Batch-norm layers come as
``FrozenBatchNorm2d`` (the published files: weights, biases and statistics) or as ``BatchNorm2d`` (a model built
with ``weights_backbone=None``, which also saves ``num_batches_tracked``); the converted backbone uses the same kind,
and the epsilon torchvision would load it with (0 for the published frozen weights, 1e-5 for ``BatchNorm2d``).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from . import __version__, registry
from .config import resolve
from .engine.checkpoint import save_checkpoint
from .errors import ConfigError

# Each converted model: the detseg model and the knobs that make its stages torchvision's (defaults of
# torchvision.models.detection.FasterRCNN / MaskRCNN / KeypointRCNN for the ResNet-50-FPN builders).
COMMON_KNOBS = {
    "backbone": "resnet50", "fpn": True,
    "min_size": 800, "max_size": 1333, "resize": "torchvision", "image_size": 800,
    "anchor_scales": "32,64,128,256,512", "anchor_ratios": "0.5,1,2", "anchor_grid": "torchvision",
    "rpn_per_level": True, "rpn_pre_nms": 1000, "rpn_post_nms_train": 2000, "rpn_post_nms_test": 1000,
    "rpn_nms_thresh": 0.7, "rpn_min_size": 1e-3, "rpn_anchors_per_image": 256,
    "pool": "roi_align", "pool_size": 7, "roi_channels": 0, "head_hidden": 1024,
    "rois_per_image": 512, "positive_fraction": 0.25,
    "score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_image": 100, "min_box_size": 1e-2,
}
MODELS = {
    "fasterrcnn_resnet50_fpn": ("det/faster_rcnn", {}),
    "maskrcnn_resnet50_fpn": ("inst/mask_rcnn", {"masks": True, "keypoints": False, "mask_pixels": False,
                                                 "mask_channels": "256,256,256,256", "mask_pool_size": 14}),
    "keypointrcnn_resnet50_fpn": ("inst/mask_rcnn", {"masks": False, "keypoints": True,
                                                     "keypoint_channels": ",".join(["512"] * 8),
                                                     "keypoint_pool_size": 14}),
}
# COCO's person skeleton (1-based joint numbers, as in the person category of COCO's keypoint files).
COCO_SKELETON = ((16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
                 (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7))

# torchvision name (current layout) -> detseg name; the backbone and its FPN keep their names.
_RENAMES = (
    (r"^rpn\.head\.conv\.0\.0\.", "proposer.head.conv."),
    (r"^rpn\.head\.cls_logits\.", "proposer.head.objectness."),
    (r"^rpn\.head\.bbox_pred\.", "proposer.head.deltas."),
    (r"^roi_heads\.box_head\.fc6\.", "roi_head.fc.1."),
    (r"^roi_heads\.box_head\.fc7\.", "roi_head.fc.3."),
    (r"^roi_heads\.box_predictor\.cls_score\.", "roi_head.predictor.classify."),
    (r"^roi_heads\.box_predictor\.bbox_pred\.", "roi_head.predictor.regress."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "mask_head.upsample."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "mask_head.logits."),
    (r"^roi_heads\.keypoint_predictor\.kps_score_lowres\.", "keypoint_head.upsample."),
    (r"^(backbone\.(body|fpn)\.)", r"\1"),
)


def _current_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the published files' keys to the current layout (what torchvision's ``_load_from_state_dict`` hooks
    do by ``_version``); keys already current are kept."""
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^(backbone\.fpn\.(inner|layer)_blocks\.\d+)\.(weight|bias)$", r"\1.0.\3", key)
        key = re.sub(r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.0.\1", key)
        match = re.match(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$", key)
        if match:
            key = f"roi_heads.mask_head.{int(match[1]) - 1}.0.{match[2]}"
        renamed[key] = value
    return renamed


def _detseg_name(key: str) -> str | None:
    match = re.match(r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$", key)
    if match:
        return f"mask_head.convs.{2 * int(match[1])}.{match[2]}"
    match = re.match(r"^roi_heads\.keypoint_head\.(\d+)\.(weight|bias)$", key)
    if match:
        return f"keypoint_head.convs.{match[1]}.{match[2]}"
    for pattern, replacement in _RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.pth`` of tensors (or torchvision's training scripts' ``{"model": state_dict, ...}``), checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:   # noqa: BLE001 - torch.load raises many kinds; the message names the file
        raise ConfigError(f"{path}: not a readable PyTorch state dict ({type(error).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"{path}: expected a state dict (names -> tensors)")
    return dict(state)


def convert_state_dict(name: str, state: dict[str, torch.Tensor], bn_eps: float | None = None):
    """``(model name, config overrides, info, detseg state dict)`` of a torchvision state dict of model ``name``."""
    if name not in MODELS:
        raise ConfigError(f"convert torchvision {name}: choose one of {', '.join(MODELS)}")
    model_name, extra = MODELS[name]
    state = _current_layout(state)
    frozen = not any(key.endswith("num_batches_tracked") for key in state)
    converted, unknown = {}, []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            converted[key] = value     # BatchNorm2d's counter: kept, the detseg backbone is BatchNorm2d too
            continue
        target = _detseg_name(key)
        if target is None:
            unknown.append(key)
        else:
            converted[target] = value
    if unknown:
        raise ConfigError(f"{name}: {len(unknown)} tensors of no {name} layer, e.g. {', '.join(unknown[:3])} "
                          "(is this the state dict of another model?)")
    needed = {"roi_head.predictor.classify.weight"}
    needed |= {"mask_head.logits.weight"} if extra.get("masks") else set()
    needed |= {"keypoint_head.upsample.weight"} if extra.get("keypoints") else set()
    missing = sorted(needed - set(converted))
    if missing:
        raise ConfigError(f"{name}: the state dict has no {missing[0]} layer (is it the state dict of {name}?)")
    num_classes = converted["roi_head.predictor.classify.weight"].shape[0]
    knobs = {**COMMON_KNOBS, **extra, "backbone_norm": "frozen" if frozen else "batch",
             "bn_eps": (0.0 if frozen else 1e-5) if bn_eps is None else bn_eps}
    info = _info(num_classes, converted)
    converted["transform.mean"] = torch.tensor([0.485, 0.456, 0.406])
    converted["transform.std"] = torch.tensor([0.229, 0.224, 0.225])
    return model_name, knobs, info, converted


def _info(num_classes: int, state: dict[str, torch.Tensor]) -> dict:
    """Class names (COCO's 91 label ids, 'N/A' for unused ones, when the model has 91 classes), label = COCO
    category id, and COCO's 17 person joints for a keypoint model."""
    from torchvision.models.detection.keypoint_rcnn import _COCO_PERSON_KEYPOINT_NAMES
    from torchvision.models._meta import _COCO_CATEGORIES, _COCO_PERSON_CATEGORIES
    if num_classes == len(_COCO_CATEGORIES):
        names = list(_COCO_CATEGORIES)
    elif num_classes == len(_COCO_PERSON_CATEGORIES):
        names = list(_COCO_PERSON_CATEGORIES)
    else:
        names = ["__background__"] + [f"class_{label}" for label in range(1, num_classes)]
    info = {"num_classes": num_classes, "class_names": names, "image_size": 800,
            "category_ids": list(range(num_classes)), "num_keypoints": 0, "keypoint_class": 0}
    if "keypoint_head.upsample.weight" in state:
        from pycocotools.cocoeval import Params
        joints = state["keypoint_head.upsample.weight"].shape[1]
        info.update(num_keypoints=joints, keypoint_class=1,
                    keypoint_names=list(_COCO_PERSON_KEYPOINT_NAMES)[:joints] if joints == 17
                    else [f"joint_{j}" for j in range(joints)],
                    skeleton=[[a - 1, b - 1] for a, b in COCO_SKELETON] if joints == 17 else [],
                    keypoint_sigmas=[float(s) for s in Params(iouType="keypoints").kpt_oks_sigmas]
                    if joints == 17 else None)
    return info


def build_converted(name: str, state: dict[str, torch.Tensor], bn_eps: float | None = None):
    """The detseg model of a torchvision state dict, in eval mode, and the checkpoint payload that rebuilds it."""
    model_name, knobs, info, converted = convert_state_dict(name, state, bn_eps)
    entry = registry.get(model_name)
    config = resolve(entry.all_options(), knobs)
    model = entry.build(config, info)
    try:
        result = model.load_state_dict(converted, strict=False)
    except RuntimeError as error:          # a tensor of another shape: report the first line torch gives
        raise ConfigError(f"{name}: the state dict does not fit {model_name} with torchvision's layers "
                          f"({str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else error})"
                          ) from None
    if result.missing_keys or result.unexpected_keys:
        wrong = result.missing_keys or result.unexpected_keys
        raise ConfigError(f"{name}: the state dict does not fit {model_name} with torchvision's layers "
                          f"({'missing' if result.missing_keys else 'unexpected'}: {', '.join(wrong[:3])})")
    payload = {"model": model.state_dict(), "model_name": model_name, "config": config, "info": info,
               "version": __version__, "data": {"data": None, "val": None},
               "converted_from": {"library": "torchvision", "model": name}}
    return model.eval(), payload


def convert_torchvision(name: str, state_dict: str | Path, out: str | Path, bn_eps: float | None = None) -> Path:
    """Read a torchvision state dict, write a detseg checkpoint ``out`` (atomically) and return its path."""
    _, payload = build_converted(name, read_state_dict(state_dict), bn_eps)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, payload)
    return out
