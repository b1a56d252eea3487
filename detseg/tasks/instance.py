"""Instance segmentation and keypoint detection: a box, a class, a mask per object and the joints of every person.

The task of ``inst/mask_rcnn``. It reads the same data as detection (scenes, COCO, VOC) and additionally decodes
each object's mask and, for the category with joints, its keypoints; flips swap left and right joints. Scoring is
three pycocotools runs over the same predictions - ``bbox``, ``segm`` (RLE masks in the original images' pixels)
and ``keypoints`` (OKS with the data's sigmas: COCO's 17, or the LSP set for the scenes' 14 joints) - whose stats
go to metrics.json under their plain, ``segm_`` and ``kp_`` names, unchanged. The COCO results behind them are
written as predictions.json (boxes, as every detector writes), predictions_segm.json and predictions_keypoints.json.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

from ..data.dataset import keypoint_flip_index, label_maps
from ..data.transforms import AUGMENT_OPTIONS, Augmentation
from ..errors import DataError
from ..io import write_json
from ..metrics import coco_evaluator, coco_stats, per_class_ap, results_from_keypoints, results_from_masks
from ..models.instance import mask_rcnn
from ..registry import register
from .base import DataBundle, Scorer, image_tensor, knobs_of
from .detection import DETECTION_OPTIONS, DETECTION_TRAINING, DetectionScorer, DetectionTask, plain_target
from .segmentation import PALETTE

def instance_target(target: dict) -> dict:
    """A box detector's target plus the instance masks (G, H, W) uint8 and joints (G, J, 3) float."""
    converted = plain_target(target)
    for key in ("masks", "keypoints"):
        if key in target:
            converted[key] = target[key].as_subclass(torch.Tensor)
    if "keypoints" in converted:
        converted["keypoints"] = converted["keypoints"].float()
    return converted


def keypoint_category(source) -> dict | None:
    """The category whose annotations carry joints (COCO's person), or None. The keypoint head learns the joints
    of one category and flips them by its joint names, so data where several categories name joints is refused."""
    with_joints = [category for category in source.categories if category.get("keypoints")]
    if len(with_joints) > 1:
        raise DataError(getattr(source, "origin", "<data>"), "more than one category names keypoints; "
                        "inst/mask_rcnn learns the joints of one", field="categories",
                        value=[category["name"] for category in with_joints])
    return with_joints[0] if with_joints else None


def _resized_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(D, h, w) bool -> (D, H, W) bool, nearest neighbour (masks predicted on a resized copy of an image)."""
    if len(masks) == 0:
        return masks.new_zeros((0, *size))
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks[None].float(), size=size, mode="nearest")[0] > 0.5


class InstanceScorer(DetectionScorer):
    """Boxes as :class:`DetectionScorer` scores them, plus RLE masks and joints, all in the original images' pixels."""

    def __init__(self, bundle: DataBundle):
        super().__init__(bundle)
        info = bundle.info
        self.keypoint_class = int(info.get("keypoint_class") or 0)
        self.sigmas = info.get("keypoint_sigmas")
        self.segm_results: list[dict] = []
        self.keypoint_results: list[dict] = []
        self.has_masks = self.has_keypoints = False

    def update(self, outputs: list[dict], targets: list[dict]) -> None:
        super().update(outputs, targets)
        for detections, target in zip(outputs, targets):
            image_id = target["image_id"]
            width, height = self.sizes[image_id]
            if "masks" in detections:
                self.has_masks = True
                masks = _resized_masks(detections["masks"].cpu(), (height, width))
                self.segm_results += results_from_masks([image_id], [masks], [detections["scores"].cpu()],
                                                        [detections["labels"].cpu()], self.category_of)
            if "keypoints" in detections and self.keypoint_class:
                self.has_keypoints = True
                people = (detections["labels"] == self.keypoint_class).cpu()
                scale_x, scale_y = self.scale_to_original(target)
                joints = detections["keypoints"].cpu()[people].clone()                     # (P, J, 3)
                joints[..., 0] *= scale_x
                joints[..., 1] *= scale_y
                joints[..., 2] = 1.0            # COCO's OKS ignores predicted visibilities; the score is the box's
                self.keypoint_results += results_from_keypoints(
                    [image_id], [joints], [detections["scores"].cpu()[people]],
                    self.category_of[self.keypoint_class])

    def compute(self) -> dict:
        metrics = super().compute()
        if self.has_masks:
            evaluator = coco_evaluator(self.ground_truth, self.segm_results, "segm")
            metrics.update({f"segm_{key}": value for key, value in coco_stats(evaluator).items()})
            metrics["segm_per_class_ap"] = per_class_ap(evaluator)
        if self.has_keypoints and any(category.get("keypoints") for category in self.ground_truth["categories"]):
            evaluator = coco_evaluator(self.ground_truth, self.keypoint_results, "keypoints",
                                       kpt_oks_sigmas=self.sigmas)
            metrics.update({f"kp_{key}": value for key, value in coco_stats(evaluator).items()})
        return metrics


