"""``make demo``: the lecture's tour - one model of each family, trained briefly on the built-in scenes, each
drawing its answers on the same new scenes.

1. Write the tour's validation scenes (COCO json + PNGs) and a few new scenes no model trains or validates on.
2. Train, each for a fixed time budget on scenes generated on the fly: ``cls/convnet`` (classification, on
   single-object images), ``seg/encoder_decoder`` (semantic segmentation), ``det/yolo`` (detection, single shot),
   ``inst/mask_rcnn`` (instance segmentation with keypoints; region-based, starting from the YOLO row's backbone)
   and ``cap/densecap`` (dense captioning). Every run
   validates on the tour's scenes and keeps its run directory (curves, drawings, metrics.json).
3. Predict with each model on the new scenes and draw ``demo_out/tour.png``: a row per family, each new scene's
   ground truth beside the model's answer.
4. Print a summary: each model's metric against the tour's target, and where every picture is.

The recipes (:data:`FAMILIES`) are the registry's models with settings chosen to converge in a share of ten
minutes on two cores - the detector that learns fastest, learning rates, one row starting from an earlier row's
backbone; nothing is pre-trained outside the tour or downloaded.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import api
from .data.dataset import InstanceDataset
from .data.export import write_scenes
from .data.scenes import ScenesSource, render_single_object_images
from .io import read_json
from .predict import draws_scores
from .viz import CAPTION_FONT, draw_annotations, draw_captioned_boxes, save_png

OUT = Path("demo_out")
NEW_SCENES = 3            # columns of tour.png: (truth, answer) per new scene
VAL_SCENES = 100          # the tour's validation scenes, shared by the scene models
DRAW_SCORE = 0.3          # the scored rows draw what scores at least this: briefly trained models are unsure


@dataclass(frozen=True)
class Family:
    """One row of the tour: a registry model, its budget and recipe, and the metric the summary checks."""

    title: str
    model: str
    seconds: float
    metric: str
    target: float | None
    overrides: dict = field(default_factory=dict)
    scenes: bool = True    # trains and validates on scenes (False: classification's single-object images)
    # the model of an earlier row whose trained weights this one starts from: every tensor whose name and shape match
    # (the lecture's transfer - features learnt for one task start another), the rest fresh
    init_from: str | None = None


FAMILIES = (
    Family("classification", "cls/convnet", 20, "top1", None, {"epochs": 3}, scenes=False),
    # One epoch of linear warm-up: without it, the first large AdamW steps often leave the network predicting the
    # class priors for several epochs (100 s probes, seeds 0/1: mIoU 0.386 / 0.214); with it 0.443 / 0.423 / 0.437
    # over seeds 0-2.
    Family("semantic segmentation", "seg/encoder_decoder", 100, "miou", 0.4, {"epochs": 100, "warmup_epochs": 1}),
    # The lecture's single-shot YOLO: in 120 s AP50 0.62 (SSD 0.56), where Faster R-CNN reached 0.25-0.33 with every
    # learning rate, batch size and warm-up tried - one dense loss per grid cell learns faster than sampled RoIs.
    # At 100 s the tour's YOLO gave 0.529, 0.525 and 0.494: 110 s leaves a margin (0.539; 0.699 once YOLO ran
    # channels-last). Without the single-shot default scale jitter: it fights overfitting over ~40 epochs, and the
    # tour has ~8.
    Family("object detection", "det/yolo", 110, "ap50", 0.5, {"epochs": 100, "scale_jitter": "0"}),
    # Mask R-CNN starts from the YOLO row's backbone (the tensors whose names and shapes match; the RPN and the heads
    # start fresh): segm AP50 0.149 in 160 s (SGD) against 0.095 from scratch in 140 s; in 140 s from that backbone
    # its default AdamW gave 0.158 where SGD at 0.04 gave 0.113 (one run each).
    Family("instance segmentation + keypoints", "inst/mask_rcnn", 140, "segm_ap50", 0.4, {"epochs": 100},
           init_from="det/yolo"),
    Family("dense captioning", "cap/densecap", 80, "attributes", 0.5, {"epochs": 100}),
)


def main(out: Path = OUT, families: tuple[Family, ...] = FAMILIES, scale: float = 1.0,
         val_scenes: int = VAL_SCENES) -> dict:
    """Run the tour into ``out``; ``scale`` multiplies every time budget (tests: a small fraction, few scenes)."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    print(f"1/{len(families) + 2}  writing the tour's scenes (COCO json + PNG) ...", flush=True)
    data = write_scenes(out / "scenes", train=0, val=val_scenes, size=128, seed=0, progress=False)
    val_json = data["val"]["json"]
    scene_paths, truths = new_scenes(out / "new_scenes")
    results = {}
    for step, family in enumerate(families, start=2):
        seconds = family.seconds * scale
        print(f"{step}/{len(families) + 2}  {family.title}: training {family.model} for {seconds:.0f} s ...",
              flush=True)
        run_dir = out / f"run-{family.model.replace('/', '-')}"
        overrides = dict(family.overrides)
        if family.scenes:
            # Built-in scenes; their validation split is the scenes written above (same seed, split and size).
            overrides["val_size"] = val_scenes
        init = None
        if family.init_from is not None:
            earlier = [result for result in results.values() if result["family"].model == family.init_from]
            if not earlier:
                raise ValueError(f"{family.model} starts from {family.init_from}, which no earlier row trains")
            init = earlier[0]["run_dir"] / "best.pt"
            print(f"    starting from the weights of {family.init_from} ({init})", flush=True)
        metrics = api.train(family.model, time_budget=seconds, seed=0, out=run_dir, overrides=overrides,
                            progress=True, verbose=False, init=init)
        if family.model.startswith("cap/"):
            metrics = {**metrics, **caption_words(run_dir, val_json)}
        results[family.title] = {"family": family, "run_dir": run_dir, "metrics": metrics}

    print(f"{len(families) + 2}/{len(families) + 2}  drawing every model's answers on {NEW_SCENES} new scenes ...",
          flush=True)
    rows = []
    for title, result in results.items():
        family = result["family"]
        if family.scenes:
            answers_dir = out / "answers" / result["run_dir"].name
            api.predict(result["run_dir"] / "best.pt", scene_paths, out=answers_dir,
                        draw_score=DRAW_SCORE if draws_scores(family.model) else None)
            drawn = [read_png(answers_dir / f"{path.stem}_pred.png") for path in scene_paths]
            pictures = [picture for pair in zip(truths[family_kind(family)], drawn) for picture in pair]
        else:
            pictures = classification_row(result["run_dir"], out / "new_images")
        rows.append((title, pictures))
    save_png(out / "tour.png", tour_picture(rows))
    total = time.perf_counter() - started
    print_summary(results, out, total)
    return {title: result["metrics"] for title, result in results.items()} | {"total_seconds": total}


