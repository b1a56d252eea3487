"""Property-based fuzzing of the annotation files a user gives detseg: COCO json (Pascal VOC xml:
tests/test_fuzz_voc.py).

Each case starts from a small valid data set and breaks it - one to three fields of the parsed document changed
(wrong type, missing, negative, NaN / Infinity, huge, duplicated or dangling ids, a list for an object, strings for
numbers), or the bytes of the file itself (truncated, not UTF-8, nested without end, numbers beyond any float). The
property (tests/fuzz_support.py): the data set is refused with one line that starts with the bad file's path, or a
training run's data bundle opens and every sample of it becomes training targets. Nothing else, and nothing slow.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from .fuzz_support import fuzz_settings, make_task, trains_or_fails_clearly

INSTANCE_TASK = make_task("inst/mask_rcnn")   # decodes everything a COCO file holds: boxes, masks, joints

# ---- COCO json ---------------------------------------------------------------------------------------------------

IMAGE_SIZES = {"a.png": (24, 16, "RGB"), "sub/b.png": (8, 8, "L"), "c.png": (12, 10, "RGBA")}   # width, height


def _compressed_rle(width: int, height: int) -> dict:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[2:6, 3:9] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def valid_coco() -> dict:
    """Three images; a polygon with a caption, a person with joints and a polygon, a crowd region as uncompressed
    RLE, an object as compressed RLE without ``area``, and an image holding only a person."""
    return {
        "info": {"description": "fuzz fixture"},
        "images": [{"id": 1, "file_name": "a.png", "width": 24, "height": 16},
                   {"id": 2, "file_name": "sub/b.png", "width": 8, "height": 8},
                   {"id": 3, "file_name": "c.png", "width": 12, "height": 10}],
        "categories": [{"id": 1, "name": "square", "supercategory": "shape"},
                       {"id": 2, "name": "person", "supercategory": "person",
                        "keypoints": ["l_hand", "r_hand", "head"], "skeleton": [[1, 3], [2, 3]],
                        "keypoint_sigmas": [0.1, 0.1, 0.08]}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 1, 6, 5], "area": 30.0, "iscrowd": 0,
             "segmentation": [[2, 1, 8, 1, 8, 6, 2, 6]], "caption": "a small square"},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [10, 2, 10, 12], "area": 80, "iscrowd": 0,
             "segmentation": [[10, 2, 20, 2, 15, 14]], "keypoints": [12, 4, 2, 18, 4, 1, 15, 3, 0],
             "num_keypoints": 2},
            {"id": 12, "image_id": 2, "category_id": 1, "bbox": [1, 0, 2, 3], "iscrowd": 1,
             "segmentation": {"size": [8, 8], "counts": [8, 3, 5, 3, 45]}},
            {"id": 13, "image_id": 3, "category_id": 1, "bbox": [3, 2, 6, 4], "segmentation": _compressed_rle(12, 10)},
            {"id": 14, "image_id": 3, "category_id": 2, "bbox": [0, 0, 5, 9], "keypoints": [1, 1, 2, 4, 8, 2, 2, 0, 1]},
        ],
    }


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    """The fixture's images, written once; each case writes its own instances.json beside them."""
    root = tmp_path_factory.mktemp("coco_fuzz")
    (root / "sub").mkdir()
    for name, (width, height, mode) in IMAGE_SIZES.items():
        Image.new(mode, (width, height), (40, 90, 140, 200)[:len(mode)] if mode != "L" else 90).save(root / name)
    return root


