"""``detseg predict``: a trained model as a tool - files, folders, globs and videos in; drawings and JSON out.

Inputs (:func:`expand_inputs`), each PATH in the order given:

- a file: an image (anything PIL reads), or a video by its suffix (``VIDEO_SUFFIXES``), read frame by frame with
  OpenCV;
- a directory: the image and video files directly inside it (by suffix), sorted by name - *not* recursive;
- a glob, quoted so that the shell leaves it to us (``'photos/*.jpg'``; ``**`` also matches sub-directories, the
  way to recurse): its image and video files, sorted.

A path that does not exist, a glob that matches nothing, a directory without media and a named file that is not an
image or cannot be opened as a video are one-line errors (exit 2 on the CLI). A file turned up by a directory or a
glob that fails to decode is reported, skipped and counted at the end: one bad file should not stop ten thousand.

Batching, in one process: images are decoded by ``workers`` DataLoader processes (0: by this one) while the model
runs on the batch before, and ``batch_size`` images go through each eval-mode forward - the model contract takes a
list of (3, H, W) images of any size, so images of different sizes share a forward. A video's frames are read in
order by one worker, batched the same way.

Outputs, into ``out`` (nothing is written without it):

- ``predictions.json``: one entry per image and per video frame, in input order: ``image`` the path as given (a
  frame: ``clip.mp4#frame=K``, K counted from 0, with ``frame`` and ``time_s`` too), then the task's description
  (detectors: ``boxes`` xyxy in the image's own pixels, ``scores``, ``labels`` by class name);
- ``<stem>_pred.png`` per image: its drawing (a stem seen before becomes ``<stem>-2``, ``<stem>-3``, ...);
- per video: ``<stem>_pred.mp4``, its frames with their drawings (mp4v, the input's frame rate), and
  ``<stem>_pred.jsonl``, one line per frame - that frame's entry of predictions.json;
- detectors also ``coco_results.json``: COCO's results format (``image_id``, ``category_id``, ``bbox`` as x, y,
  width, height in original pixels, ``score``), for pycocotools' ``loadRes`` or a test server. Image ids are those
  of a ``coco`` json (images matched by ``file_name``: the path's trailing components), else 1..N in
  predictions.json's order; category ids are that json's by class name, else the checkpoint's training set's.

``draw=False`` leaves out the drawings (PNGs and output videos), the slowest part on a large folder.
"""
from __future__ import annotations

import glob
import inspect
import json
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Iterable

import cv2
import torch
from tqdm import tqdm

from . import registry
from .data.images import first_file, load_rgb, read_image_size
from .engine.checkpoint import load_checkpoint
from .errors import ConfigError, DataError, error_reason
from .io import write_json
from .metrics import results_from_detections
from .viz import save_png

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})
DEFAULT_FPS = 25.0      # an output video's frame rate when the input does not say its own
DEVICES = ("cpu", "cuda", "auto")
# --conf / --max-det -> the detector knobs they set (every det/ model but the torchvision references has both)
KNOB_FLAGS = {"score_thresh": "--conf", "detections_per_image": "--max-det"}


# ---- inputs ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Media:
    """One input file. ``named``: given by name, so failing to read it is an error; otherwise a directory or a glob
    turned it up, and a failure skips it."""

    path: Path
    video: bool
    named: bool


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "video" if suffix in VIDEO_SUFFIXES else "image" if suffix in IMAGE_SUFFIXES else None


def expand_inputs(paths: Iterable[str | Path]) -> list[Media]:
    """Files, directories and globs -> the media files they stand for, in the order given (see the module doc)."""
    media = []
    for raw in paths:
        path = Path(raw)
        if first_file([path]) is not None:
            is_video = _kind(path) == "video"
            if not is_video:
                read_image_size(path)           # before any model work: a named non-image fails in milliseconds
            media.append(Media(path, is_video, named=True))
            continue
        if _is_dir(path):
            found, what = sorted(child for child in path.iterdir() if child.is_file()), "directory holds"
        elif any(char in str(raw) for char in "*?["):
            found, what = sorted(Path(match) for match in glob.glob(str(raw), recursive=True)), "glob matches"
        else:
            raise DataError(path, "not found (expected an image or video file, a directory or a glob)")
        found = [item for item in found if item.is_file() and _kind(item)]
        if not found:
            raise ConfigError(f"{raw}: {what} no image or video files (suffixes "
                              f"{' '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))})")
        media += [Media(item, _kind(item) == "video", named=False) for item in found]
    return media


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:         # a name the OS refuses to look up (longer than 255 bytes, say): not found below
        return False


