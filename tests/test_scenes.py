"""The synthetic scenes: deterministic, COCO-exact on disk, annotations true to the pixels."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from detseg.data.export import write_coco, write_scenes
from detseg.data.records import LSP_JOINTS, LSP_SKELETON
from detseg.data.scenes import (CLASS_NAMES, PERSON_ID, SCENE_CATEGORIES, SHAPES, ScenesSource,
                                render_single_object_images, size_word)
from detseg.data.scenes_draw import COLOUR_BUCKETS
from detseg.errors import ConfigError

SIZE = 96


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A tiny data set on disk: 12 train and 4 val images at 96 px."""
    out = tmp_path_factory.mktemp("scenes")
    result = write_scenes(out, train=12, val=4, size=SIZE, seed=3, progress=False)
    return out, result


@pytest.fixture(scope="module")
def many_samples():
    """60 multi-object samples at 96 px, shared by the content checks."""
    source = ScenesSource(60, size=SIZE, seed=11)
    return [source.sample(i) for i in range(len(source))]


def _same_sample(a, b) -> bool:
    return (np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
            and np.array_equal(a.semantic, b.semantic) and a.annotations == b.annotations)


def test_categories_follow_coco_and_lsp():
    assert [c["id"] for c in SCENE_CATEGORIES] == list(range(1, len(SHAPES) + 2))
    assert CLASS_NAMES[:6] == ["circle", "square", "triangle", "star", "ellipse", "hexagon"]
    person = SCENE_CATEGORIES[-1]
    assert person["id"] == PERSON_ID and person["name"] == "person"
    assert person["keypoints"] == list(LSP_JOINTS)
    assert person["skeleton"] == [[a + 1, b + 1] for a, b in LSP_SKELETON]


def test_deterministic_and_independent_of_order():
    first = ScenesSource(6, size=64, seed=1)
    wanted = [first.sample(i) for i in range(6)]
    second = ScenesSource(6, size=64, seed=1)
    for i in (5, 2, 0, 3):                                      # a different order, a fresh source
        assert _same_sample(second.sample(i), wanted[i])
    assert not np.array_equal(wanted[0].image, wanted[1].image)
    other_split = ScenesSource(6, size=64, seed=1, split="val").sample(0)
    other_seed = ScenesSource(6, size=64, seed=2).sample(0)
    assert not np.array_equal(other_split.image, wanted[0].image)
    assert not np.array_equal(other_seed.image, wanted[0].image)


def test_source_protocol_fields():
    source = ScenesSource(3, size=64, split="val")
    assert len(source) == 3
    assert source.images[2] == {"id": 3, "file_name": "val/000003.png", "width": 64, "height": 64}
    sample = source.sample(2)
    assert sample.image.shape == (64, 64, 3) and sample.image.dtype == np.uint8
    assert sample.masks.shape == (len(sample.annotations), 64, 64) and sample.masks.dtype == np.uint8
    assert sample.semantic.shape == (64, 64) and sample.semantic.dtype == np.uint8
    assert sample.image_id == 3 and sample.file_name == "val/000003.png"
    with pytest.raises(IndexError):
        source.sample(3)


@pytest.mark.parametrize("kwargs", [dict(size=8), dict(max_objects=0), dict(max_objects=100),
                                    dict(centered=True), dict(split=""), dict(num_images=-1)])
def test_bad_arguments_raise_config_error(kwargs):
    arguments = dict(num_images=2) | kwargs
    with pytest.raises(ConfigError):
        ScenesSource(**arguments)


def test_written_coco_matches_masks_exactly(written):
    out, result = written
    assert result["train"]["images"] == 12 and result["val"]["images"] == 4
    coco = COCO(str(result["train"]["json"]))
    source = ScenesSource(12, size=SIZE, seed=3, split="train")
    assert result["train"]["annotations"] == len(coco.getAnnIds())
    for index in range(len(source)):
        sample = source.sample(index)
        image_entry = coco.imgs[sample.image_id]
        on_disk = np.asarray(Image.open(out / image_entry["file_name"]))
        assert np.array_equal(on_disk, sample.image)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[sample.image_id]))
        assert [a["id"] for a in annotations] == [a["id"] for a in sample.annotations]
        painted = np.zeros((SIZE, SIZE), dtype=np.uint8)
        for annotation, mask in zip(annotations, sample.masks):
            assert np.array_equal(coco.annToMask(annotation), mask)
            rows, cols = np.nonzero(mask)
            x0, y0 = cols.min(), rows.min()
            assert annotation["bbox"] == [x0, y0, cols.max() - x0 + 1, rows.max() - y0 + 1]
            assert annotation["area"] == mask.sum() and annotation["iscrowd"] == 0
            assert not np.any(painted[mask > 0])                 # visible masks never overlap
            painted[mask > 0] = annotation["category_id"]
        semantic = np.asarray(Image.open(out / "semantic" / image_entry["file_name"]))
        assert np.array_equal(semantic, painted)


