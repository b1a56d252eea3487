"""ONNX export: a model's eval-mode forward pass, its preprocessing included, as one graph a user feeds pixels.

What the file takes and gives (names are the ONNX graph's input and output names):

* input ``images``: float32 ``(N, 3, H, W)`` RGB in [0, 1] at the export size - the checkpoint's input size
  (``info["image_size"]``, the classifier's input shape; an aspect-preserving detector: a square of ``min_size``
  rounded up to its padding multiple) unless ``size`` says otherwise. Resizing is the caller's: the graph is traced
  at that size and holds no resize or padding; normalisation with the statistics saved in the checkpoint is its
  first stage. Vector classifiers take ``inputs`` ``(N, D)``.
* classification: ``logits`` (N, K), ``probabilities`` (N, K).
* segmentation: ``scores`` (N, C, H, W) class logits, ``labels`` (N, H, W) int64.
* localization: ``boxes`` (N, 4) XYXY in the input's pixels, ``scores`` (N,), ``labels`` (N,) in 0..K-1.
* pose: ``keypoints`` (N, 14, 3): x, y in the input's pixels and 1, LSP joint order.
* instance segmentation (``inst/mask_rcnn``): the detection outputs, plus per detection ``mask_probabilities``
  (D, 28, 28), its class's mask before pasting, and ``keypoint_heatmaps`` (D, J, 56, 56) (see
  :class:`InstanceGraph`: pasting and the heat maps' arg-max are the consumer's).
* detection (``det/faster_rcnn``, ``det/yolo``, ``det/ssd``): one image, ``N = 1``, as
  torchvision's exported detectors: ``boxes`` (D, 4) XYXY in the input's pixels, ``scores`` (D,), ``labels`` (D,)
  in 1..K, best score first, after the model's own thresholding and per-class NMS (``torchvision::nms`` and
  ``roi_align`` / ``roi_pool`` export through torchvision's ONNX symbolics, hence opset 17).

``dynamic=True`` makes the batch dynamic and, for the fully convolutional segmenters exported at a multiple of the
network's stride, height and width too (in multiples of that stride, ``detseg_size_multiple`` in the file's
metadata). Detectors stay at one image of the export size: their anchors and default boxes are made for it.

Why a small wrapper per family rather than ``model(images)`` itself: the exporter (TorchScript-based,
``dynamo=False``) records one run, and Python numbers taken from tensors on the way - ``len(proposals)``, a loop over
the images of a batch, ``if len(candidates) > pre_nms`` - are frozen into the graph at the values of that run. Each
wrapper calls the model's own stages and re-expresses only the per-image tail of its eval path in tensor operations;
:func:`check_onnx` then runs the file in onnxruntime against the eager ``model(images)`` of the model contract, so
a wrapper that drifts from its model fails the check instead of exporting wrong numbers.

Not exported, each with a one-line :class:`~detseg.errors.ConfigError`: ``up=max_unpool`` (torch.onnx has no
conversion for max unpooling), ``seg/sliding_window`` (nor for its ``Tensor.unfold`` crops), the Selective Search
detectors (OpenCV runs outside the network), ``det/rfcn`` (no ONNX symbolic for ``ps_roi_align`` /
``ps_roi_pool``), ``det/sliding_window`` (a baseline, not a deployable detector) and the torchvision reference rows.
A model whose layers torch.onnx cannot convert at its size (an adaptive pooling to a grid larger than its feature
map, say) is a ConfigError quoting the exporter.
"""
from __future__ import annotations

import io
import json
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .io import atomic_write_bytes
from .models.base import DetsegModel
from .models.captioning.densecap import DenseCap
from .models.classification import Classifier
from .models.detection.generalized import ROI_BOX_WEIGHTS, GivenProposals, RegionDetector
from .models.detection.single_shot import SingleShotDetector
from .models.instance.mask_rcnn import MaskRCNN
from .models.localization.classify_localize import ClassifyLocalize, boxes_to_pixels
from .models.localization.pose_regression import PoseRegressor
from .models.segmentation.encoder_decoder import EncoderDecoder
from .models.segmentation.segmenter import Segmenter, SlidingWindowSegmentation
from .ops.boxes import clip_and_filter, decode_box_deltas
from .ops.upsample import MaxUnpool

