"""Non-square scenes: ``size=(width, height)`` and ``detseg data scenes --size WxH``.

Square scenes must not change at all (a square given as a pair is the int size); non-square ones keep every
annotation true to the pixels over the whole W x H image.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from detseg.data.scenes import (PERSON_ID, ScenesSource, area_thresholds, render_single_object_images,
                                size_word)
from detseg.errors import ConfigError

WIDTH, HEIGHT = 96, 64


def _same_sample(a, b) -> bool:
    return (np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
            and np.array_equal(a.semantic, b.semantic) and a.annotations == b.annotations)


@pytest.mark.parametrize("kwargs", [dict(), dict(single_object=True), dict(single_object=True, centered=True),
                                    dict(max_objects=99, seed=5, split="val")])
def test_square_pair_is_the_int_size_exactly(kwargs):
    as_int, as_pair = ScenesSource(8, size=64, **kwargs), ScenesSource(8, size=(64, 64), **kwargs)
    assert as_pair.size == 64 and (as_pair.width, as_pair.height) == (64, 64)
    assert as_pair.images == as_int.images
    for index in range(8):
        assert _same_sample(as_pair.sample(index), as_int.sample(index)), index
    pair_images, pair_labels, _ = render_single_object_images(6, (32, 32), seed=2)
    int_images, int_labels, _ = render_single_object_images(6, 32, seed=2)
    assert np.array_equal(pair_images, int_images) and np.array_equal(pair_labels, int_labels)


def test_area_thresholds_of_a_pair_use_the_equivalent_side():
    assert area_thresholds((128, 128)) == area_thresholds(128)
    small, large = area_thresholds((WIDTH, HEIGHT))
    side = math.sqrt(WIDTH * HEIGHT)
    assert small == pytest.approx((32 * side / 256) ** 2) and large == pytest.approx((96 * side / 256) ** 2)
    assert size_word(small - 1, (WIDTH, HEIGHT)) == "small" and size_word(large + 1, (WIDTH, HEIGHT)) == "large"


@pytest.mark.parametrize("size", [(8, 64), (64, 8), (64,), (64, 64, 3), "64x64", (64.0, 64), (True, 64), None])
def test_bad_sizes_raise_config_error_naming_the_value(size):
    with pytest.raises(ConfigError, match="size"):
        ScenesSource(2, size=size)


@pytest.mark.parametrize("size", [(WIDTH, HEIGHT), (HEIGHT, WIDTH)])
def test_nonsquare_samples_are_height_by_width_and_true_to_their_masks(size):
    width, height = size
    source = ScenesSource(30, size=size, seed=7)
    assert source.size == size and (source.width, source.height) == size
    assert source.images[0] == {"id": 1, "file_name": "train/000001.png", "width": width, "height": height}
    persons = 0
    for index in range(len(source)):
        sample = source.sample(index)
        assert sample.image.shape == (height, width, 3)
        assert sample.masks.shape == (len(sample.annotations), height, width)
        assert sample.semantic.shape == (height, width)
        painted = np.zeros((height, width), dtype=np.uint8)
        for annotation, mask in zip(sample.annotations, sample.masks):
            assert annotation["segmentation"]["size"] == [height, width]
            rows, cols = np.nonzero(mask)
            x0, y0 = cols.min(), rows.min()
            assert annotation["bbox"] == [x0, y0, cols.max() - x0 + 1, rows.max() - y0 + 1]   # tight box of the mask
            x, y, w, h = annotation["bbox"]
            assert 0 <= x and x + w <= width and 0 <= y and y + h <= height
            painted[mask > 0] = annotation["category_id"]
            if annotation["category_id"] == PERSON_ID:
                persons += 1
                for jx, jy, v in np.array(annotation["keypoints"]).reshape(14, 3):
                    assert v == 0 or (0 <= jx < width and 0 <= jy < height)
                    assert v != 2 or mask[jy, jx] == 1
        assert np.array_equal(sample.semantic, painted)
        first = source.render(index).objects[0]                 # the first object lies fully inside
        x0, y0, x1, y1 = first.outline.bounds
        assert x0 + first.offset[0] >= 0 and x1 + first.offset[0] <= width - 1
        assert y0 + first.offset[1] >= 0 and y1 + first.offset[1] <= height - 1
    assert persons >= 3


def test_positions_span_the_long_side_and_sizes_follow_the_short_side():
    width, height = 256, 64
    source = ScenesSource(40, size=(width, height), seed=3)
    centres_x, tallest = [], 0
    for index in range(len(source)):
        for x, y, w, h in (a["bbox"] for a in source.sample(index).annotations):
            centres_x.append(x + w / 2)
            tallest = max(tallest, h)
    assert min(centres_x) < width / 4 and max(centres_x) > 3 * width / 4      # not only the first 64 columns
    assert tallest <= height                                                   # sized for the 64 px side


@pytest.mark.parametrize("size", [(192, 64), (64, 192)])
def test_single_object_captions_use_width_and_height_thirds(size):
    width, height = size
    source = ScenesSource(40, size=size, seed=1, single_object=True)
    columns = set()
    for index in range(len(source)):
        annotation = source.sample(index).annotations[0]
        x, y, w, h = annotation["bbox"]
        column = ("left", "center", "right")[min(int(3 * (x + w / 2) / width), 2)]
        row = ("top", "middle", "bottom")[min(int(3 * (y + h / 2) / height), 2)]
        if row == "middle":
            where = "in the center" if column == "center" else f"on the {column}"
        else:
            where = f"at the {row}" if column == "center" else f"in the {row} {column}"
        caption = annotation["caption"]
        assert caption.split()[0] == size_word(annotation["area"], size) in ("medium", "large")
        assert caption.endswith(where), (caption, where)
        columns.add(column)
    assert len(columns) == 3


def test_centered_nonsquare_object_is_in_the_middle():
    source = ScenesSource(10, size=(WIDTH, HEIGHT), seed=2, single_object=True, centered=True)
    for index in range(len(source)):
        x, y, w, h = source.sample(index).annotations[0]["bbox"]
        assert abs(x + w / 2 - WIDTH / 2) <= 1.5 and abs(y + h / 2 - HEIGHT / 2) <= 1.5


def test_cli_writes_wxh_scenes_that_check_passes(cli, tmp_path):
    out = tmp_path / "scenes"
    result = cli("data", "scenes", "--out", out, "--size", f"{WIDTH}x{HEIGHT}", "--train", "3", "--val", "2")
    assert result.returncode == 0, result.stderr
    for split, count in (("train", 3), ("val", 2)):
        document = json.loads((out / f"{split}.json").read_text())
        assert [(i["width"], i["height"]) for i in document["images"]] == [(WIDTH, HEIGHT)] * count
        info = document["info"]
        assert info["size"] == [WIDTH, HEIGHT] and (info["width"], info["height"]) == (WIDTH, HEIGHT)
        coco = COCO(str(out / f"{split}.json"))
        for entry in document["images"]:
            assert np.asarray(Image.open(out / entry["file_name"])).shape == (HEIGHT, WIDTH, 3)
            assert np.asarray(Image.open(out / "semantic" / entry["file_name"])).shape == (HEIGHT, WIDTH)
            for annotation in coco.loadAnns(coco.getAnnIds(imgIds=[entry["id"]])):
                assert coco.annToMask(annotation).shape == (HEIGHT, WIDTH)
    on_disk = np.asarray(Image.open(out / "train" / "000002.png"))
    assert np.array_equal(on_disk, ScenesSource(3, size=(WIDTH, HEIGHT)).sample(1).image)
    check = cli("data", "check", out / "train.json")
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["image_sizes"] == f"{WIDTH}x{HEIGHT} (3)"


@pytest.mark.parametrize("text", ["96x", "x64", "96x64x3", "96*64", "31x64", "96x2049", "abc"])
def test_cli_rejects_bad_size_text_with_exit_2(cli, tmp_path, text):
    result = cli("data", "scenes", "--out", tmp_path / "scenes", "--size", text, "--train", "1", "--val", "0")
    assert result.returncode == 2
    assert repr(text) in result.stderr and "--size" in result.stderr
    assert not (tmp_path / "scenes").exists()