class InstanceTask(DetectionTask):
    name = "instance"
    options = DETECTION_OPTIONS
    fields = ("masks", "keypoints")
    convert = staticmethod(instance_target)

    @property
    def main_metric(self) -> str:
        """Mask AP decides best.pt; a keypoint-only model (no mask head) is judged by keypoint AP."""
        if self.config.get("masks", True):
            return "segm_ap"
        return "kp_ap" if self.config.get("keypoints", False) else "ap"

    def augmentation(self, source) -> Augmentation:
        category = keypoint_category(source)
        flip_index = keypoint_flip_index(category["keypoints"]) if category is not None else None
        return Augmentation(hflip=self.config["hflip"], flip_index=flip_index,
                            **knobs_of(AUGMENT_OPTIONS, self.config))

    def extend_info(self, info: dict, source) -> dict:
        """The joints a keypoint head predicts: their names, the skeleton (0-based pairs), the class that has them
        and, when the data gives them, the OKS sigmas."""
        category = keypoint_category(source)
        if category is None:
            return {**info, "num_keypoints": 0, "keypoint_class": 0}
        label_of, _ = label_maps(source)
        return {**info, "num_keypoints": len(category["keypoints"]), "keypoint_class": label_of[category["id"]],
                "keypoint_names": list(category["keypoints"]),
                "skeleton": [[int(a) - 1, int(b) - 1] for a, b in category.get("skeleton", [])],
                "keypoint_sigmas": category.get("keypoint_sigmas")}

    def placeholder_info(self, data: str | None) -> dict:
        return {**super().placeholder_info(data), "num_keypoints": 14, "keypoint_class": 7}

    def scorer(self, bundle: DataBundle) -> Scorer:
        return InstanceScorer(bundle)

    def write_outputs(self, scorer: Scorer, run_dir) -> None:
        super().write_outputs(scorer, run_dir)
        if scorer.has_masks:
            write_json(run_dir / "predictions_segm.json", scorer.segm_results)
        if scorer.has_keypoints:
            write_json(run_dir / "predictions_keypoints.json", scorer.keypoint_results)

    def describe(self, output: dict, info: dict) -> dict:
        described = super().describe(output, info)
        if "masks" in output:
            masks = output["masks"].cpu().numpy()
            described["_masks"] = masks                                                     # (D, H, W) bool
            described["masks"] = [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}
                                  for rle in mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)
                                                                                 .astype(np.uint8)))] \
                if len(masks) else []
        if "keypoints" in output:
            person = int(info.get("keypoint_class") or 0)
            described["keypoints"] = [[[round(float(v), 2) for v in joint] for joint in joints]
                                      if int(label) == person else None
                                      for joints, label in zip(output["keypoints"].cpu(), output["labels"].cpu())]
        return described

    def draw(self, image: np.ndarray, prediction: dict, info: dict, min_score: float = 0.5) -> torch.Tensor:
        """Translucent masks under the boxes, then each person's skeleton."""
        shown = [i for i, score in enumerate(prediction["scores"]) if score >= min_score]
        picture = image_tensor(image)
        names = info["class_names"]
        colors = [PALETTE[names.index(prediction["labels"][i]) % len(PALETTE)] for i in shown]
        if shown and "_masks" in prediction:
            masks = torch.from_numpy(prediction["_masks"][shown]).bool()
            picture = draw_segmentation_masks(picture, masks, alpha=0.45, colors=colors)
        picture = super().draw(picture.permute(1, 2, 0).numpy(), prediction, info, min_score)
        joints_of = prediction.get("keypoints") or [None] * len(prediction["scores"])
        people = [i for i in shown if joints_of[i] is not None]
        if people:
            joints = torch.tensor([[joint[:2] for joint in joints_of[i]] for i in people])
            picture = draw_keypoints(picture, joints, connectivity=[tuple(pair) for pair in info.get("skeleton", [])],
                                     colors="yellow", radius=1, width=1)
        return picture


register("inst/mask_rcnn", InstanceTask,
         "Mask R-CNN: Faster R-CNN + a 28 x 28 mask per detection + a heat map per joint of each person",
         {**DETECTION_TRAINING, **mask_rcnn.OPTIONS, **mask_rcnn.TRAINING})(mask_rcnn.build)