OPSET = 17                 # >= 16: torchvision's roi_align symbolic with aligned=True
TOLERANCE = 1e-4           # scores, logits, probabilities
BOX_TOLERANCE = 1e-3       # boxes and joints, in pixels
DETECTION_OUTPUTS = ("boxes", "scores", "labels")


def require_onnx():
    """``(onnx, onnxruntime)``, or a ConfigError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ConfigError(f"ONNX export needs the export extra ({err.name} is not installed): "
                          f"pip install 'detseg[export]'") from None
    return onnx, onnxruntime


def onnx_session(model_file: str | Path | bytes, threads: int = 0):
    """An onnxruntime CPU session; ``threads`` > 0 fixes its intra-op threads, to time it against torch fairly.

    With ``threads``, the pool's threads also stop spinning between runs: by default they busy-wait for the next
    run, which on a machine of few cores takes them from whatever runs next (torch's threads, alternating with it in
    a benchmark, measured several times slower for it).
    """
    _, onnxruntime = require_onnx()
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model_file if isinstance(model_file, bytes) else str(model_file)
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


# ---- the per-family graphs: input tensor -> tuple of outputs ----------------------------------------------------

class ModelGraph(nn.Module):
    """What the exporter traces: one model's eval path as tensors in, a tuple of named outputs out."""

    def __init__(self, model: DetsegModel):
        super().__init__()
        self.model = model


class ClassifierGraph(ModelGraph):
    """Standardise, classify: (N, 3, H, W) or (N, D) -> logits (N, K), probabilities (N, K)."""

    def forward(self, inputs: torch.Tensor):
        logits = self.model.network(self.model.standardized(inputs))
        return logits, logits.softmax(dim=1)


class SegmenterGraph(ModelGraph):
    """(N, 3, H, W) -> class scores (N, C, H, W) and labels (N, H, W) at the input's size."""

    def forward(self, images: torch.Tensor):
        scores = self.model.scores(self.model.transform.batch(images))
        return scores, scores.argmax(dim=1)


class LocalizerGraph(ModelGraph):
    """(N, 3, H, W) -> one box (N, 4) in input pixels, its class's probability (N,) and the class (N,)."""

    def forward(self, images: torch.Tensor):
        batch = self.model.transform.batch(images)
        outputs = self.model.outputs(batch.normalized)
        scores, labels = outputs["logits"].softmax(dim=1).max(dim=1)
        boxes = outputs["boxes"]
        if boxes.dim() == 3:      # per-class boxes (N, K, 4): the predicted class's, by gather (no arange(len(...)))
            boxes = boxes.gather(1, labels.view(-1, 1, 1).expand(-1, 1, 4)).squeeze(1)
        return boxes_to_pixels(boxes, *batch.input_size), scores, labels


class PoseGraph(ModelGraph):
    """(N, 3, H, W) -> joints (N, 14, 3): x, y in input pixels and 1, as the model's eval output."""

    def forward(self, images: torch.Tensor):
        batch = self.model.transform.batch(images)
        height, width = batch.input_size
        joints = self.model.joints(batch.normalized) * batch.normalized.new_tensor([width, height])   # (N, 14, 2)
        return torch.cat([joints, torch.ones_like(joints[..., :1])], dim=-1)


class SingleShotGraph(ModelGraph):
    """One image (1, 3, H, W) -> its detections, through the model's own decoding and ``select``.

    ``select`` keeps the best ``pre_nms`` candidates only when more pass the threshold - a branch the trace would
    freeze. Scores outside the top ``pre_nms`` of all are set to -1 first (below any threshold), so the branch is
    never taken and the same candidates reach NMS: the top ``pre_nms`` above the threshold.
    """

    def forward(self, images: torch.Tensor):
        batch, _, outputs = self.model.outputs(images)
        boxes, scores = self.model.decode(outputs, batch.input_size)            # (1, P, 4), (1, P, K)
        flat = scores[0].flatten()                                              # (P * K,)
        best = flat.topk(min(self.model.postprocess.pre_nms, flat.numel())).indices
        kept = torch.full_like(flat, -1.0).scatter(0, best, flat[best]).view_as(scores[0])
        found = self.model.select(boxes[0], kept, batch.image_sizes[0])
        return found["boxes"], found["scores"], found["labels"]


