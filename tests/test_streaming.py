"""Streaming data and aspect-preserving sizes: what a user with their own photos relies on."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from detseg import registry
from detseg.config import resolve
from detseg.data.coco import CocoSource
from detseg.data.export import write_scenes
from detseg.data.loading import SourceSet
from detseg.errors import DataError
from detseg.models.base import ImageTransform, aspect_shape
from detseg.tasks.dense import Resize, decoded_bytes

from .detection_support import tiny_detector

TINY = {"width": 8, "image_size": 64, "train_size": 6, "val_size": 3, "batch_size": 3, "epochs": 1}


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("coco")
    write_scenes(out, train=6, val=3, size=64, seed=0, progress=False)
    return out


def _detection_task(**knobs):
    entry = registry.get("det/faster_rcnn")
    config = resolve(entry.all_options(), {**TINY, **knobs})
    return entry.make_task(config), config


def _items(dataset, epoch: int) -> list:
    dataset.set_epoch(epoch)
    return [dataset[index] for index in range(len(dataset))]


def test_streamed_and_in_memory_scenes_give_identical_batches():
    """The scenes' in-memory fast path and the streaming path serve the same images and targets, flips included,
    epoch after epoch, and through a DataLoader worker too."""
    task, _ = _detection_task(loading="memory")
    memory = task.make_data("scenes", None).train
    task, _ = _detection_task(loading="stream")
    streamed = task.make_data("scenes", None).train
    assert isinstance(streamed, SourceSet) and not isinstance(memory, SourceSet)
    for epoch in (0, 1):
        for (image_a, target_a), (image_b, target_b) in zip(_items(memory, epoch), _items(streamed, epoch)):
            assert torch.equal(image_a, image_b)
            assert torch.equal(target_a["boxes"], target_b["boxes"]) and torch.equal(target_a["labels"],
                                                                                     target_b["labels"])
    loaders = [torch.utils.data.DataLoader(data, batch_size=3, collate_fn=task.collate, num_workers=workers)
               for data, workers in ((memory, 0), (streamed, 1))]
    for (images_a, targets_a), (images_b, targets_b) in zip(*loaders):
        assert torch.equal(images_a, images_b)
        assert [t["image_id"] for t in targets_a] == [t["image_id"] for t in targets_b]


def test_files_over_the_memory_budget_stream_and_keep_only_the_annotation_index(coco_files):
    task, _ = _detection_task(memory_budget_mb=0)
    bundle = task.make_data(str(coco_files / "train.json"), str(coco_files / "val.json"))
    assert isinstance(bundle.train, SourceSet) and isinstance(bundle.val, SourceSet)
    assert not hasattr(bundle.train, "images")                 # no decoded pixels held
    image, target = bundle.train[0]
    assert image.dtype == torch.uint8 and tuple(image.shape[-2:]) == target["size"] == (64, 64)


def test_files_within_the_memory_budget_are_decoded_once_and_serve_the_streamed_batches(coco_files):
    """loading=auto holds a small file set in memory (6 images of 64 px: 72 KiB decoded); what it serves equals
    the streamed set's, augmentation included."""
    memory_task, _ = _detection_task()
    stream_task, _ = _detection_task(loading="stream")
    files = (str(coco_files / "train.json"), str(coco_files / "val.json"))
    memory, streamed = memory_task.make_data(*files).train, stream_task.make_data(*files).train
    assert not isinstance(memory, SourceSet) and isinstance(streamed, SourceSet)
    for (image_a, target_a), (image_b, target_b) in zip(_items(memory, 2), _items(streamed, 2)):
        assert torch.equal(image_a, image_b) and torch.equal(target_a["boxes"], target_b["boxes"])


def test_decoded_bytes_counts_input_pixels_masks_and_semantic_maps(coco_files):
    source = CocoSource(coco_files / "train.json")
    masks = len(source.annotations)
    pixels = 6 * 32 * 32
    assert decoded_bytes(source, Resize(32), fields=()) == 3 * pixels
    assert decoded_bytes(source, Resize(32), fields=("semantic",)) == 11 * pixels
    assert decoded_bytes(source, Resize(32), fields=("masks",)) == 3 * pixels + masks * 32 * 32
    # aspect-preserving inputs: the 64 px squares become min_size squares
    assert decoded_bytes(source, Resize(32, min_size=48), fields=()) == 3 * 6 * 48 * 48


def test_aspect_shape_follows_torchvision_and_is_idempotent():
    assert aspect_shape(60, 90, 40, 0) == (40, 60)         # short side to min_size
    assert aspect_shape(60, 90, 40, 50) == (33, 50)        # long side capped at max_size
    assert aspect_shape(80, 40, 40, 50) == (50, 25)
    for height, width in ((33, 50), (40, 60), (50, 25), (375, 500)):
        shape = aspect_shape(height, width, 40, 50)
        assert aspect_shape(*shape, 40, 50) == shape
    # without max_size, a strip's long side stops at 16 x min_size instead of growing with its aspect ratio
    assert aspect_shape(1, 20_000, 800, 0) == (1, 12_800)
    assert aspect_shape(100, 1_000, 800, 0) == (800, 8_000)


