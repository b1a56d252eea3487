"""``make demo``: the main job on the built-in data, end to end, in a few minutes on a laptop CPU.

1. Write a small scenes data set as COCO json + PNGs and draw its annotations (boxes, masks, keypoints).
2. Train ``cls/convnet`` on the scenes' single-object images for 3 epochs.
3. Predict on a few freshly generated scene images with ``detseg predict`` and draw the answers.
4. Train the detector ``det/faster_rcnn`` on multi-object scenes for a fixed time budget, then draw its boxes on
   new scenes.
5. Print a summary with the metrics and where every picture is.
"""
from __future__ import annotations

import time
from pathlib import Path

from PIL import Image

from . import api
from .data.coco import CocoSource
from .data.dataset import InstanceDataset
from .data.export import write_scenes
from .data.scenes import ScenesSource, render_single_object_images
from .viz import draw_annotations, grid, save_png

OUT = Path("demo_out")
DETECTOR_SECONDS = 150


def main() -> None:
    started = time.perf_counter()
    OUT.mkdir(exist_ok=True)
    print("1/4  writing the scenes data set (COCO json + PNG) ...", flush=True)
    summary = write_scenes(OUT / "scenes", train=64, val=16, size=128, seed=0, progress=False)
    source = CocoSource(OUT / "scenes" / "val.json")
    dataset = InstanceDataset(source)
    pictures = [draw_annotations(*dataset[index], dataset.label_names) for index in range(8)]
    save_png(OUT / "scenes_annotated.png", grid(pictures))

    print("2/4  training cls/convnet on single-object scenes for 3 epochs ...", flush=True)
    run_dir = OUT / "run-convnet"
    metrics = api.train("cls/convnet", epochs=3, seed=7, out=run_dir, progress=True, verbose=True)

    print("3/4  predicting on new images ...", flush=True)
    images, labels, class_names = render_single_object_images(6, 96, seed=123, split="demo")
    paths = []
    for index, image in enumerate(images):
        path = OUT / "new_images" / f"image_{index}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(path)
    predictions = api.predict(run_dir / "best.pt", paths, out=OUT / "predictions")
    correct = sum(p["label"] == int(label) for p, label in zip(predictions, labels))

    print(f"4/4  training det/faster_rcnn on multi-object scenes for {DETECTOR_SECONDS} s ...", flush=True)
    detector_dir = OUT / "run-faster-rcnn"
    detector = api.train("det/faster_rcnn", epochs=100, time_budget=DETECTOR_SECONDS, seed=0, out=detector_dir,
                         progress=True, verbose=True)
    scene_paths = []
    for index in range(6):
        path = OUT / "new_scenes" / f"scene_{index}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(ScenesSource(6, size=128, seed=321, split="demo").sample(index).image).save(path)
        scene_paths.append(path)
    detections = api.predict(detector_dir / "best.pt", scene_paths, out=OUT / "detections")
    confident = [sum(score >= 0.5 for score in d["scores"]) for d in detections]

    print("\n==== detseg demo summary ====")
    print(f"scenes data set      {summary}")
    print(f"annotated scenes     {OUT / 'scenes_annotated.png'}")
    print(f"run directory        {run_dir}  (curves.png, val_predictions.png, history.csv, metrics.json)")
    print(f"validation top-1     {metrics['top1']:.3f} after {metrics['epochs']} epochs, "
          f"{metrics['train_seconds']:.0f} s of training, {metrics['train_images_per_second']:.0f} images/s")
    print(f"new images           {correct}/{len(paths)} right: "
          + ", ".join(f"{p['class_name']}" for p in predictions)
          + f"  (true: {', '.join(class_names[int(label)] for label in labels)})")
    print(f"drawn predictions    {OUT / 'predictions'}")
    print(f"detector             det/faster_rcnn: AP {detector['ap']:.3f}, AP50 {detector['ap50']:.3f} after "
          f"{detector['train_seconds']:.0f} s ({detector['epochs']} epochs); run directory {detector_dir}")
    print(f"detections           {sum(confident)} boxes at score >= 0.5 on {len(scene_paths)} new scenes, drawn in "
          f"{OUT / 'detections'}")
    print(f"total                {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