def open_video(path: Path) -> cv2.VideoCapture:
    # OpenCV's FFmpeg backend prints its own complaints about a bad file on stderr; the DataError below says it in
    # one line instead (a user's own setting of the variable wins).
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise DataError(path, "cannot open video (not a video, or a codec this OpenCV build lacks)")
    return capture


def video_properties(path: Path) -> tuple[float, int]:
    """(frames per second, frame count as the file's header says) of a video; DataError when it cannot be opened."""
    capture = open_video(path)
    fps, frames = capture.get(cv2.CAP_PROP_FPS), int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    capture.release()
    return (fps if math.isfinite(fps) and fps > 0 else DEFAULT_FPS), max(0, frames)


# ---- test-time knobs ---------------------------------------------------------------------------------------------
def test_time_overrides(checkpoint: str | Path, conf: float | None, max_det: int | None) -> dict:
    """``--conf`` / ``--max-det`` as overrides of the detector's ``score_thresh`` / ``detections_per_image``, for
    :func:`detseg.api.load`; a ConfigError naming the flag for a model that has no such knob."""
    given = {key: value for key, value in (("score_thresh", conf), ("detections_per_image", max_det))
             if value is not None}
    if not given:
        return {}
    if conf is not None and not 0 <= conf <= 1:
        raise ConfigError(f"--conf {conf}: must be between 0 and 1")
    if max_det is not None and max_det < 1:
        raise ConfigError(f"--max-det {max_det}: must be at least 1")
    model_name = str(load_checkpoint(checkpoint).get("model_name"))     # read once more only with these flags
    entry = registry.get(model_name)
    flags = " / ".join(KNOB_FLAGS[key] for key in given)
    if not getattr(entry.task, "detects_boxes", False):
        raise ConfigError(f"{flags}: {model_name} is a {entry.task.name} model; these flags set a detector's score "
                          f"threshold and detections per image")
    options = entry.all_options()
    for key in given:
        if key not in options:
            raise ConfigError(f"{KNOB_FLAGS[key]}: {model_name} has no {key} knob to set")
    return given


def draws_scores(model_name: str) -> bool:
    """Whether the model's task draws scored regions (detection, instances, captions) - what ``--draw-score`` sets."""
    return "min_score" in inspect.signature(registry.get(model_name).task.draw).parameters


def draw_options(model_name: str, draw_score: float | None) -> dict:
    """``--draw-score``: the keyword of the task's ``draw`` that shows the regions scoring at least it (the tasks' own
    default, 0.5, when None); a ConfigError for a score outside 0..1 or a model that draws no scored regions."""
    if draw_score is None:
        return {}
    if not 0 <= draw_score <= 1:
        raise ConfigError(f"--draw-score {draw_score}: must be a score in 0..1")
    if not draws_scores(model_name):
        raise ConfigError(f"--draw-score applies to models that draw scored regions (detection, instances, "
                          f"captions); {model_name} draws none")
    return {"min_score": draw_score}


