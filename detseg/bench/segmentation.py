"""Semantic segmentation, the lecture's three designs measured side by side on the scenes.

Variants: ``seg/sliding_window``, ``seg/fcn_fullres`` and ``seg/encoder_decoder`` with every upsampling (nearest,
bed of nails, max unpooling, transposed convolution, resize-convolution) after every downsampling (max-pool, strided
convolution; max unpooling only after max-pool, whose indices it reuses), plus the transposed convolution with the
uneven 3x3 kernel, the classic checkerboard case. Every variant keeps its registry defaults otherwise and is trained
through :func:`detseg.api.train` with the same time budget, so the numbers are what a user gets.

Per variant:

* **mIoU, pixel accuracy** of best.pt on the validation scenes (the task's own evaluation; the sliding window is
  validated on every 4th pixel, its ``eval_stride`` default, because one crop per pixel is its very problem).
* **FLOPs per image**: ``torch.utils.flop_counter.FlopCounterMode`` over one inference of a 128 px image (the
  sliding window: one crop per pixel, stride 1).
* **Memory per image**, two honest numbers measured rather than estimated:
  ``train_memory_mb`` - bytes of the tensors autograd saves for the backward pass during one training forward of
  one image (``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage): what training must hold, and
  what grows with resolution x channels; ``infer_peak_mb`` - the peak of live tensor bytes during one inference,
  replayed from the allocation and free events of ``torch.profiler.profile(profile_memory=True)``. Parameters are
  not included (they are listed apart).
* **ms per image**: median over several timed inferences (batches of 8 images, after a warm-up; the sliding window:
  one timed inference of one image at stride 1, itself thousands of identical batches), with the threads the run
  used.
* **Training seconds** and images per second, from the run's metrics.json.
* **Checkerboard score** (:func:`checkerboard_score`): feed flat single-colour images; a translation-invariant
  network answers a flat input with a flat output, so whatever varies in the interior of its class-score maps comes
  from the grid of its strided and upsampling layers. The score is the share of the interior maps' non-constant
  spectral energy at the Nyquist frequency of either axis - patterns that flip sign every pixel, i.e. the
  checkerboard. 1 = pure checkerboard or 2-pixel stripes, 0 = flat or smooth; white noise gives about
  (H + W) / (H W). It is read at the network's *native* output resolution (the classifier's output, before a fixed
  bilinear upsampling where the model has one), at initialisation and after training. The sliding window has no
  upsampling grid; its score is measured on 48 px flat images, one crop per pixel being slow.

Ratios reported: full-resolution FCN / encoder-decoder FLOPs and memory, at the registry defaults and at equal
context (an FCN of the same width, deep enough to see as far as the encoder-decoder); sliding window / FCN FLOPs and
time.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from .. import api, registry
from ..config import resolve
from ..data.scenes import CLASS_NAMES, ScenesSource
from ..io import write_json
from ..models.base import ImageTransform
from ..tasks.base import predict_arrays
from ..tasks.dense import materialize
from ..viz import grid, save_figure, save_png, save_report   # importing viz selects matplotlib's Agg backend

import matplotlib.pyplot as plt  # noqa: E402,I001

IMAGE_SIZE = 128


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network of a segmentation model (what FLOPs, memory and the checkerboard are measured on)."""
    return getattr(model, "network", model)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the normalised batch a segmentation network sees (the models' preprocessing stage)."""
    return ImageTransform(images.shape[-1]).batch(images).normalized
FLAT_COLOURS = ((200, 60, 40), (30, 140, 220), (90, 200, 90), (240, 240, 60))  # RGB of the flat test images


@dataclass
class Variant:
    """One model to train and measure: a label for tables, its registry name and its non-default knobs."""

    label: str
    model: str
    knobs: dict = field(default_factory=dict)


def default_encdec_label() -> str:
    """The label of the encoder-decoder variant with the registry's default (down, up) pairing."""
    options = registry.get("seg/encoder_decoder").options
    return f"enc-dec {options['down'].default} + {options['up'].default}"


def variants() -> list[Variant]:
    """Every design of the lecture; the encoder-decoder over every (down, up) pairing that exists."""
    found = [Variant("sliding window", "seg/sliding_window"), Variant("FCN full-res", "seg/fcn_fullres")]
    for down in ("maxpool", "strided"):
        for up in ("nearest", "bed_of_nails", "max_unpool", "transposed", "resize_conv"):
            if up == "max_unpool" and down != "maxpool":
                continue   # unpooling needs the indices of a max-pool
            found.append(Variant(f"enc-dec {down} + {up}", "seg/encoder_decoder", {"down": down, "up": up}))
    found.append(Variant("enc-dec maxpool + transposed k3", "seg/encoder_decoder",
                         {"down": "maxpool", "up": "transposed", "kernel": 3}))
    return found


# ---- what is measured --------------------------------------------------------------------------------------------
def checkerboard_score(maps: torch.Tensor) -> float:
    """Share of the non-constant spectral energy of ``maps`` (..., H, W) at the Nyquist frequency of either axis.

    Each map (every leading index) loses its mean; the energies of all maps are pooled. Rows ``u = H/2`` and columns
    ``v = W/2`` of the 2-D spectrum hold the patterns that alternate every pixel along that axis (for odd sides there
    is no such frequency). A map with no variation at all scores 0.
    """
    maps = maps.detach().double().reshape(-1, *maps.shape[-2:])
    height, width = maps.shape[-2:]
    centred = maps - maps.mean(dim=(-2, -1), keepdim=True)
    energy = torch.fft.fft2(centred).abs().square().sum(dim=0)            # (H, W), pooled over maps
    total = float(energy.sum())
    if total <= 1e-10 * float(maps.square().sum()) * height * width or total == 0.0:
        return 0.0   # constant up to rounding (Parseval: energy of the maps themselves is sum(x^2) * H * W)
    nyquist = torch.zeros_like(energy, dtype=torch.bool)
    if height % 2 == 0:
        nyquist[height // 2, :] = True
    if width % 2 == 0:
        nyquist[:, width // 2] = True
    return float(energy[nyquist].sum()) / total


def native_scores(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class scores (N, C, h, w) at the network's own output resolution: the 1x1 classifier's output, before any
    fixed bilinear upsampling; the sliding window's one crop per pixel."""
    inner = unwrap(model)
    if hasattr(inner, "segment"):
        return inner.segment(images, stride=1)
    classifier = getattr(inner, "classifier", None)
    if not isinstance(classifier, nn.Conv2d):
        return inner(images)
    captured = []
    handle = classifier.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        inner(images)
    finally:
        handle.remove()
    return captured[-1]


SLIDING_FLAT_SIZE = 48   # the sliding window's flat test images: one crop per pixel is slow, and it has no grid


@torch.no_grad()
def flat_input_checkerboard(model: nn.Module, size: int = IMAGE_SIZE) -> float:
    """:func:`checkerboard_score` of the interior of the native scores for flat single-colour images."""
    model.eval()
    if hasattr(unwrap(model), "segment"):
        size = min(size, SLIDING_FLAT_SIZE)
    flat = torch.tensor(FLAT_COLOURS, dtype=torch.uint8).view(-1, 3, 1, 1).expand(-1, 3, size, size)
    scores = native_scores(model, normalize(flat))                         # (colours, C, h, w)
    height, width = scores.shape[-2:]
    margin_h, margin_w = 2 * (height // 16), 2 * (width // 16)             # even margins keep even interiors
    interior = scores[..., margin_h:height - margin_h, margin_w:width - margin_w]
    return checkerboard_score(interior)


def _inference(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What one user inference costs: every pixel scored (the sliding window at stride 1)."""
    inner = unwrap(model)
    return inner.segment(images, stride=1) if hasattr(inner, "segment") else inner(images)


@torch.no_grad()
def inference_flops(model: nn.Module, size: int = IMAGE_SIZE) -> int:
    """FLOPs of scoring every pixel of one ``size`` px image (FlopCounterMode: convolutions, matmuls).

    The sliding window runs the same crop classifier once per pixel, so its count is one crop's FLOPs times the
    number of crops (exact, and a thousand times faster to count than the 16,384 crops of a 128 px image).
    """
    model.eval()
    inner = unwrap(model)
    with FlopCounterMode(display=False) as counter:
        if hasattr(inner, "segment"):
            inner(torch.randn(1, 3, inner.crop, inner.crop))
        else:
            inner(torch.randn(1, 3, size, size))
    crops = inner.crops_per_image(size, size) if hasattr(inner, "segment") else 1
    return int(counter.get_total_flops()) * crops


def _training_input(model: nn.Module, size: int) -> torch.Tensor:
    """One training image's worth of input: the image itself, or the sliding window's crops of one image."""
    inner = unwrap(model)
    image = torch.randn(1, 3, size, size)
    if hasattr(inner, "sample_crops"):
        crops_per_image = getattr(model, "crops_per_image", 64)
        crops, _ = inner.sample_crops(image, torch.zeros(1, size, size, dtype=torch.long), crops_per_image)
        return crops
    return image


def train_memory_bytes(model: nn.Module, size: int = IMAGE_SIZE) -> int:
    """Bytes autograd saves for backward in one training forward of one image (storages counted once)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    network = unwrap(model)                  # the network's own forward: the loss adds nothing worth counting
    network.train()
    inputs = _training_input(model, size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        network(inputs)
    network.eval()
    return sum(storages.values())


@torch.no_grad()
def inference_peak_bytes(model: nn.Module, size: int = IMAGE_SIZE) -> int:
    """Peak live tensor bytes during one inference, replayed from the profiler's allocation / free events."""
    model.eval()
    image = torch.randn(1, 3, size, size)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        _inference(model, image)
    events = sorted((event for event in recorded.events() if event.self_cpu_memory_usage),
                    key=lambda event: event.time_range.start)
    live = peak = 0
    for event in events:       # allocations are positive, frees negative
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@torch.no_grad()
def ms_per_image(model: nn.Module, images: torch.Tensor, runs: int, warmup: bool = True) -> float:
    """Median wall time of one inference over ``runs`` timed runs (after one warm-up run), per image."""
    model.eval()
    times = []
    for run_index in range(runs + int(warmup)):
        start = time.perf_counter()
        _inference(model, images)
        if run_index or not warmup:
            times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times) / len(images)


# ---- one variant -------------------------------------------------------------------------------------------------
def _built(variant: Variant, overrides: dict) -> nn.Module:
    """The variant's model exactly as ``api.train`` initialises it (same seed, same config)."""
    entry = registry.get(variant.model)
    config = resolve(entry.all_options(), overrides)
    api.seed_everything(config["seed"])
    return entry.build(config, entry.make_task(config).placeholder_info(None))


def measure_costs(model: nn.Module, timing_images: torch.Tensor, runs: int) -> dict:
    """Everything about a model that does not need training: FLOPs, memory, time, parameters."""
    is_sliding = hasattr(unwrap(model), "segment")
    size = timing_images.shape[-1]
    # The sliding window takes seconds per image: one image, timed once (thousands of identical batches already).
    timing = (normalize(timing_images[:1]), 1, False) if is_sliding else (normalize(timing_images), runs, True)
    return {
        "gflops_per_image": inference_flops(model, size) / 1e9,
        "train_memory_mb": train_memory_bytes(model, size) / 2**20,
        "infer_peak_mb": inference_peak_bytes(model, size) / 2**20,
        "ms_per_image": ms_per_image(model, *timing),
        "params": sum(p.numel() for p in model.parameters()),
    }


def run_variant(variant: Variant, settings: dict, run_dir: Path, timing_images: torch.Tensor) -> tuple[dict, nn.Module]:
    """Train one variant through the API, then measure the trained model; returns (row, trained model).

    ``settings``: train_size, val_size, image_size, time_budget, epochs, timing_runs, and ``knobs`` applied to every
    variant (empty in the study; tests shrink the models with it).
    """
    size = settings["image_size"]
    overrides = {**settings.get("knobs", {}), **variant.knobs, "train_size": settings["train_size"],
                 "val_size": settings["val_size"], "image_size": size}
    initial = _built(variant, overrides)
    checkerboard_init = flat_input_checkerboard(initial, size)
    metrics = api.train(variant.model, epochs=settings["epochs"], time_budget=settings["time_budget"],
                        out=run_dir, overrides=overrides, progress=False, verbose=False)
    model, _ = api.load(run_dir / "best.pt")
    row = {"label": variant.label, "model": variant.model, "knobs": variant.knobs,
           "miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"], "boundary_iou": metrics.get("boundary_iou"),
           "epochs": metrics["epochs"],
           "train_seconds": metrics["train_seconds"], "train_images_per_second": metrics["train_images_per_second"],
           **measure_costs(model, timing_images, settings["timing_runs"]),
           "checkerboard_init": checkerboard_init, "checkerboard_trained": flat_input_checkerboard(model, size)}
    return row, model


# ---- pictures ----------------------------------------------------------------------------------------------------
def prediction_rows(models: dict[str, nn.Module], images: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
    """One row per model (the ground truth first) of drawn predictions on the same validation images."""
    task = registry.get("seg/encoder_decoder").make_task({})
    info = {"num_classes": len(CLASS_NAMES) + 1, "class_names": ["background", *CLASS_NAMES],
            "image_size": images.shape[-1]}
    raw = [image.permute(1, 2, 0).numpy() for image in images]
    pictures = [task.draw(image, {"_labels": labels}, info) for image, labels in zip(raw, semantic.long())]
    for model in models.values():
        predictions = predict_arrays(model, task, raw, info, torch.device("cpu"))
        pictures += [task.draw(image, prediction, info) for image, prediction in zip(raw, predictions)]
    return grid(pictures, columns=len(raw), side=160)


@torch.no_grad()
def flat_response_picture(models: dict[str, nn.Module], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Each model's answer to a flat image: its first class-score map at native resolution, contrast-stretched.

    A flat picture is the ideal; a fine grid pattern is the checkerboard the score measures.
    """
    flat = torch.tensor(FLAT_COLOURS[:1], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, size, size)
    pictures = []
    for model in models.values():
        model.eval()
        scores = native_scores(model, normalize(flat))[0, 0]                   # (h, w), first class
        spread = (scores - scores.mean()).abs().max().clamp(min=1e-6)
        grey = ((scores - scores.mean()) / spread * 127 + 128).clamp(0, 255).to(torch.uint8)
        pictures.append(grey.expand(3, -1, -1))
    return grid(pictures, columns=4, side=160)


def plot_results(rows: list[dict], out: Path) -> None:
    """cost_quality.png (ms per image vs mIoU), costs.png (FLOPs, memory), checkerboard.png (init vs trained)."""
    labels = [row["label"] for row in rows]
    figure, axis = plt.subplots(figsize=(8, 5))
    for row in rows:
        axis.scatter(row["ms_per_image"], row["miou"], s=30)
        axis.annotate(row["label"], (row["ms_per_image"], row["miou"]), fontsize=7, xytext=(3, 3),
                      textcoords="offset points")
    axis.set(xscale="log", xlabel="inference ms per 128 px image (log)", ylabel="validation mIoU",
             title="cost vs quality")
    axis.grid(alpha=0.3)
    save_figure(figure, out / "cost_quality.png")

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 5), sharey=True)
    positions = range(len(rows))
    left.barh(positions, [row["gflops_per_image"] for row in rows], color="tab:blue")
    left.set(xscale="log", xlabel="GFLOPs per image (log)", yticks=list(positions), yticklabels=labels)
    middle.barh(positions, [row["train_memory_mb"] for row in rows], color="tab:orange")
    middle.set(xscale="log", xlabel="training activations, MB per image (log)")
    right.barh(positions, [row["infer_peak_mb"] for row in rows], color="tab:green")
    right.set(xscale="log", xlabel="inference peak, MB per image (log)")
    for axis in (left, middle, right):
        axis.invert_yaxis()
        axis.grid(alpha=0.3, axis="x")
    save_figure(figure, out / "costs.png")

    figure, axis = plt.subplots(figsize=(10, 5))
    width = 0.4
    axis.barh([p - width / 2 for p in positions], [row["checkerboard_init"] for row in rows], height=width,
              label="at initialisation")
    axis.barh([p + width / 2 for p in positions], [row["checkerboard_trained"] for row in rows], height=width,
              label="after training")
    axis.set(yticks=list(positions), yticklabels=labels, xlabel="checkerboard score (Nyquist share, flat input)")
    axis.invert_yaxis()
    axis.legend()
    axis.grid(alpha=0.3, axis="x")
    save_figure(figure, out / "checkerboard.png")


# ---- the study ---------------------------------------------------------------------------------------------------
# Every variant gets the same training time. Quick: one torch thread, so that a shared machine slows every run alike
# (oversubscribed OpenMP threads wait for each other); the full study uses the machine's cores (threads=0).
SETTINGS = {
    True: {"train_size": 1000, "val_size": 48, "image_size": IMAGE_SIZE, "time_budget": 25.0, "epochs": 100,
           "timing_runs": 3, "knobs": {"threads": 1}},
    False: {"train_size": 2000, "val_size": 200, "image_size": IMAGE_SIZE, "time_budget": 180.0, "epochs": 100,
            "timing_runs": 5, "knobs": {}},
}


def ratios(rows: list[dict], equal_context: dict) -> dict:
    """The comparisons the lecture makes, as numbers."""
    by_label = {row["label"]: row for row in rows}
    fcn, sliding = by_label["FCN full-res"], by_label["sliding window"]
    default = by_label[default_encdec_label()]
    return {
        "fcn_over_encdec_flops": fcn["gflops_per_image"] / default["gflops_per_image"],
        "fcn_over_encdec_train_memory": fcn["train_memory_mb"] / default["train_memory_mb"],
        "fcn_over_encdec_infer_peak": fcn["infer_peak_mb"] / default["infer_peak_mb"],
        "fcn_over_encdec_ms": fcn["ms_per_image"] / default["ms_per_image"],
        "equal_context": equal_context,
        "sliding_over_fcn_flops": sliding["gflops_per_image"] / fcn["gflops_per_image"],
        "sliding_over_fcn_ms": sliding["ms_per_image"] / fcn["ms_per_image"],
    }


def receptive_field(model: nn.Module, size: int = IMAGE_SIZE) -> int:
    """Side of the input square that can change the score of the centre pixel, measured by its gradient (clipped to
    the image). In eval mode, so batch norm is a fixed per-channel affine map."""
    model.eval()
    images = torch.randn(1, 3, size, size, requires_grad=True)
    unwrap(model)(images)[0, :, size // 2, size // 2].sum().backward()
    reached = images.grad.abs().sum(dim=(0, 1)) > 0                            # (H, W)
    rows, columns = reached.any(dim=1).nonzero(), reached.any(dim=0).nonzero()
    return int(max(rows.max() - rows.min() + 1, columns.max() - columns.min() + 1))


def equal_context_costs(timing_images: torch.Tensor, runs: int) -> dict:
    """The lecture's cost argument at equal footing: the default encoder-decoder against a full-resolution FCN of the
    same first-level width that sees as far (``depth = (receptive field - 1) / 2`` layers of 3x3 convolutions)."""
    size = timing_images.shape[-1]
    encdec = _built(Variant("encdec", "seg/encoder_decoder"), {})
    field_side = receptive_field(encdec, size)
    width = registry.get("seg/encoder_decoder").options["width"].default
    fcn = _built(Variant("fcn", "seg/fcn_fullres"), {"width": width, "depth": max(1, (field_side - 1) // 2)})
    fcn_costs, encdec_costs = measure_costs(fcn, timing_images, runs), measure_costs(encdec, timing_images, runs)
    return {"width": width, "receptive_field": field_side, "fcn_depth": max(1, (field_side - 1) // 2),
            "fcn": fcn_costs, "encdec": encdec_costs,
            "flops_ratio": fcn_costs["gflops_per_image"] / encdec_costs["gflops_per_image"],
            "train_memory_ratio": fcn_costs["train_memory_mb"] / encdec_costs["train_memory_mb"],
            "infer_peak_ratio": fcn_costs["infer_peak_mb"] / encdec_costs["infer_peak_mb"],
            "ms_ratio": fcn_costs["ms_per_image"] / encdec_costs["ms_per_image"]}


def _table(rows: list[dict]) -> list[str]:
    lines = ["| variant | mIoU | boundary IoU | pixel acc | GFLOPs/img | train MB/img | infer peak MB | ms/img "
             "| train s | img/s | params | checkerboard init → trained |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        boundary = row.get("boundary_iou")
        boundary = "-" if boundary is None else f"{boundary:.3f}"
        lines.append(f"| {row['label']} | {row['miou']:.3f} | {boundary} | {row['pixel_acc']:.3f} "
                     f"| {row['gflops_per_image']:.3g} | {row['train_memory_mb']:.3g} | {row['infer_peak_mb']:.3g} "
                     f"| {row['ms_per_image']:.3g} "
                     f"| {row['train_seconds']:.0f} | {row['train_images_per_second']:.0f} | {row['params']:,} "
                     f"| {row['checkerboard_init']:.3f} → {row['checkerboard_trained']:.3f} |")
    return lines


def checkerboard_summary(rows: list[dict], threshold: float = 0.1) -> str:
    """One sentence: which variants still answer a flat image with a checkerboard after training."""
    left = [f"{row['label']} ({row['checkerboard_trained']:.2f})" for row in rows
            if row["checkerboard_trained"] > threshold]
    if not left:
        return f"After training no variant scores above {threshold}."
    return f"After training, above {threshold}: " + ", ".join(left) + "."


def write_report(out: Path, results: dict) -> str:
    rows, settings, ratio = results["rows"], results["settings"], results["ratios"]
    equal = ratio["equal_context"]
    best = max(rows, key=lambda row: row["miou"])
    lines = [
        "# Semantic segmentation: sliding window vs full-resolution FCN vs encoder-decoder", "",
        f"Scenes at {settings['image_size']} px, {settings['train_size']} training and {settings['val_size']} validation images; "
        f"every variant trained with `detseg.api.train` for the same {settings['time_budget']:g} s budget "
        f"(registry defaults otherwise), {results['threads']} torch thread(s); {results['wall_seconds']:.0f} s in all.",
        "", *_table(rows), "",
        "## Ratios", "",
        f"- Full-resolution FCN / encoder-decoder ({default_encdec_label()}), registry defaults: "
        f"**{ratio['fcn_over_encdec_flops']:.1f}× the FLOPs**, {ratio['fcn_over_encdec_train_memory']:.1f}× the "
        f"training activation memory, {ratio['fcn_over_encdec_infer_peak']:.1f}× the inference peak memory, "
        f"{ratio['fcn_over_encdec_ms']:.1f}× the time per image.",
        f"- At equal context: the encoder-decoder's score of a pixel depends on a {equal['receptive_field']} px square "
        f"(gradient-measured, clipped to the image); a full-resolution FCN of the same first-level width "
        f"({equal['width']}) needs {equal['fcn_depth']} layers of 3×3 convolutions to see as far, and costs "
        f"**{equal['flops_ratio']:.1f}× the FLOPs**, {equal['train_memory_ratio']:.1f}× the training memory, "
        f"{equal['infer_peak_ratio']:.1f}× the inference peak, {equal['ms_ratio']:.1f}× the time.",
        f"- Sliding window / FCN: **{ratio['sliding_over_fcn_flops']:.0f}× the FLOPs** and "
        f"{ratio['sliding_over_fcn_ms']:.0f}× the time per image (one crop per pixel, nothing shared).",
        "",
        "## Notes", "",
        f"- Best mIoU here: {best['label']} ({best['miou']:.3f}). Short budgets favour cheap variants: a variant that "
        "costs more per image sees fewer images in the same time.",
        "- mIoU and pixel accuracy: best.pt on the validation scenes, background included. The sliding window is "
        "validated on every 4th pixel (its `eval_stride` default), its cost columns are for every pixel.",
        "- FLOPs: `torch.utils.flop_counter.FlopCounterMode`, one 128 px image, inference (convolutions and matrix "
        "products; batch norm, pooling and element-wise work are not FLOPs there).",
        "- Memory: *train MB/img* = bytes of the tensors autograd saves for backward in one training forward of one "
        "image (`saved_tensors_hooks`, each storage once; the sliding window: its crops of one image); *infer peak* = "
        "peak live tensor bytes during one inference, replayed from `torch.profiler` allocation/free events. "
        "Parameters excluded.",
        "- ms/img: median of timed inferences (batches of 8 after a warm-up; the sliding window: one image at "
        "stride 1, timed once).",
        "- Checkerboard score: share of the non-constant spectral energy at the Nyquist frequency (patterns that flip "
        "every pixel) in the interior of the class-score maps the network returns for flat single-colour images, at "
        "the network's native output resolution (the encoder-decoder's default `stem_stride=2`: the 64 px map before "
        "its bilinear upsampling). 1 = pure checkerboard, 0 = flat. A translation-invariant network "
        "answers a flat image with a flat map, so anything there comes from the stride / upsampling grid. Bed of "
        "nails (zeros between the copied values) and max unpooling (a flat map's maxima all sit at the same corner "
        "of each window) can inject it, a transposed convolution does from initialisation (its taps differ) unless "
        "training evens them out; nearest and resize-convolution copy a flat map into a flat map. "
        f"{checkerboard_summary(rows)}",
        "", "## Pictures", "",
        "![cost vs quality](cost_quality.png)", "", "![costs](costs.png)", "", "![checkerboard](checkerboard.png)", "",
        "Predictions on the same validation images, one row per variant, ground truth first "
        "(rows: ground truth, " + ", ".join(row["label"] for row in rows) + "):", "",
        "![predictions](predictions.png)", "",
        "Answers to a flat image (first class-score map, contrast-stretched; same order, no ground truth):", "",
        "![flat responses](flat_responses.png)", "",
    ]
    return save_report(out / "report.md", lines)


def run(out: Path, quick: bool) -> dict:
    started = time.perf_counter()
    settings = SETTINGS[quick]
    size = settings["image_size"]
    val_images, val_targets = materialize(ScenesSource(8, split="val", size=size, seed=0), size, progress=False)
    shown_images, shown_semantic = val_images[:4], torch.stack([t["semantic"] for t in val_targets[:4]])
    rows, models = [], {}
    for variant in variants():
        slug = variant.label.replace(" + ", "-").replace(" ", "_")
        row, model = run_variant(variant, settings, out / "runs" / slug, val_images)
        rows.append(row)
        models[variant.label] = model
        print(f"{variant.label:34s} mIoU {row['miou']:.3f}  {row['gflops_per_image']:.3g} GFLOPs  "
              f"{row['ms_per_image']:.3g} ms/img  checkerboard {row['checkerboard_init']:.3f} -> "
              f"{row['checkerboard_trained']:.3f}", flush=True)
    equal_context = equal_context_costs(val_images, settings["timing_runs"])
    save_png(out / "predictions.png", prediction_rows(models, shown_images, shown_semantic))
    save_png(out / "flat_responses.png", flat_response_picture(models, size))
    plot_results(rows, out)
    results = {"settings": settings, "threads": torch.get_num_threads(), "rows": rows,
               "wall_seconds": time.perf_counter() - started}
    results["ratios"] = ratios(rows, equal_context)
    write_json(out / "results.json", results)
    print(write_report(out, results))
    return results