class RegionGraph(ModelGraph):
    """One image (1, 3, H, W) -> its detections: the detector's stages, then :meth:`RegionDetector.detections` for
    one image in tensor operations (that method splits the batch by ``len(proposals)``, which a trace freezes)."""

    def forward(self, images: torch.Tensor):
        return self.detect(images)[:3]

    def detect(self, images: torch.Tensor):
        """``(boxes, scores, labels, features the RoI heads read, the batch)`` of one image."""
        model = self.model
        batch = model.transform.batch(images)
        features = model.backbone(batch.normalized) if model.backbone is not None else batch.normalized
        head_input = model.roi_head.per_image(features) if hasattr(model.roi_head, "per_image") else features
        proposals, _ = model.proposer(batch.pixels * 255.0, features, batch.input_size, None)
        logits, deltas = model.roi_head(head_input, proposals, batch.input_size)   # (P, K+1), (P, 4 (K+1))
        probabilities = logits.softmax(dim=1)[:, 1:]                              # (P, K): background dropped
        boxes = decode_box_deltas(proposals[0], deltas, ROI_BOX_WEIGHTS).view(-1, model.num_classes, 4)[:, 1:]
        labels = torch.arange(1, model.num_classes, device=logits.device).expand_as(probabilities)
        settings = model.postprocess
        kept = clip_and_filter(boxes.reshape(-1, 4), probabilities.reshape(-1), batch.image_sizes[0],
                               min_size=settings.min_size, score_thresh=settings.score_thresh,
                               nms_thresh=settings.nms_thresh, top_k=settings.detections_per_image,
                               labels=labels.reshape(-1))
        return kept.boxes, kept.scores, kept.labels, head_input, batch


class InstanceGraph(RegionGraph):
    """``inst/mask_rcnn``: the detections, then its heads at the detections' boxes - ``mask_probabilities``
    (D, M, M), each detection's class's mask before pasting, and ``keypoint_heatmaps`` (D, J, S, S) (rows of other
    classes than the keypoint class are computed too and are meaningless). Pasting a mask at its box and the
    bicubic arg-max of a heat map work per detection at its own size, which a trace cannot express; they are the
    consumer's (:func:`detseg.models.instance.heads.paste_masks`, :func:`~detseg.models.instance.heads.decode_keypoints`)."""

    def forward(self, images: torch.Tensor):
        boxes, scores, labels, features, batch = self.detect(images)
        return (boxes, scores, labels) + instance_outputs(self.model, features, batch, boxes, labels)


def instance_outputs(model, features, batch, boxes: torch.Tensor, labels: torch.Tensor) -> tuple:
    """The per-detection outputs of Mask R-CNN's heads at ``boxes`` (input pixels), as :class:`InstanceGraph`
    gives them."""
    outputs, input_size = (), batch.input_size
    if model.mask_head is not None:
        logits = model.mask_head(features, [boxes], input_size, batch.normalized)            # (D, K+1, M, M)
        outputs += (logits[torch.arange(len(labels), device=labels.device), labels].sigmoid(),)
    if model.keypoint_head is not None:
        outputs += (model.keypoint_head(features, [boxes], input_size),)                   # (D, J, S, S)
    return outputs


def instance_output_names(model) -> tuple[str, ...]:
    return (("mask_probabilities",) if model.mask_head is not None else ()) + \
        (("keypoint_heatmaps",) if model.keypoint_head is not None else ())


def _instance_reference(model) -> Callable:
    """The eager model's own detections (the model contract), then its heads at those boxes."""
    def reference(images: torch.Tensor) -> tuple:
        found = model(images)[0]
        batch = model.transform.batch(images)
        features = model.backbone(batch.normalized)
        features = model.roi_head.per_image(features) if hasattr(model.roi_head, "per_image") else features
        return tuple(found[key] for key in DETECTION_OUTPUTS) + instance_outputs(
            model, features, batch, found["boxes"], found["labels"])
    return reference