# ---- COCO ids ------------------------------------------------------------------------------------------------------
def read_coco_index(path: str | Path) -> tuple[dict[str, int], dict[str, int]]:
    """(file_name -> image id, category name -> category id) of a COCO json. Only ``images`` and ``categories`` are
    read, so a test-dev image-info file, which has no annotations, serves."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--coco {path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(path, f"cannot read COCO json: {error_reason(error)}") from None
    index = []
    for key, name_field in (("images", "file_name"), ("categories", "name")):
        entries = document.get(key) if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise DataError(path, f"expected a list '{key}' of objects with id and {name_field}", field=key)
        pairs = {}
        for k, entry in enumerate(entries):
            if not (isinstance(entry, dict) and isinstance(entry.get("id"), int)
                    and isinstance(entry.get(name_field), str)):
                raise DataError(path, f"needs an integer id and a string {name_field}", field=f"{key}[{k}]")
            pairs[entry[name_field].removeprefix("./")] = entry["id"]
        index.append(pairs)
    return index[0], index[1]


def coco_image_ids(media: list[Media], file_ids: dict[str, int], coco_path) -> dict[str, int]:
    """Input path -> the COCO image id whose ``file_name`` is its longest matching tail (``val/000001.png`` matches
    ``data/scenes/val/000001.png``); an image the json does not list is a ConfigError naming it."""
    ids = {}
    for item in media:
        if item.video:
            raise ConfigError(f"--coco {coco_path}: {item.path} is a video, and video frames have no COCO file_name; "
                              f"predict videos without --coco")
        parts = item.path.parts
        tails = ("/".join(parts[start:]) for start in range(len(parts)))
        image_id = next((file_ids[tail] for tail in tails if tail in file_ids), None)
        if image_id is None:
            raise ConfigError(f"{item.path}: not among the images of --coco {coco_path} (matched by file_name)")
        ids[str(item.path)] = image_id
    return ids


def category_ids(info: dict, coco_categories: dict[str, int] | None, coco_path=None) -> list[int]:
    """Model label -> COCO category id: the ``--coco`` json's id of each class name, else the training set's ids
    (``info["category_ids"]``; a checkpoint without them predates the key, and label = id, true of the scenes)."""
    names = info["class_names"]
    if coco_categories is None:
        return list(info.get("category_ids") or range(len(names)))
    missing = [name for name in names[1:] if name not in coco_categories]
    if missing:
        raise ConfigError(f"--coco {coco_path}: no category named {', '.join(missing)} (the model's classes are "
                          f"{', '.join(names[1:])})")
    return [0] + [coco_categories[name] for name in names[1:]]


# Beyond these a number was mistyped: each worker is a process with its own queues, each image of a batch a tensor
# held at once - a million of either takes the machine down rather than fail.
MAX_WORKERS, MAX_BATCH = 256, 4096


# ---- decoding, in DataLoader workers -------------------------------------------------------------------------------
class ImageFiles(torch.utils.data.Dataset):
    """``files[i] -> (i, (H, W, 3) uint8 tensor)``, or ``(i, its one-line error)`` when the file fails to decode: the
    main process decides whether that stops the run. Tensors, not arrays, so that a worker hands the pixels over in
    shared memory instead of pickling them."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, torch.from_numpy(load_rgb(self.paths[index]))
        except DataError as error:
            return index, str(error)


