"""torchvision's detectors converted to detseg: the same detections, and the time each library takes.

For each of ``fasterrcnn_resnet50_fpn``, ``maskrcnn_resnet50_fpn`` and ``keypointrcnn_resnet50_fpn``: build
torchvision's model with random weights (``weights=None, weights_backbone=None``, a fixed seed; nothing can be
downloaded here), save its state dict in the current layout and in the published files' older one, convert both
with :mod:`detseg.convert`, and run torchvision's model and the converted one on scikit-image's bundled photos
(several sizes) at score threshold 0, everything else at torchvision's defaults:

* **identical outputs** - every torchvision detection is matched to the detseg detection of the same label with the
  nearest box; reported are the largest box difference (px), score difference, the smallest mask IoU (masks at
  probability 0.5, pixels within 1e-5 of it left out) and the largest joint difference (px) over all matches, and
  the detections left unmatched on either side;
* **speed** - seconds per image of each library, median over the photos, both in this process with the same
  threads, split into stages (preprocessing, backbone + FPN, RPN, box head, mask / keypoint heads, the rest:
  post-processing, pasting, decoding). Random weights score every class about equally, so both models keep the full
  100 detections per image and their mask and keypoint heads run on all of them: the heaviest case.
"""
from __future__ import annotations

import io
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torchvision.ops import box_iou

from ..convert import MODELS, build_converted
from ..io import write_json
from ..models.inference import fuse_for_inference
from ..viz import save_report

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "stereo_motorcycle")
SETTINGS = {
    True: {"photos": PHOTOS[:3], "min_size": 320, "max_size": 533, "threads": 2},
    False: {"photos": PHOTOS, "min_size": 800, "max_size": 1333, "threads": 2},
}
TARGETS = {"box_px": 0.01, "score": 1e-4, "mask_iou": 0.99, "joint_px": 0.1,
           "speed": {"fasterrcnn_resnet50_fpn": 0.9, "maskrcnn_resnet50_fpn": 0.8, "keypointrcnn_resnet50_fpn": 0.8}}


def photos(names) -> list[torch.Tensor]:
    """scikit-image's bundled RGB photos as (3, H, W) float images in [0, 1] (torchvision's input)."""
    try:
        import skimage.data
    except ImportError as error:
        raise SystemExit("detseg bench convert needs scikit-image (pip install -e '.[bench]')") from error
    images = []
    for name in names:
        array = getattr(skimage.data, name)()
        array = array[0] if isinstance(array, tuple) else array        # stereo pairs: the left image
        images.append(torch.from_numpy(array[..., :3].copy()).permute(2, 0, 1).float() / 255.0)
    return images


def reference_model(name: str, seed: int, min_size: int, max_size: int) -> torch.nn.Module:
    """torchvision's model with random weights, keeping every detection (score threshold 0)."""
    import torchvision
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None, weights_backbone=None, min_size=min_size,
                                        max_size=max_size, box_score_thresh=0.0).eval()


