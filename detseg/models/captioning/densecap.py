"""DenseCap (Johnson, Karpathy and Fei-Fei, 2016): a caption instead of a category for every region.

The lecture's aside: "rather than predicting a fixed category label for each region, instead we want to write a
caption for each region". The detector is Faster R-CNN's, made class-agnostic - the recognition network's
classifier has two outputs, *a region worth describing* or background (DenseCap's confidence), and one box
refinement - and the category head's place is taken by a whole language model:

    images -> backbone -> RPN (the localization layer) -> RoIAlign (bilinear) -> recognition network (2 FC)
                                                                                   |-> confidence + box refinement
                                                                                   '-> region code -> LSTM -> words

The region code the LSTM starts from is the recognition network's output, so the caption loss trains the same
fully-connected layers, the RoI features and the backbone as the boxes do: one network, five named losses (RPN
objectness and box, region confidence and box, caption), each with a weight. Training captions the positive RoIs
(each with the caption of the ground-truth region it matched; teacher forcing); at test time the captioner runs on
the post-NMS detections only, greedily or with a beam.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from ...config import Option
from ...errors import ConfigError
from ..detection import faster_rcnn
from ..detection.backbone import build_detection_backbone
from ..detection.fast_rcnn import build_roi_pool_head
from ..detection.generalized import RegionDetector, detector_transform
from ..detection.heads import roi_head_settings
from ..detection.rpn import build_rpn
from .captioner import LSTMCaptioner, Vocabulary

CAPTION_OPTIONS = {
    "min_count": Option(1, "vocabulary: words seen fewer times in the training captions become <unk>", min=1),
    "max_caption_length": Option(16, "vocabulary: words per caption at most (longer training captions are cut)",
                                 min=1, max=64),
    "embed_size": Option(128, "captioner: size of word embeddings (and of the projected region code)", min=4, max=4096),
    "lstm_hidden": Option(256, "captioner: LSTM state size", min=4, max=4096),
    "condition": Option("first", "captioner: where the region code enters - first (DenseCap: the first input "
                                 "only) | every (also beside every word's input)", choices=("first", "every")),
    "colour_skip": Option("none", "tiny backbone: append to its last map, average-pooled to its cells, the image "
                                  "(image: 3 channels) or the stem's map (stem: its channels) - a hypercolumn; deep "
                                  "class-agnostic features keep shape, not colour", choices=("none", "image", "stem")),
    "pixel_code": Option(7, "captioner: also read the region's own pixels, RoIAlign'd from the normalised image to "
                            "k x k (3 k^2 numbers beside the region code; 0 = off: DenseCap's code only) - the "
                            "region's colours, which class-agnostic deep features drop", min=0, max=16, before=0),
    "caption_dropout": Option(0.0, "captioner: dropout before the word classifier", min=0, max=0.9),
    "beam": Option(1, "test-time captions: 1 = greedy, > 1 = beam search of this width", min=1, max=20),
    "caption_loss_weight": Option(1.0, "weight of the caption cross-entropy", min=0),
    "captions_per_image": Option(32, "positive RoIs captioned per training image at most", min=1),
}
OPTIONS = {**faster_rcnn.OPTIONS, **CAPTION_OPTIONS}
# Few regions per scene: 50 after NMS keep every object and the captioner's work small.
OPTIONS["detections_per_image"] = Option(50, "regions captioned per image after NMS", min=1)
TRAINING = {**faster_rcnn.TRAINING, "epochs": Option(20, "passes over the training set", min=0)}


class ColourSkip(nn.Module):
    """``backbone`` (a :class:`~detseg.models.backbones.TinyConvNet`) plus the image or its stem's map averaged over
    each cell of the last map: ``(N, C + 3 | C + C_stem, h, w)``.

    A class-agnostic detector has no reason to keep colour in its deep features (every object is one class), and a
    probe of the trained region codes finds little of it. Appending shallow maps - Hariharan et al.'s hypercolumns,
    here the input itself or the first convolution's output - hands the captioner what the stem still knows."""

    def __init__(self, backbone: nn.Module, source: str = "image"):
        super().__init__()
        self.body, self.source = backbone, source
        extra = 3 if source == "image" else backbone.stage_channels[0]
        self.out_channels = backbone.out_channels + extra
        self.stride = backbone.stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.source == "image":
            features, shallow = self.body(images), images                                  # (N, C, h, w), image
        else:
            stages = self.body.forward_stages(images)
            features, shallow = stages[-1], stages[0]                                      # last map, stem map
        return torch.cat([features, F.adaptive_avg_pool2d(shallow, features.shape[-2:])], dim=1)