# ---- what to export: the graph, its names and axes, the eager reference ----------------------------------------

@dataclass
class Plan:
    """How one model is exported and checked."""

    graph: nn.Module
    input_name: str
    input_shape: tuple[int, ...]                       # the export (example) input's shape
    output_names: tuple[str, ...]
    reference: Callable[[torch.Tensor], tuple]         # eager ``model(inputs)`` in the graph's output layout
    detection: bool = False                            # outputs are one image's detections (compared as a set)
    batch_dynamic: bool = False
    size_multiple: int = 0                             # > 0: H, W dynamic in multiples of this

    def __post_init__(self):
        self.graph.eval()     # torch.onnx.export restores the graph's mode afterwards, and with it the model's

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx's ``dynamic_axes``: the detections' count; else the batch and a segmenter's height, width."""
        if self.detection:
            return {name: {0: "detections"} for name in self.output_names}
        batch = {0: "batch"} if self.batch_dynamic else {}
        sides = ("height", "width") if self.size_multiple else ()
        axes = {self.input_name: {**batch, **dict(zip((2, 3), sides))}}
        for name in self.output_names:        # scores (N, C, H, W), labels (N, H, W); any other output (N, ...)
            axes[name] = {**batch, **dict(zip({"scores": (2, 3), "labels": (1, 2)}.get(name, ()), sides))}
        return {name: value for name, value in axes.items() if value}


def _stacked(model: nn.Module, keys: tuple[str, ...], stack=torch.stack) -> Callable:
    """The eager reference: ``model(inputs)`` (one dict per input) -> one tensor per key, stacked over inputs."""
    def reference(inputs: torch.Tensor) -> tuple:
        outputs = model(inputs)
        return tuple(stack([output[key] for output in outputs]) for key in keys)
    return reference


def _first_image(model: nn.Module) -> Callable:
    def reference(images: torch.Tensor) -> tuple:
        found = model(images)[0]
        return tuple(found[key] for key in DETECTION_OUTPUTS)
    return reference


def plan_export(model: nn.Module, model_name: str, dynamic: bool = False) -> Plan:
    """The :class:`Plan` of an eval-mode model (at its transform's current input size), or a ConfigError naming why
    it cannot be exported."""
    if isinstance(model, Classifier):
        shape = (1, *model.input_shape)
        return Plan(ClassifierGraph(model), "images" if model.is_image else "inputs", shape,
                    ("logits", "probabilities"), _stacked(model, ("logits", "probabilities")), batch_dynamic=dynamic)
    if not isinstance(model, DetsegModel) or not hasattr(model, "transform"):
        raise _not_exported(model_name)
    height, width = model.transform.shape
    shape = (1, 3, height, width)
    if isinstance(model, Segmenter):
        if any(isinstance(module, MaxUnpool) for module in model.modules()):
            raise ConfigError(f"{model_name} up=max_unpool: cannot be exported to ONNX, torch.onnx has no conversion "
                              f"for max unpooling (aten::max_unpool2d); retrain with up=transposed, nearest, "
                              f"bed_of_nails or resize_conv")
        if isinstance(model, SlidingWindowSegmentation):
            raise ConfigError(f"{model_name}: cannot be exported to ONNX, torch.onnx cannot convert its crop "
                              f"extraction (Tensor.unfold of the padded image); export seg/fcn_fullres or "
                              f"seg/encoder_decoder instead")
        multiple = 0
        if dynamic:
            network = model.network
            multiple = network.stem_stride * 2 ** network.depth if isinstance(network, EncoderDecoder) else 1
            multiple = multiple if height % multiple == 0 and width % multiple == 0 else 0
        return Plan(SegmenterGraph(model), "images", shape, ("scores", "labels"),
                    _stacked(model, ("scores", "labels")), batch_dynamic=dynamic, size_multiple=multiple)
    if isinstance(model, ClassifyLocalize):
        return Plan(LocalizerGraph(model), "images", shape, DETECTION_OUTPUTS,
                    _stacked(model, DETECTION_OUTPUTS, torch.cat), batch_dynamic=dynamic)
    if isinstance(model, PoseRegressor):
        return Plan(PoseGraph(model), "images", shape, ("keypoints",), _stacked(model, ("keypoints",), torch.cat),
                    batch_dynamic=dynamic)
    if isinstance(model, DenseCap):
        raise ConfigError(f"{model_name}: no ONNX export: its captions are an LSTM's data-dependent loop decoded to "
                          f"words; predict with detseg predict (the boxes alone would drop what the model is for)")
    if isinstance(model, (SingleShotDetector, RegionDetector)):
        if isinstance(model, RegionDetector):
            _check_region_detector(model, model_name)
        if dynamic:
            raise ConfigError(f"{model_name}: --dynamic does not apply to detectors, exported for one image of "
                              f"{height}x{width} px (their anchors / default boxes are made for that size); "
                              f"use --size HxW for another size")
        if isinstance(model, MaskRCNN):
            return Plan(InstanceGraph(model), "images", shape, DETECTION_OUTPUTS + instance_output_names(model),
                        _instance_reference(model), detection=True)
        graph = SingleShotGraph(model) if isinstance(model, SingleShotDetector) else RegionGraph(model)
        return Plan(graph, "images", shape, DETECTION_OUTPUTS, _first_image(model), detection=True)
    raise _not_exported(model_name)