# ---- the new scenes and their ground truth ------------------------------------------------------------------------
def new_scenes(folder: Path) -> tuple[list[Path], dict[str, list[torch.Tensor]]]:
    """Write :data:`NEW_SCENES` scenes drawn from a split no run sees; their ground truth drawn per family kind."""
    folder.mkdir(parents=True, exist_ok=True)
    source = ScenesSource(NEW_SCENES, size=128, seed=321, split="demo")
    dataset = InstanceDataset(source)
    paths, truths = [], {"segmentation": [], "instances": [], "boxes": [], "captions": []}
    for index in range(NEW_SCENES):
        sample = source.sample(index)
        path = folder / f"scene_{index}.png"
        Image.fromarray(sample.image).save(path)
        paths.append(path)
        image, target = dataset[index]
        names = dataset.label_names
        truths["instances"].append(draw_annotations(image, target, names))
        no_masks = {**target, "masks": target["masks"][:0], "keypoints": target["keypoints"][:0]}
        truths["boxes"].append(draw_annotations(image, no_masks, names))
        semantic = {**target, "boxes": target["boxes"][:0], "labels": target["labels"][:0],
                    "keypoints": target["keypoints"][:0]}
        truths["segmentation"].append(draw_annotations(image, semantic, names))
        captions = [annotation.get("caption", "") for annotation in sample.annotations]
        truths["captions"].append(draw_captioned_boxes(image, target["boxes"], captions))
    return paths, truths


def family_kind(family: Family) -> str:
    return {"seg": "segmentation", "det": "boxes", "inst": "instances", "cap": "captions"}[family.model.split("/")[0]]