def json_paths(node, prefix=()):
    """Every location in a json document - the root, then each key and index below it."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from json_paths(value, prefix + (key,))


COCO_PATHS = list(json_paths(valid_coco()))
FIELD_NAMES = ["id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation", "keypoints",
               "num_keypoints", "caption", "width", "height", "file_name", "name", "skeleton", "size", "counts",
               "images", "annotations", "categories", "keypoint_sigmas"]

# Values a broken exporter or a hand edit leaves: ids near the fixture's (dangling, duplicated), numbers far from
# it, NaN / Infinity (Python's json writes and reads them), huge integers, strings of numbers, odd text.
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 16),
    st.integers(-2 ** 66, 2 ** 66),
    st.sampled_from([2 ** 31, 2 ** 63, 10 ** 30, -10 ** 30, 10 ** 400, 20_000, 10 ** 9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-40, 40),
    st.text(max_size=4),
    st.sampled_from(["1", "3.5", "NaN", "", "1e400", "0,0,1,1", "x" * 300, "a\x00b", "../a.png", "/", "sub",
                     "c.png", "0", "l0l0", "PPPP", "o", "\ud800"]),     # other images; RLE strings, ill-formed
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=6)
                      | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=3), inner, max_size=3),
                      max_leaves=10)
# "nudge" moves a number a little (boxes onto the image's edge, sizes to 0): input that is odd but valid, so the
# cases that train reach the geometry of masks, crops and flips.
OPERATIONS = ("replace", "delete", "wrap", "duplicate", "add", "stringify", "negate", "scale", "empty", "nudge",
              "nudge")
RLE_CHARACTERS = "".join(chr(code) for code in range(48, 112))        # what compressed RLE strings are made of
# Values aimed at one field: what a hand edit or an exporter's bug leaves there (drawn besides VALUES).
FIELD_VALUES = {
    "segmentation": st.sampled_from([1e8, -1e8, 1e30, 48.5, -20, 1e-300, [], {}]) | st.floats(-100, 100),
    "keypoints": st.sampled_from([1e39, -1e39, 1e8, 3, 2, 1, 0, -1, 0.5, [], ["a"], ["l_x", "r_x"], [0, 0, 0],
                                  [1e39, 0, 2, 0, 0, 0, 0, 0, 0]]),
    "counts": st.text(RLE_CHARACTERS, min_size=1, max_size=8) | st.integers(-2, 200),
    "bbox": st.floats(-30, 60) | st.sampled_from([1e-300, 1e30, [0, 0, 0, 0], [0, 0, 24, 16]]),
    "skeleton": st.sampled_from([None, 5, "ab", {}, [[1, 9]], [[0, 1]], [[1, 1.0]], [[True, 2]], [[1, 2, 3]]]),
    "keypoint_sigmas": st.sampled_from([None, 0.1, [0.1], [0.1, 0.1, 0.0], [0.1, "a", 0.1], [float("nan")] * 3]),
    "size": st.integers(-1, 30) | st.sampled_from([[8, 8], [10 ** 9, 10 ** 9], [10, 12]]),
    "width": st.sampled_from([1, 12, 16, 10 ** 6, 10 ** 9, 10 ** 15, 1.5, 24.0, 20_000]),
    "area": st.sampled_from([0, -0.0, 1e300, 1e39]),
    "file_name": st.sampled_from(["c.png", "a" * 300, "sub", "missing.png", "../coco_fuzz0/a.png", "\x00",
                                  "instances.json", "sub/", " a.png", "a\nb.png"]),
    "iscrowd": st.sampled_from([0, 1, 1.0, 2, True, "1"]),
}
FIELD_VALUES["height"] = FIELD_VALUES["width"]
FIELD_VALUES["name"] = st.sampled_from(["", None, "person", "square", 7, "\u00e9t\u00e9", "per\nson"])
for _key in ("id", "image_id", "category_id"):     # duplicated and dangling ids, ids no float holds
    FIELD_VALUES[_key] = st.integers(-1, 15) | st.sampled_from([10 ** 30, 2 ** 63, 1.0, True, "1"])


def field_of(path: tuple) -> str:
    """The json key a path ends in (for ``("annotations", 0, "bbox", 2)``: ``"bbox"``)."""
    return next((key for key in reversed(path) if isinstance(key, str)), "")


def mutation_at(path: tuple, new_key: str):
    """(path, operation, value, new key, nudge): values aimed at the field at ``path`` (or the field to add)."""
    aimed = [FIELD_VALUES[field] for field in (field_of(path), new_key) if field in FIELD_VALUES]
    return st.tuples(st.just(path), st.sampled_from(OPERATIONS), st.one_of(*aimed, VALUES), st.just(new_key),
                     st.sampled_from([-3, -1, -0.5, 0.25, 1, 2.5, 7]))


ANY_MUTATION = st.tuples(st.sampled_from(COCO_PATHS), st.sampled_from(FIELD_NAMES)).flatmap(lambda pair:
                                                                                              mutation_at(*pair))
# Most paths are coordinates inside lists; an aimed mutation picks a field first (each as likely as the others),
# then one of its places in the document and one of the values aimed at it.
PATHS_OF_FIELD = {field: [path for path in COCO_PATHS if field_of(path) == field] for field in FIELD_VALUES}
AIMED_MUTATION = st.sampled_from(sorted(field for field, paths in PATHS_OF_FIELD.items() if paths)).flatmap(
    lambda field: st.tuples(st.sampled_from(PATHS_OF_FIELD[field]), st.just("replace"), FIELD_VALUES[field],
                            st.just(field), st.just(0)))
MUTATIONS = st.one_of(AIMED_MUTATION, ANY_MUTATION)


def mutated(document, path: tuple, operation: str, value, new_key: str, nudge: float):
    """``document`` with one ``operation`` at ``path`` (a path an earlier mutation removed leaves it unchanged)."""
    value = copy.deepcopy(value)           # drawn values are shared objects: one placed twice must not nest itself
    if not path:
        return {"replace": value, "wrap": [document], "empty": []}.get(operation, document)
    parent = document
    try:
        for key in path[:-1]:
            parent = parent[key]
        old = parent[path[-1]]
    except (KeyError, IndexError, TypeError):
        return document
    key = path[-1]
    if operation == "delete":
        del parent[key]
    elif operation == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(old))                       # duplicated ids, twice the same annotation
    elif operation == "add" and isinstance(old, dict):
        old[new_key] = value                                    # a field the fixture leaves out, e.g. area
    elif operation == "add" and isinstance(old, list):
        old.append(value)
    elif operation == "stringify":
        parent[key] = str(old)
    elif operation in ("negate", "scale", "nudge") and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[key] = {"negate": -old, "scale": old * 10 ** 6, "nudge": old + nudge}[operation]
    elif operation == "empty":
        parent[key] = type(old)() if isinstance(old, (dict, list, str)) else 0
    else:
        parent[key] = [old] if operation == "wrap" else value
    return document


def write_json_text(coco_dir, text: str | bytes):
    path = coco_dir / "instances.json"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    return path


def document_trains_or_fails_clearly(coco_dir, document: dict, *also_named) -> None:
    path = write_json_text(coco_dir, json.dumps(document))
    trains_or_fails_clearly(INSTANCE_TASK, path, path, *also_named)


@pytest.mark.timeout(120)
@fuzz_settings(max_examples=400)
@given(st.lists(MUTATIONS, min_size=1, max_size=3))
def test_coco_with_broken_fields_trains_or_fails_clearly(coco_dir, mutations):
    document = valid_coco()
    for mutation in mutations:
        document = mutated(document, *mutation)
    # a broken file_name is named as the image file it points to
    document_trains_or_fails_clearly(coco_dir, document, *(coco_dir / name for name in IMAGE_SIZES))


def value_at(document, path: tuple):
    for key in path:
        document = document[key]
    return document


# Edits that keep a file plausible, so that most cases get past validation to the geometry downstream (masks
# from polygons and RLE, crops, flips, joints leaving the image): numbers moved, optional fields dropped,
# annotations copied onto other images.
NUMBER_PATHS = [path for path in COCO_PATHS if isinstance(value_at(valid_coco(), path), (int, float))
                and path[-1] not in ("id", "image_id", "category_id", "width", "height")]
OPTIONAL_PATHS = [path for path in COCO_PATHS if path and path[-1] in (
    "area", "iscrowd", "segmentation", "keypoints", "num_keypoints", "caption", "skeleton", "supercategory", "info")]
PLAUSIBLE_EDITS = st.one_of(
    st.tuples(st.just("nudge"), st.sampled_from(NUMBER_PATHS), st.floats(-30, 30) | st.sampled_from([1e-9, 0.5])),
    st.tuples(st.just("drop"), st.sampled_from(OPTIONAL_PATHS), st.none()),
    st.tuples(st.just("copy"), st.integers(0, 4), st.integers(1, 3)),
    st.tuples(st.just("joints"), st.integers(0, 1), st.sampled_from([["x"], ["l_a", "r_a", "c"], []])),
)


def edited(document: dict, kind: str, where, change) -> dict:
    if kind in ("nudge", "drop"):            # a path an earlier drop removed stays unchanged
        mutated(document, where, "nudge" if kind == "nudge" else "delete", None, "", change)
    elif kind == "joints":                   # category ``where`` names other joints (a second keypoint category)
        document["categories"][where]["keypoints"] = change
    else:                                    # annotation ``where`` copied onto image ``change``, under a new id
        copied = dict(document["annotations"][where], image_id=change)
        copied["id"] = 100 + len(document["annotations"])
        document["annotations"].append(copied)
    return document


@pytest.mark.timeout(90)
@fuzz_settings(max_examples=110)
@given(st.lists(PLAUSIBLE_EDITS, min_size=1, max_size=4))
def test_coco_with_odd_but_plausible_values_trains_or_fails_clearly(coco_dir, edits):
    document = valid_coco()
    for edit in edits:
        document = edited(document, *edit)
    document_trains_or_fails_clearly(coco_dir, document)


def _with_long_width(digits: int) -> str:
    """The valid file with the first image's width written as an integer of ``digits`` digits."""
    return json.dumps(valid_coco()).replace('"width": 24', f'"width": {"9" * digits}', 1)