def test_written_json_is_complete_and_splits_differ(written):
    out, result = written
    assert sorted(p.name for p in out.iterdir()) == ["semantic", "train", "train.json", "val", "val.json"]
    document = json.loads((out / "val.json").read_text())
    assert set(document) >= {"info", "images", "annotations", "categories"}
    assert document["images"][0]["file_name"] == "val/000001.png"
    train_first = np.asarray(Image.open(out / "train" / "000001.png"))
    val_first = np.asarray(Image.open(out / "val" / "000001.png"))
    assert not np.array_equal(train_first, val_first)


def test_write_coco_returns_loadable_json(tmp_path):
    path = write_coco(ScenesSource(2, size=48, single_object=True), tmp_path, "test", progress=False)
    assert path == tmp_path / "test.json"
    coco = COCO(str(path))
    assert len(coco.getImgIds()) == 2 and len(coco.getAnnIds()) == 2
    assert (tmp_path / "test" / "000002.png").exists() and (tmp_path / "semantic" / "test" / "000002.png").exists()


def test_object_counts_and_nothing_almost_hidden(many_samples):
    counts = [len(s.annotations) for s in many_samples]
    assert min(counts) >= 1 and max(counts) <= 8 and len(set(counts)) >= 5
    areas = [a["area"] for s in many_samples for a in s.annotations]
    assert min(areas) >= 6                                       # the minimum visible area at 96 px
    ids = [a["id"] for s in many_samples for a in s.annotations]
    assert len(ids) == len(set(ids))
    few = ScenesSource(30, size=64, seed=2, max_objects=2)
    assert max(len(few.sample(i).annotations) for i in range(30)) <= 2


def test_keypoint_flags_agree_with_masks(many_samples):
    persons = 0
    for sample in many_samples:
        union_after = np.zeros((SIZE, SIZE), dtype=bool)          # pixels of objects drawn later than the current
        for annotation, mask in reversed(list(zip(sample.annotations, sample.masks))):
            if annotation["category_id"] != PERSON_ID:
                assert "keypoints" not in annotation and "num_keypoints" not in annotation
            else:
                persons += 1
                keypoints = np.array(annotation["keypoints"]).reshape(14, 3)
                assert annotation["num_keypoints"] == int((keypoints[:, 2] > 0).sum())
                for x, y, v in keypoints:
                    if v == 0:
                        assert x == 0 and y == 0
                        continue
                    assert 0 <= x < SIZE and 0 <= y < SIZE
                    if v == 2:
                        assert mask[y, x] == 1
                    else:                                        # labelled but covered by a later object
                        assert v == 1 and mask[y, x] == 0 and union_after[y, x]
            union_after |= mask > 0
    assert persons >= 5


def test_captions_name_true_colour_size_and_shape(many_samples):
    buckets = {name: np.array(rgb, dtype=float) for name, rgb in COLOUR_BUCKETS.items()}
    for sample in many_samples:
        for annotation, mask in zip(sample.annotations, sample.masks):
            words = annotation["caption"].split()
            seen = sample.image[mask > 0].astype(float).mean(axis=0)    # noise averages out
            nearest = min(buckets, key=lambda name: np.linalg.norm(buckets[name] - seen))
            assert words[0] == size_word(annotation["area"], SIZE)
            if annotation["category_id"] == PERSON_ID:
                assert words[1:4] == ["person", "in", nearest]
            else:
                assert words[1:3] == [nearest, SHAPES[annotation["category_id"] - 1]]