def classification_row(run_dir: Path, folder: Path) -> list[torch.Tensor]:
    """New single-object images: the true class beside the classifier's answer."""
    from torchvision.utils import draw_bounding_boxes

    images, labels, names = render_single_object_images(NEW_SCENES, 32, seed=123, split="demo")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        paths.append(folder / f"image_{index}.png")
        Image.fromarray(image).save(paths[-1])
    api.predict(run_dir / "best.pt", paths, out=folder / "answers")
    pictures = []
    for path, image, label in zip(paths, images, labels):
        big = torch.from_numpy(image).permute(2, 0, 1).repeat_interleave(4, 1).repeat_interleave(4, 2)
        frame = torch.tensor([[0, 0, big.shape[2] - 1, big.shape[1] - 1]], dtype=torch.float)
        pictures.append(draw_bounding_boxes(big, frame, labels=[names[int(label)]], colors="white", width=2))
        pictures.append(read_png(folder / "answers" / f"{path.stem}_pred.png"))
    return pictures


def read_png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


# ---- metrics and pictures -----------------------------------------------------------------------------------------
def caption_words(run_dir: Path, val_json: Path) -> dict:
    """The captions' attribute words (size, colour, shape) against the matched region's references, as
    ``detseg bench densecap`` counts them."""
    from .bench.densecap import match_regions, per_image, word_accuracy

    found, truth = per_image(val_json, read_json(run_dir / "predictions.json"))
    records, _ = match_regions(found, truth)
    words = word_accuracy(records)
    return {"attributes": words["attributes"], "words": words}


def tour_picture(rows: list[tuple[str, list[torch.Tensor]]], side: int = 224, label_width: int = 190) -> np.ndarray:
    """One picture: a row per family, its title on the left, then (truth, answer) pairs in ``side`` px cells."""
    font = ImageFont.truetype(str(CAPTION_FONT), 15)
    small = ImageFont.truetype(str(CAPTION_FONT), 12)
    columns = max(len(pictures) for _, pictures in rows)
    gap, header = 6, 22
    width = label_width + columns * (side + gap)
    canvas = Image.new("RGB", (width, header + len(rows) * (side + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for column in range(columns):
        draw.text((label_width + column * (side + gap) + 4, 4), "ground truth" if column % 2 == 0 else "model",
                  fill="black", font=small)
    for row, (title, pictures) in enumerate(rows):
        top = header + row * (side + gap)
        draw.multiline_text((8, top + side // 2 - 10), title.replace(" + ", "\n+ "), fill="black", font=font)
        for column, picture in enumerate(pictures):
            cell = Image.fromarray(picture.permute(1, 2, 0).numpy())
            scale = side / max(cell.size)                  # the long side fills the cell
            cell = cell.resize((round(cell.width * scale), round(cell.height * scale)),
                               Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
            canvas.paste(cell, (label_width + column * (side + gap), top))
    return np.asarray(canvas)


def print_summary(results: dict, out: Path, total: float) -> None:
    print("\n==== detseg tour ====")
    for title, result in results.items():
        family, metrics = result["family"], result["metrics"]
        value = metrics.get(family.metric)
        verdict = "" if family.target is None or value is None else (
            f"  (target >= {family.target}: {'met' if value >= family.target else 'MISSED'})")
        extra = {"ap50": ("ap",), "segm_ap50": ("ap50", "kp_ap50"), "attributes": ("densecap_map", "det_map"),
                 "miou": ("pixel_acc",), "top1": ()}.get(family.metric, ())
        others = ", ".join(f"{key} {metrics[key]:.3f}" for key in extra if isinstance(metrics.get(key), float))
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        start = "" if family.init_from is None else f" (started from {family.init_from}'s weights)"
        print(f"{title:34s} {family.model:20s} {family.metric} {shown}{verdict}"
              f"{'; ' + others if others else ''}; {metrics.get('train_seconds', 0):.0f} s, "
              f"{metrics.get('epochs', 0)} epochs{start} -> {result['run_dir']}")
    print(f"tour picture                       {out / 'tour.png'} (a row per family: ground truth | model; "
          f"regions drawn from score {DRAW_SCORE})")
    print(f"total                              {total:.0f} s")


if __name__ == "__main__":
    main()