# The file itself broken: each entry turns the valid text (and a drawn position, bytes) into the file's bytes.
BYTE_DAMAGE = {
    "truncated": lambda text, at, junk: text.encode()[:at],
    "junk inserted": lambda text, at, junk: text.encode()[:at] + junk + text.encode()[at:],
    "not utf-8": lambda text, at, junk: text.replace("a small square", "caf\xe9").encode("latin-1"),
    "utf-16": lambda text, at, junk: text.encode("utf-16"),
    "utf-8 with BOM": lambda text, at, junk: text.encode("utf-8-sig"),
    "random bytes": lambda text, at, junk: junk * (1 + at % 7),
    "empty": lambda text, at, junk: b"",
    "nested without end": lambda text, at, junk: b"[" * (1000 + 200 * at),
    "deep but closed": lambda text, at, junk: b"[" * 100_000 + b"]" * 100_000,
    "huge integer": lambda text, at, junk: _with_long_width(400 + 20 * at).encode(),
    "integer beyond python's limit": lambda text, at, junk: _with_long_width(5000).encode(),
    "NaN everywhere": lambda text, at, junk: text.replace("24", "NaN").replace("16", "Infinity").encode(),
    "a list at the top": lambda text, at, junk: f"[{text}]".encode(),
    "a string at the top": lambda text, at, junk: json.dumps(text).encode(),
}


@pytest.mark.timeout(60)
@fuzz_settings(max_examples=70)
@given(st.sampled_from(sorted(BYTE_DAMAGE)), st.integers(0, 700), st.binary(min_size=1, max_size=6))
def test_coco_with_broken_bytes_trains_or_fails_clearly(coco_dir, damage, at, junk):
    path = write_json_text(coco_dir, BYTE_DAMAGE[damage](json.dumps(valid_coco()), at, junk))
    trains_or_fails_clearly(INSTANCE_TASK, path, path)