def _not_exported(model_name: str) -> ConfigError:
    return ConfigError(f"{model_name}: no ONNX export for this model (exported: cls/*, seg/*, loc/*, pose/*, "
                       f"det/faster_rcnn, det/yolo, det/ssd, inst/mask_rcnn; the torchvision references are benchmark "
                       f"rows, torchvision exports its own detectors)")


def _check_region_detector(model: RegionDetector, model_name: str) -> None:
    if isinstance(model.proposer, GivenProposals):
        raise ConfigError(f"{model_name}: cannot be exported to ONNX, its Selective Search proposals come from "
                          f"OpenCV outside the network; export det/faster_rcnn (a learned RPN) instead")
    if model.backbone is None:
        raise ConfigError(f"{model_name}: not exported to ONNX: a CNN per sliding window is the lecture's brute-force "
                          f"baseline, not a deployable detector; export det/faster_rcnn, det/yolo or det/ssd")
    if type(model.roi_head).__name__ == "PositionSensitiveHead":
        raise ConfigError(f"{model_name}: cannot be exported to ONNX, torchvision's ps_roi_align / ps_roi_pool have "
                          f"no ONNX symbolic; export det/faster_rcnn instead")


# ---- export and check -------------------------------------------------------------------------------------------

def parse_size(text: str | int | None) -> tuple[int, int] | None:
    """``"128"`` or ``"96x128"`` (height x width) -> (height, width); None stays None."""
    if text is None:
        return None
    parts = str(text).lower().split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 8:
        raise ConfigError(f"--size {text}: expected a side or HEIGHTxWIDTH in pixels, each at least 8")
    return (values[0], values[-1])