def test_caption_directions_are_true(many_samples):
    checked = 0
    for sample in many_samples:
        boxes = [np.array(a["bbox"]) for a in sample.annotations]
        describe = [" ".join(a["caption"].split()[:4 if a["category_id"] == PERSON_ID else 3])
                    for a in sample.annotations]
        for annotation, box in zip(sample.annotations, boxes):
            for relation, axis, sign in (("left of", 0, -1), ("right of", 0, 1), ("above", 1, -1), ("below", 1, 1)):
                if f" {relation} a " not in annotation["caption"]:
                    continue
                other = annotation["caption"].split(f" {relation} a ")[1]
                centre = box[:2] + box[2:] / 2
                candidates = [b[:2] + b[2:] / 2 for b, d in zip(boxes, describe) if d == other]
                assert any(sign * (centre[axis] - c[axis]) > 0 for c in candidates), annotation["caption"]
                checked += 1
    assert checked >= 20


def test_caption_occlusions_are_true(many_samples):
    grow = np.ones((3, 3), dtype=np.uint8)
    checked = 0
    for sample in many_samples:
        describe = [" ".join(a["caption"].split()[:4 if a["category_id"] == PERSON_ID else 3])
                    for a in sample.annotations]
        for k, annotation in enumerate(sample.annotations):
            for relation, later in (("in front of", lambda j: j < k), ("behind", lambda j: j > k)):
                if f" {relation} a " not in annotation["caption"]:
                    continue
                other = annotation["caption"].split(f" {relation} a ")[1]
                touching = cv2.dilate(sample.masks[k], grow)
                assert any(describe[j] == other and later(j) and np.any(touching & sample.masks[j])
                           for j in range(len(describe))), annotation["caption"]
                checked += 1
    assert checked >= 10


def test_sizes_span_small_medium_large_and_people_are_frequent():
    source = ScenesSource(200, size=128, seed=5)
    words, persons, total = set(), 0, 0
    for index in range(len(source)):
        scene = source.render(index)
        visible = np.bincount(scene.owner.ravel(), minlength=len(scene.objects) + 1)[1:]
        words |= {size_word(area, 128) for area in visible}
        persons += sum(obj.category_id == PERSON_ID for obj in scene.objects)
        total += len(scene.objects)
    assert words == {"small", "medium", "large"}
    assert 0.12 < persons / total < 0.35


@pytest.mark.parametrize("centered", [False, True])
def test_single_object_mode(centered):
    size = 64
    source = ScenesSource(40, size=size, seed=4, single_object=True, centered=centered)
    categories = set()
    for index in range(len(source)):
        sample = source.sample(index)
        assert len(sample.annotations) == 1
        annotation = sample.annotations[0]
        categories.add(annotation["category_id"])
        assert size_word(annotation["area"], size) in ("medium", "large")
        x0, y0, x1, y1 = source.render(index).objects[0].outline.bounds
        offset = source.render(index).objects[0].offset
        assert x0 + offset[0] >= 0 and y0 + offset[1] >= 0                  # the whole shape is inside
        assert x1 + offset[0] <= size - 1 and y1 + offset[1] <= size - 1
        if centered:
            x, y, w, h = annotation["bbox"]
            assert abs(x + w / 2 - size / 2) <= 1.5 and abs(y + h / 2 - size / 2) <= 1.5
    assert len(categories) >= 6


def test_render_single_object_images_for_classification():
    images, labels, names = render_single_object_images(24, 32, seed=7, split="val")
    assert images.shape == (24, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < len(names)
    assert names == CLASS_NAMES
    sample = ScenesSource(24, size=32, seed=7, split="val", single_object=True).sample(5)
    assert np.array_equal(images[5], sample.image)
    assert labels[5] == sample.annotations[0]["category_id"] - 1


def test_written_scenes_read_back_through_coco_source_give_identical_tensors(written):
    """The two data paths (in-memory generator, files on disk via CocoSource) train on exactly the same targets."""
    import torch

    from detseg.data.coco import CocoSource
    from detseg.data.dataset import InstanceDataset

    out_dir, _ = written
    on_disk = InstanceDataset(CocoSource(out_dir / "train.json"))
    in_memory = InstanceDataset(ScenesSource(len(on_disk), size=SIZE, seed=3))
    for index in range(len(on_disk)):
        (image_a, target_a), (image_b, target_b) = on_disk[index], in_memory[index]
        assert torch.equal(image_a, image_b)
        for key in ("boxes", "labels", "masks", "keypoints", "iscrowd", "semantic"):
            assert torch.equal(torch.as_tensor(target_a[key]), torch.as_tensor(target_b[key])), key
        assert target_a["captions"] == target_b["captions"]