def old_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A current state dict in the layout of torchvision's published files (before ``Conv2dNormActivation``)."""
    import re
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^(backbone\.fpn\.(inner|layer)_blocks\.\d+)\.0\.(weight|bias)$", r"\1.\3", key)
        key = re.sub(r"^rpn\.head\.conv\.0\.0\.(weight|bias)$", r"rpn.head.conv.\1", key)
        match = re.match(r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$", key)
        if match:
            key = f"roi_heads.mask_head.mask_fcn{int(match[1]) + 1}.{match[2]}"
        renamed[key] = value
    return renamed


def through_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict saved and read back (what a user's .pth goes through)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def converted_model(name: str, reference: torch.nn.Module, min_size: int, max_size: int, layout: str = "current"):
    state = reference.state_dict()
    state = old_layout(state) if layout == "old" else state
    model, payload = build_converted(name, through_file(state))
    model.transform.min_size, model.transform.max_size = min_size, max_size
    model.postprocess.score_thresh = 0.0
    return model, payload


def compare(reference: list[dict], ours: list[dict]) -> dict:
    """Worst differences over all detections, each torchvision detection matched to the same-label detseg one with
    the nearest box."""
    worst = {"box_px": 0.0, "score": 0.0, "mask_iou": 1.0, "joint_px": 0.0, "unmatched": 0, "detections": 0}
    within = {"box_px": [], "joint_px": []}             # per match: inside the target's tolerance?
    for theirs, mine in zip(reference, ours):
        worst["detections"] += len(theirs["boxes"])
        worst["unmatched"] += abs(len(theirs["boxes"]) - len(mine["boxes"]))
        for index in range(len(theirs["boxes"])):
            same = torch.nonzero(mine["labels"] == theirs["labels"][index]).squeeze(1)
            if len(same) == 0:
                worst["unmatched"] += 1
                continue
            distance = (mine["boxes"][same] - theirs["boxes"][index]).abs().amax(dim=1)
            match = same[distance.argmin()]
            worst["box_px"] = max(worst["box_px"], float(distance.min()))
            within["box_px"].append(float(distance.min()) <= TARGETS["box_px"])
            worst["score"] = max(worst["score"], float((mine["scores"][match] - theirs["scores"][index]).abs()))
            if "masks" in theirs:
                # Pixels within 1e-5 of the threshold are left out: random weights leave flat regions of logit
                # exactly 0 (probability 0.5), where a last-bit difference of the interpolation decides.
                probability = theirs["masks"][index, 0]
                clear = (probability - 0.5).abs() > 1e-5
                a, b = (probability > 0.5) & clear, mine["masks"][match] & clear
                union = (a | b).sum()
                iou = float((a & b).sum() / union) if union else 1.0
                worst["mask_iou"] = min(worst["mask_iou"], iou)
            if "keypoints" in theirs:
                joints = (mine["keypoints"][match, :, :2] - theirs["keypoints"][index, :, :2]).abs().max()
                worst["joint_px"] = max(worst["joint_px"], float(joints))
                within["joint_px"].append(float(joints) <= TARGETS["joint_px"])
    worst.update({f"{key}_within": sum(flags) / len(flags) for key, flags in within.items() if flags})
    return worst


class StageTimer:
    """Seconds per named stage: callables of modules wrapped by :meth:`wrap` add their wall time while timing."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, attribute: str, stage: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        setattr(owner, attribute, timed)

    @contextmanager
    def fresh(self):
        self.seconds = {}
        yield


def torchvision_stages(model, timer: StageTimer) -> None:
    timer.wrap(model.transform, "forward", "preprocess")
    timer.wrap(model.backbone, "forward", "backbone")
    timer.wrap(model.rpn, "forward", "rpn")
    heads = model.roi_heads
    for part in ("box_roi_pool", "box_head", "box_predictor"):
        timer.wrap(getattr(heads, part), "forward", "box head")
    for part in ("mask_roi_pool", "mask_head", "mask_predictor", "keypoint_roi_pool", "keypoint_head",
                 "keypoint_predictor"):
        if getattr(heads, part, None) is not None:
            timer.wrap(getattr(heads, part), "forward", "mask / keypoint heads")


def detseg_stages(model, timer: StageTimer) -> None:
    timer.wrap(model.transform, "batch", "preprocess")
    timer.wrap(model.backbone, "forward", "backbone")
    timer.wrap(model.proposer, "forward", "rpn")
    timer.wrap(model.roi_head, "forward", "box head")
    for part in ("mask_head", "keypoint_head"):
        if getattr(model, part, None) is not None:
            timer.wrap(getattr(model, part), "forward", "mask / keypoint heads")


def time_model(model, images: list[torch.Tensor], timer: StageTimer) -> tuple[list[float], dict[str, float]]:
    """Per image seconds (one image per call) and the median per stage, ``rest`` = total - stages."""
    totals, stages = [], []
    with torch.inference_mode():
        model([images[0]])                                          # warm-up: allocator, kernels
        for image in images:
            with timer.fresh():
                start = time.perf_counter()
                model([image])
                total = time.perf_counter() - start
            totals.append(total)
            stages.append({**timer.seconds, "rest": total - sum(timer.seconds.values())})
    names = list(stages[0])
    return totals, {name: statistics.median(stage.get(name, 0.0) for stage in stages) for name in names}


def run_model(name: str, settings: dict, images: list[torch.Tensor], seed: int = 0) -> dict:
    reference = reference_model(name, seed, settings["min_size"], settings["max_size"])
    row = {"name": name}
    with torch.inference_mode():
        expected = reference(images)
    for layout in ("current", "old"):
        model, _ = converted_model(name, reference, settings["min_size"], settings["max_size"], layout)
        with torch.inference_mode():
            row[f"identity_{layout}"] = compare(expected, model(images))
    fused = fuse_for_inference(model)                   # before the timer wraps the original's stages
    with torch.inference_mode():
        row["identity_fused"] = compare(expected, fused(images))
    timer = StageTimer()
    torchvision_stages(reference, timer)
    reference_times, reference_stages = time_model(reference, images, timer)
    detseg_stages(model, timer)
    detseg_times, detseg_stages_seconds = time_model(model, images, timer)
    detseg_stages(fused, timer)
    fused_times, fused_stages = time_model(fused, images, timer)
    row.update(torchvision_s=statistics.median(reference_times), detseg_s=statistics.median(detseg_times),
               fused_s=statistics.median(fused_times), torchvision_stages=reference_stages,
               detseg_stages=detseg_stages_seconds, fused_stages=fused_stages,
               sizes=[tuple(image.shape[-2:]) for image in images])
    row["ratio"] = row["detseg_s"] / row["torchvision_s"]
    row["fused_ratio"] = row["fused_s"] / row["torchvision_s"]
    return row


def _passes(row: dict) -> bool:
    identity = all(row[f"identity_{layout}"]["box_px"] <= TARGETS["box_px"]
                   and row[f"identity_{layout}"]["score"] <= TARGETS["score"]
                   and row[f"identity_{layout}"]["mask_iou"] >= TARGETS["mask_iou"]
                   and row[f"identity_{layout}"]["joint_px"] <= TARGETS["joint_px"]
                   and row[f"identity_{layout}"]["unmatched"] == 0 for layout in ("current", "old"))
    return identity


def report(rows: list[dict], settings: dict, quick: bool) -> list[str]:
    lines = [
        "# torchvision checkpoints in detseg" + (" (quick)" if quick else ""),
        "",
        f"Random weights (seed 0), scikit-image photos {', '.join(settings['photos'])}; min_size "
        f"{settings['min_size']}, max_size {settings['max_size']}, score threshold 0, {settings['threads']} "
        f"threads, one image per call. Command: `detseg bench convert{' --quick' if quick else ''}`.",
        "",
        "## Identical outputs (both state-dict layouts)",
        "",
        "| model | layout | detections | unmatched | max box diff px | max score diff | min mask IoU | "
        "max joint diff px |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for layout in ("current", "old", "fused"):
            found = row[f"identity_{layout}"]
            lines.append(f"| {row['name']} | {layout} | {found['detections']} | {found['unmatched']} | "
                         f"{found['box_px']:.2g} | {found['score']:.2g} | {found['mask_iou']:.4f} | "
                         f"{found['joint_px']:.2g} |")
    lines += ["", f"Targets: boxes within {TARGETS['box_px']} px, scores within {TARGETS['score']}, mask IoU >= "
                  f"{TARGETS['mask_iou']}, joints within {TARGETS['joint_px']} px, nothing unmatched.", "",
              "`fused` is the current layout's model through `fuse_for_inference` (batch norms folded into the "
              "convolutions, channels-last maps): float rounding changes in the last bits, which random weights "
              "amplify (near-tied proposals, flat heat maps); share of matched detections within the box / joint "
              "tolerance: " + ", ".join(
                  f"{row['name']} {row['identity_fused'].get('box_px_within', 1.0):.1%} / "
                  f"{row['identity_fused'].get('joint_px_within', 1.0):.1%}" for row in rows) + ".", "",
              "## Speed (median seconds per image)", "",
              "| model | torchvision s | detseg s | detseg / torchvision | detseg fused s | fused / torchvision | "
              "target |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['torchvision_s']:.3f} | {row['detseg_s']:.3f} | {row['ratio']:.2f} | "
                     f"{row['fused_s']:.3f} | {row['fused_ratio']:.2f} | <= {TARGETS['speed'][row['name']]} |")
    lines += ["", "## Stages (median seconds per image)", ""]
    stage_names = ["preprocess", "backbone", "rpn", "box head", "mask / keypoint heads", "rest"]
    lines += ["| model | library | " + " | ".join(stage_names) + " |", "|---|---|" + "---:|" * len(stage_names)]
    for row in rows:
        for library in ("torchvision", "detseg", "fused"):
            stages = row[f"{library}_stages"]
            lines.append(f"| {row['name']} | {library} | "
                         + " | ".join(f"{stages.get(name, 0.0):.3f}" for name in stage_names) + " |")
    lines += ["", "`rest` is the time outside the named stages: detection post-processing (per-class NMS), mask "
                  "pasting, keypoint decoding and mapping back to the photo's pixels."]
    return lines


def run(out: Path, quick: bool = False, only: str | None = None) -> dict:
    settings = SETTINGS[quick]
    torch.set_num_threads(settings["threads"])
    names = [name for name in MODELS if not only or name in only.split(",")]
    images = photos(settings["photos"])
    rows = []
    for name in names:
        rows.append(run_model(name, settings, images))
        print(f"{name}: identity {rows[-1]['identity_current']}, torchvision {rows[-1]['torchvision_s']:.3f} s, "
              f"detseg {rows[-1]['detseg_s']:.3f} s ({rows[-1]['ratio']:.2f}), fused {rows[-1]['fused_s']:.3f} s "
              f"({rows[-1]['fused_ratio']:.2f})", flush=True)
    results = {"study": "convert", "quick": quick, "settings": settings, "targets": TARGETS, "rows": rows,
               "identical": {row["name"]: _passes(row) for row in rows}}
    write_json(out / "results.json", results)
    save_report(out / "report.md", report(rows, settings, quick))
    return results