class DenseCap(RegionDetector):
    """A class-agnostic :class:`RegionDetector` (``num_classes`` 2) + ``captioner`` on the region codes.

    Targets (training) add ``captions`` (a list of G strings, '' where an object has none: it trains the boxes
    only) to the detectors'; their category labels are ignored. Eval mode returns per image ``boxes``, ``scores``
    (the confidence), ``labels`` (all 1) and ``captions`` (a list of D strings).
    """

    def __init__(self, *args, captioner: LSTMCaptioner, vocabulary: Vocabulary, beam: int = 1,
                 captions_per_image: int = 32, pixel_code: int = 0, **kwargs):
        super().__init__(2, *args, **kwargs)
        self.captioner, self.vocabulary = captioner, vocabulary
        self.beam, self.captions_per_image, self.pixel_code = beam, captions_per_image, pixel_code

    def caption_codes(self, features, batch, rois: list[torch.Tensor]) -> torch.Tensor:
        """What the captioner reads per region: the recognition network's code, and with ``pixel_code`` = k the
        region's k x k bilinear samples of the normalised image beside it: ``(R, hidden [+ 3 k^2])``."""
        codes = self.roi_head.codes(features, rois, batch.input_size)                       # (R, hidden)
        if not self.pixel_code:
            return codes
        pixels = roi_align(batch.normalized, [r.to(codes.dtype) for r in rois], self.pixel_code,
                           spatial_scale=1.0, sampling_ratio=2, aligned=True)                  # (R, 3, k, k)
        return torch.cat([codes, pixels.flatten(1)], dim=1)

    def training_losses(self, images, targets: list[dict]) -> dict[str, torch.Tensor]:
        # Every annotated region is one class, "something to describe"; what it is goes into the caption.
        agnostic = [{**target, "labels": torch.ones_like(target["labels"])} for target in targets]
        return super().training_losses(images, agnostic)

    def region_losses(self, features, batch, targets, rois, labels, matches) -> dict[str, torch.Tensor]:
        """Caption cross-entropy of the positive RoIs (at most ``captions_per_image`` each image) whose object
        has a caption."""
        chosen_rois, captions = [], []
        for image_rois, image_labels, image_matches, target in zip(rois, labels.split([len(r) for r in rois]),
                                                                   matches, targets):
            texts = target.get("captions") or [""] * len(target["boxes"])
            keep = [i for i in torch.nonzero(image_labels > 0).flatten().tolist()
                    if texts[int(image_matches[i])]][:self.captions_per_image]
            chosen_rois.append(image_rois[keep])
            captions += [texts[int(image_matches[i])] for i in keep]
        codes = self.caption_codes(features, batch, chosen_rois)                             # (P, D)
        words = self.vocabulary.targets(captions, device=codes.device)                      # (P, L+1)
        return {"caption": self.captioner.loss(codes, words)}

    def region_outputs(self, features, batch, detections: list[dict]) -> None:
        """A caption for every detection, from the code of its refined box."""
        codes = self.caption_codes(features, batch, [found["boxes"] for found in detections])   # (D, code)
        ids = self.captioner.generate(codes, self.vocabulary.max_length, self.beam)        # (D, L+1)
        sentences = [self.vocabulary.decode(row) for row in ids.tolist()]
        start = 0
        for found in detections:
            found["captions"] = sentences[start:start + len(found["boxes"])]
            start += len(found["boxes"])


def build(config: dict, info: dict) -> DenseCap:
    """Faster R-CNN's stages with two classes, the recognition network's code feeding an LSTM captioner."""
    backbone = build_detection_backbone(config)
    if config.get("colour_skip", "none") != "none":
        if config["backbone"] != "tiny":
            raise ConfigError(f"colour_skip={config['colour_skip']}: only with backbone=tiny (one feature map)")
        backbone = ColourSkip(backbone, config["colour_skip"])
    sampling, postprocess, weights = roi_head_settings(config)
    weights["caption"] = config["caption_loss_weight"]
    roi_head = build_roi_pool_head(config, backbone, 2)
    vocabulary = Vocabulary.from_info(info["vocabulary"])
    pixel_code = config["pixel_code"]
    captioner = LSTMCaptioner(config["head_hidden"] + 3 * pixel_code ** 2, len(vocabulary), config["embed_size"],
                              config["lstm_hidden"], config["caption_dropout"], config.get("condition", "first"))
    return DenseCap(build_rpn(config, backbone.out_channels), roi_head, backbone, sampling, postprocess, weights,
                    transform=detector_transform(config, info), captioner=captioner, vocabulary=vocabulary,
                    beam=config["beam"], captions_per_image=config["captions_per_image"], pixel_code=pixel_code)