def test_aspect_preserving_batches_are_padded_and_boxes_map_back_exactly():
    transform = ImageTransform(128, min_size=40, max_size=50, size_divisible=32)
    images = [torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8),
              torch.randint(0, 256, (3, 80, 40), dtype=torch.uint8)]
    batch = transform.batch(images)
    assert batch.image_sizes == [(33, 50), (50, 25)] and batch.input_size == (64, 64)
    assert torch.all(batch.normalized[0, :, 33:] == 0) and torch.all(batch.normalized[1, :, :, 25:] == 0)
    targets = [{"boxes": torch.tensor([[10.0, 5.0, 80.0, 55.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[3.0, 7.5, 40.0, 80.0]]), "labels": torch.tensor([2])}]
    moved = transform.targets_to_input(targets, batch)
    assert moved[0]["boxes"][0].tolist() == pytest.approx([10 * 50 / 90, 5 * 33 / 60, 80 * 50 / 90, 55 * 33 / 60])
    for index, (target, inside) in enumerate(zip(targets, moved)):
        back = transform.boxes_to_original(inside["boxes"], batch.original_sizes[index], batch.image_sizes[index])
        assert torch.allclose(back, target["boxes"], atol=1e-4)
    # An image already at its shape is not resized again: a data set's stored copy is what the model sees.
    stored = torch.randint(0, 256, (3, 33, 50), dtype=torch.uint8)
    again = transform.batch([stored])
    assert torch.equal(again.pixels[0, :, :33, :50], stored.float() / 255)


def test_a_detector_trains_and_predicts_on_photos_of_different_shapes():
    for name in ("det/faster_rcnn", "det/ssd", "det/yolo"):
        model = tiny_detector(name, min_size=48, max_size=80, score_thresh=0.0)   # untrained: keep every box
        images = [torch.randint(0, 256, (3, 60, 100), dtype=torch.uint8),
                  torch.randint(0, 256, (3, 90, 50), dtype=torch.uint8)]
        targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1])},
                   {"boxes": torch.tensor([[5.0, 20.0, 45.0, 85.0]]), "labels": torch.tensor([3])}]
        model.train()
        losses = model(images, targets)
        assert all(torch.isfinite(value) for value in losses.values()), name
        model.eval()
        with torch.no_grad():
            outputs = model(images)
        for output, image in zip(outputs, images):
            height, width = image.shape[-2:]
            boxes = output["boxes"]
            assert len(boxes) > 0, name
            assert float(boxes[:, 2].max()) <= width + 1e-3 and float(boxes[:, 3].max()) <= height + 1e-3, name


def test_resize_keeps_targets_in_the_delivered_pixels():
    resize = Resize(64, min_size=32, max_size=40)
    image = torch.zeros(3, 50, 100, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[0.0, 0.0, 100.0, 50.0]]), "labels": torch.tensor([1])}
    resized, moved = resize(image, target)
    assert tuple(resized.shape[-2:]) == moved["size"] == (20, 40)
    assert moved["boxes"].tolist() == [[0.0, 0.0, 40.0, 20.0]]


def _truncate(path) -> None:
    """Keep a PNG's header (so the open-time check passes) but cut its pixel data short."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _broken_copy(coco_files, tmp_path):
    out = tmp_path / "coco"
    out.mkdir()
    for name in ("train.json", "val.json"):
        (out / name).write_text((coco_files / name).read_text())
    for split in ("train", "val"):
        (out / split).mkdir()
        for image in (coco_files / split).iterdir():
            (out / split / image.name).write_bytes(image.read_bytes())
    first = json.loads((out / "train.json").read_text())["images"][1]["file_name"]
    _truncate(out / first)
    return out, first


def test_a_file_that_fails_to_decode_is_reported_skipped_and_counted(coco_files, tmp_path, capsys):
    out, broken = _broken_copy(coco_files, tmp_path)
    streamed = SourceSet(CocoSource(out / "train.json"), Resize(64))
    assert streamed[1] is None and streamed[0] is not None and streamed[1] is None
    assert streamed.skipped == 1                                    # one image, however often it is read
    assert broken.split("/")[-1] in capsys.readouterr().err
    strict = SourceSet(CocoSource(out / "train.json"), Resize(64), skip_bad_images=False)
    with pytest.raises(DataError, match="cannot read image"):
        strict[1]


def test_training_skips_a_bad_file_or_stops_with_exit_2(coco_files, tmp_path, cli):
    out, broken = _broken_copy(coco_files, tmp_path)
    args = ["train", "det/faster_rcnn", "--data", out / "train.json", "--val", out / "val.json", "--epochs", "1",
            "width=8", "image_size=64", "batch_size=3", "num_workers=1"]
    result = cli(*args, "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 images" in result.stderr and broken.split("/")[-1] in result.stderr
    result = cli(*args, "skip_bad_images=false", "--out", tmp_path / "strict")
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and broken.split("/")[-1] in error_lines[0] and "Traceback" not in result.stderr


def test_image_headers_are_checked_when_a_set_is_opened(coco_files, tmp_path):
    out, _ = _broken_copy(coco_files, tmp_path)
    name = json.loads((out / "val.json").read_text())["images"][0]["file_name"]
    Image.fromarray(np.zeros((10, 20, 3), dtype=np.uint8)).save(out / name)
    task, _ = _detection_task()
    with pytest.raises(DataError, match="20x10 pixels but the annotations say 64x64"):
        task.make_data(str(out / "train.json"), str(out / "val.json"))


def test_resize_also_resizes_instance_masks():
    resize = Resize(64, min_size=20)
    image = torch.zeros(3, 40, 80, dtype=torch.uint8)
    masks = torch.zeros(2, 40, 80, dtype=torch.uint8)
    masks[0, 10:20, 20:60] = 1
    target = {"boxes": torch.tensor([[20.0, 10.0, 60.0, 20.0], [0.0, 0.0, 1.0, 1.0]]), "masks": masks}
    _, moved = resize(image, target)
    assert moved["masks"].shape == (2, 20, 40) and moved["masks"].dtype == torch.uint8
    assert moved["masks"][0].nonzero().min(0).values.tolist() == [5, 10]
    assert int(moved["masks"][0].sum()) == 5 * 20