def export_size(transform) -> tuple[int, int]:
    """The default (height, width) of an export: the transform's square, or the short side of its aspect mode."""
    if not transform.keeps_aspect:
        return transform.shape
    step = max(1, transform.size_divisible)
    height, width = transform.resized_shape(*transform.shape)
    return -(-height // step) * step, -(-width // step) * step


def export_onnx(model: nn.Module, payload: dict, out: str | Path, *, dynamic: bool = False,
                size: tuple[int, int] | None = None, check: bool = True) -> dict:
    """Export an eval-mode ``model`` (from :func:`detseg.api.load`) to ``out``, then check the file in onnxruntime.

    Returns a report: the file, input and output names and shapes, and per output the largest difference from the
    eager model (``max_diff``), with ``within_tolerance`` (1e-4 on scores, 1e-3 px on boxes and joints).
    """
    onnx, _ = require_onnx()
    name = payload["model_name"]
    transform = getattr(model, "transform", None)
    if size is not None and transform is None:
        raise ConfigError(f"--size: {name} has a fixed input shape {tuple(model.input_shape)}")
    # Always at one fixed size: the square input, or for an aspect-preserving detector a square at its min_size
    # (rounded up to the padding multiple); --size another. The graph then never resizes or pads.
    resized = transform.resized_to(size or export_size(transform)) if transform is not None else nullcontext()
    with resized, torch.no_grad():
        plan = plan_export(model.eval(), name, dynamic)
        example = _check_inputs(plan, count=1)[0]
        buffer = io.BytesIO()
        with warnings.catch_warnings():   # the tracer's warnings are about the frozen numbers the wrappers avoid
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(plan.graph, (example,), buffer, dynamo=False, opset_version=OPSET,
                                  input_names=[plan.input_name], output_names=list(plan.output_names),
                                  dynamic_axes=plan.dynamic_axes() or None)
            except torch.onnx.OnnxExporterError as err:   # an operator torch.onnx cannot convert at this config
                reason = str(err).split("Please feel free")[0].strip().splitlines()[0]
                raise ConfigError(f"{name} at {plan.input_shape[-2]}x{plan.input_shape[-1]} px: torch.onnx cannot "
                                  f"convert it ({reason})") from None
        graph = onnx.load_from_string(buffer.getvalue())
        _add_metadata(onnx, graph, plan, payload, model)
        atomic_write_bytes(out, graph.SerializeToString())
        report = {"file": str(out), "model": name, "opset": OPSET,
                  "input": {"name": plan.input_name, "shape": _axes_text(plan, plan.input_name, plan.input_shape),
                            "dtype": "float32"},
                  "outputs": list(plan.output_names), "bytes": Path(out).stat().st_size}
        if check:
            report.update(check_onnx(plan, out))
    return report


def _axes_text(plan: Plan, name: str, shape: tuple[int, ...]) -> list:
    axes = plan.dynamic_axes().get(name, {})
    return [axes.get(index, side) for index, side in enumerate(shape)]


def _add_metadata(onnx, graph, plan: Plan, payload: dict, model: nn.Module) -> None:
    """What a user of the bare file needs: the model, its input contract, class names."""
    info = payload.get("info", {})
    transform = getattr(model, "transform", None)
    mean = transform.mean if transform is not None else model.mean
    std = transform.std if transform is not None else model.std
    props = {"detseg_model": payload["model_name"], "detseg_input": plan.input_name,
             "detseg_input_shape": json.dumps(list(plan.input_shape)),
             "detseg_input_range": "float32 in [0, 1], RGB" if plan.input_name == "images" else "raw vectors",
             "detseg_normalization": json.dumps({"mean": mean.tolist(), "std": std.tolist()}),
             "detseg_outputs": json.dumps(list(plan.output_names)),
             "detseg_class_names": json.dumps(list(info.get("class_names", []))),
             "detseg_size_multiple": str(plan.size_multiple)}
    onnx.helper.set_model_props(graph, props)
    graph.doc_string = (f"detseg {payload['model_name']}: {plan.input_name} -> {', '.join(plan.output_names)}"
                        f"{' (one image)' if plan.detection else ''}")


def _check_inputs(plan: Plan, count: int = 3) -> list[torch.Tensor]:
    """Scenes at the export size (what the model was made for) and one uniform random input; with dynamic axes
    also a batch of 2 and an input one size multiple larger."""
    from .data.scenes import ScenesSource

    shape = plan.input_shape
    generator = torch.Generator().manual_seed(0)
    if plan.input_name != "images":
        return [torch.rand(shape, generator=generator) * 4 - 2 for _ in range(count)]

    def scenes(batch: int, height: int, width: int, first: int = 0) -> torch.Tensor:
        source = ScenesSource(first + batch, size=(width, height), seed=0)
        pixels = np.stack([source.render(first + index).image for index in range(batch)])   # (B, H, W, 3) uint8
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255.0)

    _, _, height, width = shape
    inputs = [scenes(1, height, width, first=index) for index in range(min(count, 2))]
    inputs += [torch.rand(shape, generator=generator) for _ in range(count - len(inputs))]
    if plan.batch_dynamic and count > 1:
        inputs.append(scenes(2, height, width, first=2))
    if plan.size_multiple and count > 1:
        inputs.append(scenes(1, height + plan.size_multiple, width + 2 * plan.size_multiple))
    return inputs