class VideoFrames(torch.utils.data.IterableDataset):
    """A video's frames in order: ``(k, (H, W, 3) uint8 RGB tensor)``. One reader only - the frames of a video
    come out of one sequential decoder - so it runs in one worker at most."""

    def __init__(self, path: Path):
        self.path = path

    def __iter__(self):
        capture = open_video(self.path)
        try:
            index = 0
            while True:
                ok, frame = capture.read()                      # (H, W, 3) BGR
                if not ok:
                    return
                yield index, torch.from_numpy(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
                index += 1
        finally:
            capture.release()


def _as_list(batch: list) -> list:
    return batch


class VideoOutputs:
    """What one video leaves in ``out``: ``<stem>_pred.mp4`` (its drawn frames; none when ``drawn`` is false) and
    ``<stem>_pred.jsonl`` (a line per frame). Both grow frame by frame under temporary names and are renamed into
    place when the video is done - the streamed form of :mod:`detseg.io`'s atomic writes, so an interrupted run
    never leaves half a video under the final name."""

    def __init__(self, out: Path, stem: str, fps: float):
        out.mkdir(parents=True, exist_ok=True)
        self.final = {kind: out / f"{stem}_pred.{kind}" for kind in ("jsonl", "mp4")}
        self.partial = {kind: out / f".{stem}_pred.partial.{kind}" for kind in self.final}
        self.lines = open(self.partial["jsonl"], "w", encoding="utf-8")
        self.fps, self.video, self.frames = fps, None, 0

    def add(self, entry: dict, picture: torch.Tensor | None) -> None:
        self.lines.write(json.dumps(entry) + "\n")
        self.frames += 1
        if picture is None:
            return
        frame = cv2.cvtColor(picture.permute(1, 2, 0).contiguous().numpy(), cv2.COLOR_RGB2BGR)  # (3,H,W) -> (H,W,3)
        if self.video is None:
            height, width = frame.shape[:2]
            self.video = cv2.VideoWriter(str(self.partial["mp4"]), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                         (width, height))
            if not self.video.isOpened():
                raise DataError(self.final["mp4"], "OpenCV cannot write an mp4v video here")
        self.video.write(frame)

    def __enter__(self) -> "VideoOutputs":
        return self

    def __exit__(self, failed, error, traceback) -> None:
        self.lines.flush()
        os.fsync(self.lines.fileno())
        self.lines.close()
        if self.video is not None:
            self.video.release()
        for kind, partial in self.partial.items():
            if failed is None and self.frames and partial.exists():       # a video without frames leaves nothing
                os.replace(partial, self.final[kind])
            else:
                partial.unlink(missing_ok=True)


# ---- the run -------------------------------------------------------------------------------------------------------
@dataclass
class PredictRun:
    """What a run produced: ``results`` (predictions.json), ``coco_results`` (detectors; coco_results.json) and
    the one-line reasons of the files skipped."""

    results: list[dict] = field(default_factory=list)
    coco_results: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class Predictor:
    """One ``detseg predict``: the model and its task, the run's settings, the outputs so far."""

    def __init__(self, model: torch.nn.Module, payload: dict, device: torch.device, out: Path | None,
                 batch_size: int, workers: int, draw: bool, draw_score: float | None = None):
        self.model, self.info, self.device = model.eval(), payload["info"], device
        self.task = registry.get(payload["model_name"]).make_task(dict(payload["config"]))
        self.task.check_predictable(self.info)
        self.draw_options = draw_options(payload["model_name"], draw_score)
        self.detector = getattr(self.task, "detects_boxes", False)     # detection and instance segmentation
        self.out, self.batch_size, self.workers, self.draw = out, batch_size, workers, draw and out is not None
        self.image_ids: dict[str, int] | None = None        # the --coco json's, else 1..N
        self.category_of = category_ids(self.info, None)
        self.run, self.stems = PredictRun(), {}
        self.bar = tqdm(disable=True)

    def _loader(self, dataset, workers: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, num_workers=workers,
                                           collate_fn=_as_list, pin_memory=self.device.type == "cuda")

    @torch.no_grad()
    def _predict(self, pixels: list[torch.Tensor]) -> list[tuple[dict, dict]]:
        """(H, W, 3) uint8 images -> one eval-mode forward -> (raw output, described output) per image."""
        inputs = [image.permute(2, 0, 1).to(self.device, non_blocking=True) for image in pixels]   # (3, H, W) each
        return [(output, self.task.describe(output, self.info)) for output in self.model(inputs)]

    def _record(self, name: str, output: dict, described: dict, **where) -> dict:
        # Keys starting with "_" hold arrays for drawing (a label map, say), not for predictions.json.
        entry = {"image": name, **where, **{key: value for key, value in described.items() if not key.startswith("_")}}
        self.run.results.append(entry)
        if self.detector:
            image_id = self.image_ids[name] if self.image_ids is not None else len(self.run.results)
            self.run.coco_results += results_from_detections([image_id], [output["boxes"]], [output["scores"]],
                                                             [output["labels"]], self.category_of)
        return entry

    def _skip(self, item: Media, reason: str) -> None:
        if item.named:
            raise DataError(reason)             # the one-argument form: ``reason`` already names the file
        self.run.skipped.append(reason)
        tqdm.write(f"skipping {reason}", file=sys.stderr)

    def _stem(self, path: Path) -> str:
        count = self.stems[path.stem] = self.stems.get(path.stem, 0) + 1
        return path.stem if count == 1 else f"{path.stem}-{count}"

    def images(self, media: list[Media]) -> None:
        for batch in self._loader(ImageFiles([item.path for item in media]), self.workers):
            decoded = []
            for index, pixels in batch:
                if isinstance(pixels, str):
                    self._skip(media[index], pixels)
                else:
                    decoded.append((media[index], pixels))
            if decoded:
                for (item, pixels), (output, described) in zip(decoded, self._predict([p for _, p in decoded])):
                    self._record(str(item.path), output, described)
                    if self.draw:
                        save_png(self.out / f"{self._stem(item.path)}_pred.png",
                                 self.task.draw(pixels.numpy(), described, self.info, **self.draw_options))
            self.bar.update(len(batch))

    def video(self, item: Media, fps: float) -> None:
        outputs = VideoOutputs(self.out, self._stem(item.path), fps) if self.out is not None else None
        frames = 0
        with outputs or nullcontext():
            for batch in self._loader(VideoFrames(item.path), min(self.workers, 1)):
                for (index, pixels), (output, described) in zip(batch, self._predict([p for _, p in batch])):
                    entry = self._record(f"{item.path}#frame={index}", output, described, frame=index,
                                         time_s=round(index / fps, 3))
                    if outputs is not None:
                        outputs.add(entry, self.task.draw(pixels.numpy(), described, self.info, **self.draw_options)
                                    if self.draw else None)
                frames += len(batch)
                self.bar.update(len(batch))
        if frames == 0:
            self._skip(item, f"{item.path}: the video has no frame OpenCV can decode")

    def __call__(self, media: list[Media], coco: str | Path | None, progress: bool) -> PredictRun:
        if coco is not None:
            if not self.detector:
                raise ConfigError(f"--coco: a {self.task.name} model writes no COCO detection results")
            file_ids, categories = read_coco_index(coco)
            self.image_ids = coco_image_ids(media, file_ids, coco)
            self.category_of = category_ids(self.info, categories, coco)
        videos = {}
        for item in (item for item in media if item.video):
            try:
                videos[item] = video_properties(item.path)         # fails fast on a named video that cannot open
            except DataError as error:
                self._skip(item, str(error))
        total = sum(1 for item in media if not item.video) + sum(frames for _, frames in videos.values())
        self.bar = tqdm(total=total, desc="predicting", unit="img", disable=None if progress else True, leave=False)
        with self.bar:
            for is_video, group in groupby(media, key=lambda item: item.video):   # a run of images: one loader
                if not is_video:
                    self.images(list(group))
                    continue
                for item in group:
                    if item in videos:                 # not there: skipped, it could not be opened
                        self.video(item, videos[item][0])
        return self.run


def predict_paths(model: torch.nn.Module, payload: dict, paths: Iterable[str | Path], *,
                  out: str | Path | None = None, device: torch.device = torch.device("cpu"), batch_size: int = 8,
                  workers: int = 1, coco: str | Path | None = None, draw: bool = True,
                  progress: bool = False, draw_score: float | None = None) -> PredictRun:
    """Predict with a loaded checkpoint (:func:`detseg.api.load`) on files, directories, globs and videos; with
    ``out``, write the files of the module doc. Prints skipped files (and their count at the end) on stderr."""
    if not 1 <= batch_size <= MAX_BATCH:
        raise ConfigError(f"--batch-size {batch_size}: must be 1..{MAX_BATCH}")
    if not 0 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers {workers}: must be 0 (decode in this process) to {MAX_WORKERS}")
    media = expand_inputs([paths] if isinstance(paths, (str, Path)) else paths)
    if not media:
        raise ConfigError("predict: give at least one image or video file, directory or glob")
    out = Path(out) if out is not None else None
    predictor = Predictor(model, payload, device, out, batch_size, workers, draw, draw_score)
    run = predictor(media, coco, progress)
    if run.skipped:
        shown = "; ".join(run.skipped[:3]) + (f"; and {len(run.skipped) - 3} more" if len(run.skipped) > 3 else "")
        print(f"skipped {len(run.skipped)} of {len(media)} files that could not be decoded: {shown}",
              file=sys.stderr, flush=True)
    if not run.results:
        raise DataError(f"none of the {len(media)} inputs could be decoded")
    if out is not None:
        write_json(out / "predictions.json", run.results)
        if predictor.detector:
            write_json(out / "coco_results.json", run.coco_results)
    return run
