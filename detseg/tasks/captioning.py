"""Dense captioning: a box, a confidence and a sentence for every region worth describing.

The task of ``cap/densecap``. It reads the detection data (scenes, or COCO json whose annotations carry a
``caption`` string - what ``detseg data scenes`` writes, and what ``detseg data convert-vg`` makes of Visual Genome)
and adds each object's caption to its target. Regions are class-agnostic: the model's labels are all 1 ("region"),
and the categories of the data play no part. The vocabulary is built here from the training captions and kept in
the data info, so it is saved in every checkpoint.

Scoring is :mod:`detseg.captioning_metrics` on the detections in the original images' pixels: ``densecap_map``
(IoU x METEOR grid; METEOR 1.5 with Java), ``det_map``, ``bleu4``, ``cider``. The regions it scored are written as
predictions.json (``image_id``, ``bbox`` x y w h, ``score``, ``caption``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..captioning_metrics import densecap_scores, meteor_scorer, meteor_unavailable_reason, regions_by_image
from ..config import Option
from ..errors import ConfigError
from ..io import write_json
from ..models.captioning import densecap
from ..models.captioning.captioner import Vocabulary
from ..registry import register
from ..viz import draw_captioned_boxes
from .base import DataBundle, Scorer, image_tensor
from .detection import DETECTION_OPTIONS, DETECTION_TRAINING, DetectionScorer, DetectionTask, plain_target

REGION_NAMES = ["background", "region"]


def caption_target(target: dict) -> dict:
    """A box detector's target plus the objects' captions (G strings, '' where none)."""
    converted = plain_target(target)
    converted["captions"] = list(target.get("captions", [""] * len(converted["boxes"])))
    return converted


def training_captions(train_set) -> list[str]:
    """Every caption of a training set: from the targets in memory, or the source's annotations."""
    targets = getattr(train_set, "targets", None)
    if targets is not None:
        return [caption for target in targets for caption in target.get("captions", [])]
    source = train_set.source
    annotations = getattr(source, "annotations", None)
    if annotations is None:
        annotations = [a for index in range(len(source)) for a in source.sample(index).annotations]
    return [str(annotation.get("caption", "")) for annotation in annotations]


class CaptionScorer(DetectionScorer):
    """Detections and the validation set's regions per image, in the original images' pixels (mapped back as
    :class:`DetectionScorer` maps boxes); scored by :func:`densecap_scores`."""

    def __init__(self, bundle: DataBundle):
        super().__init__(bundle)
        self.truth = regions_by_image(self.ground_truth)
        self.detections: list[dict] = []

    def update(self, outputs: list[dict], targets: list[dict]) -> None:
        for found, target in zip(outputs, targets):
            scale = found["boxes"].new_tensor(self.scale_to_original(target) * 2)
            self.image_ids.append(target["image_id"])
            self.detections.append({"boxes": (found["boxes"] * scale).cpu(), "scores": found["scores"].cpu(),
                                    "captions": list(found["captions"])})

    def compute(self) -> dict:
        with meteor_scorer() as meteor:
            metrics = densecap_scores(self.detections, [self.truth[i] for i in self.image_ids], meteor)
        self.results = [{"image_id": image_id, "bbox": [round(float(x1), 2), round(float(y1), 2),
                                                         round(float(x2 - x1), 2), round(float(y2 - y1), 2)],
                         "score": round(float(score), 5), "caption": caption}
                        for image_id, found in zip(self.image_ids, self.detections)
                        for (x1, y1, x2, y2), score, caption in zip(found["boxes"].tolist(),
                                                                    found["scores"].tolist(), found["captions"])]
        metrics["detections_per_image"] = len(self.results) / max(1, len(self.image_ids))
        return metrics


# Flips are off: a mirrored image makes "left of" in its captions a lie.
CAPTIONING_OPTIONS = {**DETECTION_OPTIONS, "hflip": Option(False, "random horizontal flips during training (off: "
                                                                   "a flip makes 'left of' a lie)")}


class CaptioningTask(DetectionTask):
    name = "captioning"
    options = CAPTIONING_OPTIONS
    fields = ("captions",)
    convert = staticmethod(caption_target)

    @property
    def main_metric(self) -> str:
        """``densecap_map`` decides best.pt where METEOR runs, else the detection half of it."""
        return "densecap_map" if meteor_unavailable_reason() is None else "det_map"

    def make_data(self, data: str | None, val: str | None) -> DataBundle:
        bundle = super().make_data(data, val)
        captions = training_captions(bundle.train)
        if not any(captions):
            raise ConfigError("cap/densecap: no annotation of the training set has a 'caption' string to learn "
                              "from (COCO files need one per annotation; see detseg data convert-vg)")
        vocabulary = Vocabulary.build(captions, self.config["min_count"], self.config["max_caption_length"])
        bundle.info.update(class_names=REGION_NAMES, num_classes=2, category_ids=[0, 1],
                           vocabulary=vocabulary.to_info())
        return bundle

    def placeholder_info(self, data: str | None) -> dict:
        return {"num_classes": 2, "class_names": REGION_NAMES, "image_size": self.config["image_size"],
                "vocabulary": Vocabulary(["a", "region"], self.config["max_caption_length"]).to_info()}

    def scorer(self, bundle: DataBundle) -> Scorer:
        return CaptionScorer(bundle)

    def write_outputs(self, scorer: Scorer, run_dir) -> None:
        write_json(run_dir / "predictions.json", scorer.results)

    def describe(self, output: dict, info: dict) -> dict:
        described = super().describe(output, info)
        described["captions"] = list(output["captions"])
        return described

    def draw(self, image: np.ndarray, prediction: dict, info: dict, min_score: float = 0.5) -> torch.Tensor:
        """Each region's box with its caption on a dark band above it (the best-scoring drawn last, on top)."""
        shown = [i for i, score in enumerate(prediction["scores"]) if score >= min_score][::-1]
        return draw_captioned_boxes(image_tensor(image), [prediction["boxes"][i] for i in shown],
                                    [prediction["captions"][i] for i in shown])


register("cap/densecap", CaptioningTask,
         "DenseCap: class-agnostic Faster R-CNN whose region codes feed an LSTM writing a caption per region",
         {**DETECTION_TRAINING, **densecap.OPTIONS, **densecap.TRAINING})(densecap.build)
