"""Real-format readers: image loading, COCO json and Pascal VOC xml, and the errors bad input gives."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detseg.data.coco import CocoSource
from detseg.data.dataset import InstanceDataset, coco_ground_truth
from detseg.data.images import load_rgb
from detseg.data.voc import VOC_CLASSES, VocSource
from detseg.errors import DataError

from .conftest import set_at

# ---------------------------------------------------------------------------------------------------------------
# images


@pytest.mark.parametrize("mode, pixel, expected", [
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("RGBA", (200, 100, 50, 128), (100, 50, 25)),      # composited on black: channel * 128/255
    ("LA", (90, 255), (90, 90, 90)),
    ("I;16", 65535, (255, 255, 255)),
    ("I;16", 257 * 40, (40, 40, 40)),
    ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
])
def test_load_rgb_converts_modes_to_rgb_uint8(tmp_path, mode, pixel, expected):
    path = tmp_path / ("image.tiff" if mode in ("CMYK",) else "image.png")
    Image.new(mode, (7, 5), pixel).save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.uint8
    assert tuple(int(v) for v in rgb[2, 3]) == expected


def test_load_rgb_palette_with_and_without_transparency(tmp_path):
    palette_image = Image.new("P", (4, 3), 1)
    palette_image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette_image.save(tmp_path / "p.png")
    assert tuple(load_rgb(tmp_path / "p.png")[0, 0]) == (10, 200, 30)
    palette_image.save(tmp_path / "pt.png", transparency=1)  # colour 1 fully transparent -> black
    assert tuple(load_rgb(tmp_path / "pt.png")[0, 0]) == (0, 0, 0)


def test_load_rgb_16bit_gradient_keeps_order(tmp_path):
    ramp = (np.arange(20, dtype=np.uint16) * 3000).reshape(4, 5)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    rgb = load_rgb(tmp_path / "deep.png")
    assert rgb.shape == (4, 5, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.round(ramp / 257).astype(np.uint8))


@pytest.mark.parametrize("content, expected", [
    (None, "not found"),
    (b"this is not an image", "cannot read image"),
    ("truncated", "cannot read image"),
])
def test_load_rgb_bad_files_raise_data_error(tmp_path, content, expected):
    path = tmp_path / "bad.png"
    if content == "truncated":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
        full = (tmp_path / "full.png").read_bytes()
        path.write_bytes(full[: len(full) // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_rgb(path, image_id=9)
    message = str(caught.value)
    assert "bad.png" in message and "image id 9" in message and expected in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------------------------
# COCO

CROWD_COUNTS = [4, 3, 9]  # uncompressed RLE over a 4x4 image, column-major: 4 off, 3 on, 9 off


def valid_coco() -> dict:
    """Two images of different sizes; a polygon, a crowd RLE, a person with keypoints and a caption."""
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 30, "height": 20},
                   {"id": 2, "file_name": "sub/b.png", "width": 4, "height": 4}],
        "categories": [{"id": 3, "name": "circle", "supercategory": "shape"},
                       {"id": 7, "name": "person", "keypoints": ["l_hand", "r_hand"], "skeleton": [[1, 2]]}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [2, 1, 5, 4], "iscrowd": 0,
             "segmentation": [[2, 1, 7, 1, 7, 5, 2, 5]], "caption": "a small circle"},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [10, 2, 10, 15], "area": 90.0,
             "keypoints": [12, 4, 2, 18, 4, 1]},
            {"id": 12, "image_id": 2, "category_id": 3, "bbox": [1, 0, 1, 3], "iscrowd": 1,
             "segmentation": {"size": [4, 4], "counts": list(CROWD_COUNTS)}},
        ],
    }


def write_coco(tmp_path, data: dict | str):
    """Write the json (dict or raw text) and the two images the valid fixture refers to."""
    (tmp_path / "sub").mkdir(exist_ok=True)
    Image.new("RGB", (30, 20), (10, 20, 30)).save(tmp_path / "a.png")
    Image.new("L", (4, 4), 99).save(tmp_path / "sub" / "b.png")
    path = tmp_path / "instances.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_coco_source_reads_valid_file(tmp_path):
    source = CocoSource(write_coco(tmp_path, valid_coco()))
    assert len(source) == 2
    assert source.label_of == {3: 1, 7: 2} and list(source.category_of) == [0, 3, 7]
    first, second = source.sample(0), source.sample(1)
    assert first.image.shape == (20, 30, 3) and second.image.shape == (4, 4, 3)  # different sizes
    assert second.image.dtype == np.uint8 and second.image[0, 0].tolist() == [99, 99, 99]
    assert [a["id"] for a in first.annotations] == [10, 11]
    assert first.annotations[0]["caption"] == "a small circle"
    assert first.annotations[0]["area"] == 20.0            # computed from the polygon
    assert first.annotations[1]["num_keypoints"] == 2
    assert second.annotations[0]["iscrowd"] == 1            # crowd kept, flagged
    assert first.masks is None and first.semantic is None


def test_coco_box_within_tolerance_is_clipped(tmp_path):
    data = valid_coco()
    data["annotations"][1]["bbox"] = [-0.5, 0, 30.7, 20.4]
    source = CocoSource(write_coco(tmp_path, data))
    assert source.sample(0).annotations[1]["bbox"] == pytest.approx([0, 0, 30, 20])


def test_coco_image_root_is_searched(tmp_path):
    json_dir, image_dir = tmp_path / "annotations", tmp_path / "pictures"
    json_dir.mkdir()
    image_dir.mkdir()
    write_coco(image_dir, valid_coco())  # images (and a stray json) under pictures/
    (json_dir / "instances.json").write_text(json.dumps(valid_coco()))
    assert len(CocoSource(json_dir / "instances.json", image_root=image_dir)) == 2
    with pytest.raises(DataError, match="image file not found"):
        CocoSource(json_dir / "instances.json")


def _edit(change):
    """Apply ``change(data)`` to a fresh valid fixture; returns the edited dict."""
    data = copy.deepcopy(valid_coco())
    change(data)
    return data


MALFORMED_COCO = {
    "truncated json": (json.dumps(valid_coco())[:-30], ["invalid JSON at line 1 column"]),
    "top level list": ("[1, 2]", ["top level must be a JSON object", "'list'"]),
    "missing categories": (_edit(lambda d: d.pop("categories")), ["missing top-level key 'categories'"]),
    "duplicate image id": (_edit(set_at(["images", 1, "id"], 1)), ["duplicate image id 1", "images[1].id"]),
    "duplicate annotation id": (_edit(set_at(["annotations", 2, "id"], 10)),
                                ["duplicate annotation id 10", "annotations[2].id"]),
    "duplicate category id": (_edit(set_at(["categories", 1, "id"], 3)), ["duplicate category id 3"]),
    "zero width": (_edit(set_at(["images", 0, "width"], 0)), ["image id 1", "'width'", "positive", "got 0"]),
    "negative height": (_edit(set_at(["images", 1, "height"], -4)), ["image id 2", "'height'", "got -4"]),
    "dangling image_id": (_edit(set_at(["annotations", 1, "image_id"], 99)),
                          ["annotation id 11", "'image_id'", "refers to no image", "got 99"]),
    "unknown category": (_edit(set_at(["annotations", 0, "category_id"], 42)),
                         ["annotation id 10", "'category_id'", "got 42"]),
    "bbox of 3": (_edit(set_at(["annotations", 0, "bbox"], [1, 2, 3])),
                  ["image id 1", "annotation id 10", "'bbox'", "4 finite numbers", "[1, 2, 3]"]),
    "bbox not numbers": (_edit(set_at(["annotations", 0, "bbox"], [1, "2", 3, 4])), ["'bbox'", "[1, '2', 3, 4]"]),
    "bbox infinite": (_edit(set_at(["annotations", 0, "bbox"], [1, 2, float("inf"), 4])), ["'bbox'", "inf"]),
    "negative box width": (_edit(set_at(["annotations", 0, "bbox"], [5, 2, -3, 4])),
                           ["annotation id 10", "'bbox'", ">= 0", "[5, 2, -3, 4]"]),
    "bbox outside": (_edit(set_at(["annotations", 1, "bbox"], [25, 0, 10, 5])),
                     ["annotation id 11", "'bbox'", "outside the 30x20 image", "[25, 0, 10, 5]"]),
    "polygon too short": (_edit(set_at(["annotations", 0, "segmentation"], [[1, 1, 5, 1]])),
                          ["annotation id 10", "'segmentation[0]'", "has 4", "[1, 1, 5, 1]"]),
    "polygon odd": (_edit(set_at(["annotations", 0, "segmentation"], [[1, 1, 5, 1, 5, 5, 3]])),
                    ["'segmentation[0]'", "has 7"]),
    "rle wrong size": (_edit(set_at(["annotations", 2, "segmentation", "size"], [10, 10])),
                       ["annotation id 12", "image id 2", "'segmentation.size'", "[4, 4]", "got [10, 10]"]),
    "rle counts sum": (_edit(set_at(["annotations", 2, "segmentation", "counts"], [4, 3, 8])),
                       ["annotation id 12", "'segmentation.counts'", "= 16", "got 15"]),
    "rle bad string": (_edit(set_at(["annotations", 2, "segmentation", "counts"], "ab~~")),
                       ["'segmentation.counts'", "'ab~~'"]),
    "segmentation wrong type": (_edit(set_at(["annotations", 0, "segmentation"], "square")),
                                ["'segmentation'", "'square'"]),
    "keypoints length": (_edit(set_at(["annotations", 1, "keypoints"], [12, 4, 2, 18, 4])),
                         ["annotation id 11", "'keypoints'", "3 x 2 = 6", "'person'", "got 5"]),
    "keypoints on keypoint-less category": (_edit(set_at(["annotations", 0, "keypoints"], [1, 2, 2])),
                                            ["annotation id 10", "3 x 0 = 0", "'circle'"]),
    "visibility flag": (_edit(set_at(["annotations", 1, "keypoints"], [12, 4, 3, 18, 4, 1])),
                        ["annotation id 11", "'keypoints[2]'", "'l_hand'", "0, 1 or 2", "got 3"]),
    "iscrowd": (_edit(set_at(["annotations", 0, "iscrowd"], 2)), ["annotation id 10", "'iscrowd'", "got 2"]),
    "area negative": (_edit(set_at(["annotations", 0, "area"], -1)), ["annotation id 10", "'area'", "got -1"]),
    "caption": (_edit(set_at(["annotations", 0, "caption"], 5)), ["annotation id 10", "'caption'", "got 5"]),
    "image id not int": (_edit(set_at(["images", 0, "id"], "one")), ["'images[0].id'", "got 'one'"]),
    "file_name missing": (_edit(lambda d: d["images"][0].pop("file_name")), ["image id 1", "'file_name'"]),
    "missing image file": (_edit(set_at(["images", 0, "file_name"], "nowhere.png")),
                           ["image id 1", "'file_name'", "image file not found", "nowhere.png"]),
    "skeleton index": (_edit(set_at(["categories", 1, "skeleton"], [[1, 3]])), ["categories[1].skeleton", "[1, 3]"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_COCO))
def test_malformed_coco_names_file_id_field_and_value(tmp_path, case):
    data, expected = MALFORMED_COCO[case]
    with pytest.raises(DataError) as caught:
        CocoSource(write_coco(tmp_path, data))
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "instances.json")) and "\n" not in message
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"


def test_missing_json_file(tmp_path):
    with pytest.raises(DataError, match="nothing.json: annotation file not found"):
        CocoSource(tmp_path / "nothing.json")


def test_corrupt_or_resized_image_fails_when_sampled(tmp_path):
    source = CocoSource(write_coco(tmp_path, valid_coco()))  # opening checks existence, not pixels
    (tmp_path / "a.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError) as caught:
        source.sample(0)
    assert "a.png" in str(caught.value) and "image id 1" in str(caught.value)
    Image.new("RGB", (5, 5)).save(tmp_path / "sub" / "b.png")
    with pytest.raises(DataError, match=r"image id 2: field 'width/height'.*5x5 pixels.*say 4x4"):
        source.sample(1)


def test_coco_ground_truth_loads_in_pycocotools_and_scores_perfect_detections(tmp_path):
    source = CocoSource(write_coco(tmp_path, valid_coco()))
    ground_truth = coco_ground_truth(source)
    coco = COCO()
    coco.dataset = json.loads(json.dumps(ground_truth))  # must survive a json round trip
    coco.createIndex()
    assert sorted(coco.getImgIds()) == [1, 2] and coco.anns[12]["iscrowd"] == 1
    # Crowd region decodes to the expected pixels: column-major run of 3 after 4 -> column 1, rows 0..2.
    expected = np.zeros((4, 4), np.uint8)
    expected[0:3, 1] = 1
    np.testing.assert_array_equal(coco.annToMask(coco.anns[12]), expected)
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                  for a in ground_truth["annotations"] if not a["iscrowd"]]
    evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
    evaluator.evaluate(), evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_coco_masks_decode_through_dataset(tmp_path):
    dataset = InstanceDataset(CocoSource(write_coco(tmp_path, valid_coco())))
    _, target = dataset[0]
    polygon_mask = target["masks"][0].numpy()
    expected = np.zeros((20, 30), np.uint8)
    expected[1:5, 2:7] = 1
    np.testing.assert_array_equal(polygon_mask, expected)
    assert target["labels"].tolist() == [1, 2]
    assert target["keypoints"][1].tolist() == [[12, 4, 2], [18, 4, 1]]
    _, crowd_target = dataset[1]
    assert crowd_target["iscrowd"].tolist() == [1] and crowd_target["masks"][0].sum() == 3
    assert crowd_target["semantic"].sum() == 0  # crowd regions are not painted into the semantic map


# ---------------------------------------------------------------------------------------------------------------
# Pascal VOC

def voc_xml(objects: str, width="40", height="30", filename="a.jpg") -> str:
    return (f"<annotation><folder>VOC</folder><filename>{filename}</filename>"
            f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>{objects}</annotation>")


def voc_object(name="dog", box=("1", "1", "40", "30"), difficult="0") -> str:
    xmin, ymin, xmax, ymax = box
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def write_voc(root, xml_a: str, xml_b: str | None = None, split: bool = True):
    """A VOCdevkit-style folder with image a (40x30 jpg) and image b (20x10 png)."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    Image.new("RGB", (40, 30), (200, 0, 0)).save(root / "JPEGImages" / "a.jpg")
    Image.new("RGB", (20, 10)).save(root / "JPEGImages" / "b.png")
    (root / "Annotations" / "a.xml").write_text(xml_a)
    (root / "Annotations" / "b.xml").write_text(
        xml_b or voc_xml(voc_object("cat", ("11", "2", "20", "10")), "20", "10", "b.png"))
    if split:
        (root / "ImageSets" / "Main").mkdir(parents=True)
        (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    return root


def test_voc_box_convention_classes_and_difficult(tmp_path):
    xml_a = voc_xml(voc_object("dog") + voc_object("person", ("5", "6", "14", "10"), difficult="1"))
    source = VocSource(write_voc(tmp_path / "voc", xml_a))
    assert [c["name"] for c in source.categories] == list(VOC_CLASSES)
    first, second = source.sample(0), source.sample(1)
    assert first.image.shape == (30, 40, 3) and second.image.shape == (10, 20, 3)
    whole, hard = first.annotations
    assert whole["bbox"] == [0, 0, 40, 30]                     # 1-based inclusive 1..40 -> [0, 40)
    assert hard["bbox"] == [4, 5, 10, 5] and hard["area"] == 50  # xmin 5..xmax 14 is 10 pixels wide
    assert hard["iscrowd"] == 1 and hard["difficult"] == 1 and whole["iscrowd"] == 0
    assert source.label_of[whole["category_id"]] == VOC_CLASSES.index("dog") + 1
    assert second.annotations[0]["bbox"] == [10, 1, 10, 9]
    ids = [a["id"] for a in source.annotations]
    assert ids == [1, 2, 3] and source.images[1]["voc_id"] == "b"
    coco = COCO()
    coco.dataset = coco_ground_truth(source)
    coco.createIndex()
    assert len(coco.getAnnIds(iscrowd=False)) == 2

    kept = VocSource(tmp_path / "voc", difficult="keep").sample(0).annotations
    assert [a["iscrowd"] for a in kept] == [0, 0]
    assert len(VocSource(tmp_path / "voc", difficult="drop").sample(0).annotations) == 1


def test_voc_without_imagesets_and_custom_classes(tmp_path):
    xml_a = voc_xml(voc_object("widget", ("0", "0", "10", "10")))  # 0-based exporter: within tolerance
    root = write_voc(tmp_path / "flat", xml_a,
                     voc_xml(voc_object("gadget", ("2", "2", "5", "5")), "20", "10", "b.png"), split=False)
    source = VocSource(root, split="train")  # no ImageSets: every xml, sorted
    assert [c["name"] for c in source.categories] == ["gadget", "widget"]
    assert source.sample(0).annotations[0]["bbox"] == [0, 0, 10, 10]
    assert len(source) == 2
    with pytest.raises(DataError) as caught:
        VocSource(root, classes=["gadget"])
    assert all(s in str(caught.value) for s in ["a.xml", "image id a", "'object[0].name'", "'widget'"])


MALFORMED_VOC = {
    "malformed xml": ("<annotation><size><width>4</width></size>\n<object></annotation>",
                      ["malformed XML", "line 2, column"]),
    "missing size": ("<annotation>" + voc_object() + "</annotation>", ["'size.width'", "missing"]),
    "bad size": (voc_xml("", width="-3"), ["'size.width'", "positive", "got '-3'"]),
    "missing bndbox": (voc_xml("<object><name>dog</name></object>"), ["'object[0].bndbox.xmin'", "missing"]),
    "missing name": (voc_xml("<object><bndbox><xmin>1</xmin></bndbox></object>"), ["'object[0].name'"]),
    "non-numeric coordinate": (voc_xml(voc_object(box=("1", "two", "5", "5"))),
                               ["'object[0].bndbox.ymin'", "number", "got 'two'"]),
    "xmax < xmin": (voc_xml(voc_object("dog", ("1", "1", "30", "30")) + voc_object(box=("9", "1", "4", "5"))),
                    ["'object[1].bndbox.xmax'", "smaller than xmin", "got 4"]),
    "box outside": (voc_xml(voc_object(box=("1", "1", "45", "30"))),
                    ["'object[0].bndbox'", "outside the 40x30 image", "'xmax': '45'"]),
    "bad difficult": (voc_xml(voc_object(difficult="yes")), ["'object[0].difficult'", "got 'yes'"]),
    "missing image": (voc_xml(voc_object(), filename="zzz.jpg"),
                      ["'filename'", "image file not found", "got 'zzz.jpg'"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_VOC))
def test_malformed_voc_names_file_id_field_and_value(tmp_path, case):
    xml_a, expected = MALFORMED_VOC[case]
    root = write_voc(tmp_path / "voc", xml_a)
    if case == "missing image":
        (root / "JPEGImages" / "a.jpg").unlink()
    with pytest.raises(DataError) as caught:
        VocSource(root)
    message = str(caught.value)
    assert message.startswith(str(root / "Annotations" / "a.xml")) and "image id a" in message
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"


def test_voc_missing_split_file_lists_available(tmp_path):
    root = write_voc(tmp_path / "voc", voc_xml(voc_object()))
    with pytest.raises(DataError, match=r"val.txt: field 'split': split file not found \(available: train\)"):
        VocSource(root, split="val")
    assert len(VocSource(root, split=None)) == 2