def check_onnx(plan: Plan, model_file: str | Path) -> dict:
    """Run the file in onnxruntime and the model in PyTorch on the same inputs; the largest differences."""
    session = onnx_session(model_file)
    differences = {name: 0.0 for name in plan.output_names}
    mismatches = 0
    transform = getattr(plan.graph.model, "transform", None)
    inputs = _check_inputs(plan)
    for inputs_ in inputs:
        size = tuple(inputs_.shape[-2:])
        # An input of another size (dynamic H, W) is compared with the model run at that size, not resized to its own.
        at_size = transform.resized_to(size) if transform is not None and size != transform.shape else nullcontext()
        with at_size, torch.no_grad():
            expected = [value.cpu().numpy() for value in plan.reference(inputs_)]
        got = session.run(list(plan.output_names), {plan.input_name: inputs_.numpy()})
        compare = _compare_detections if plan.detection else _compare_dense
        found, wrong = compare(dict(zip(plan.output_names, expected)), dict(zip(plan.output_names, got)))
        mismatches += wrong
        for name, value in found.items():
            differences[name] = max(differences[name], value)
    within = mismatches == 0 and all(value <= _tolerance(name) for name, value in differences.items())
    return {"checked_inputs": ["x".join(map(str, value.shape)) for value in inputs], "max_diff": differences,
            "mismatches": mismatches, "within_tolerance": within}


def _tolerance(name: str) -> float:
    return BOX_TOLERANCE if name in ("boxes", "keypoints") else TOLERANCE


def _compare_dense(expected: dict, got: dict) -> tuple[dict, int]:
    """Largest absolute difference per float output; class labels count as mismatches unless the eager scores of
    the label onnxruntime chose tie (within the tolerance) with the best."""
    differences, mismatches = {}, 0
    for name, value in expected.items():
        if value.shape != got[name].shape:
            return {name: float("inf")}, 1
        if np.issubdtype(value.dtype, np.integer):
            differences[name] = 0.0
            wrong = value != got[name]
            if wrong.any() and "scores" in expected and expected["scores"].ndim == value.ndim + 1:
                scores = expected["scores"]                                       # (N, C, H, W) vs labels (N, H, W)
                chosen = np.take_along_axis(scores, got[name][:, None].astype(np.int64), axis=1)[:, 0]
                wrong &= scores.max(axis=1) - chosen > TOLERANCE
            mismatches += int(wrong.sum())
        else:
            differences[name] = float(np.abs(value - got[name]).max()) if value.size else 0.0
    return differences, mismatches


def _compare_detections(expected: dict, got: dict) -> tuple[dict, int]:
    """Detections as a set: the same count, the sorted scores equal, and every onnxruntime detection matched by an
    eager one of the same label and score (so the order among equal scores does not matter); a detection without a
    match is a mismatch."""
    boxes, scores, labels = (expected[key] for key in DETECTION_OUTPUTS)
    if len(scores) != len(got["scores"]):
        return {"scores": float("inf")}, abs(len(scores) - len(got["scores"]))
    if len(scores) == 0:
        return {"boxes": 0.0, "scores": 0.0}, 0
    score_difference = float(np.abs(np.sort(scores) - np.sort(got["scores"])).max())
    box_difference, mismatches = 0.0, 0
    extra = [name for name in expected if name not in DETECTION_OUTPUTS]    # per-detection maps (Mask R-CNN)
    differences = {name: 0.0 for name in extra}
    for row, (box, score, label) in enumerate(zip(got["boxes"], got["scores"], got["labels"])):
        same = (labels == label) & (np.abs(scores - score) <= TOLERANCE)
        if not same.any():
            mismatches += 1
            continue
        distances = np.abs(boxes[same] - box).max(axis=1)
        box_difference = max(box_difference, float(distances.min()))
        match = np.flatnonzero(same)[distances.argmin()]
        for name in extra:
            differences[name] = max(differences[name], float(np.abs(expected[name][match] - got[name][row]).max()))
    return {"boxes": box_difference, "scores": score_difference, **differences}, mismatches
