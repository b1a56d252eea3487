"""Property-based fuzzing of Pascal VOC data sets: the xml annotations (fields missing, not numbers, NaN, inverted
boxes, sizes missing; broken XML, wrong or unknown encodings, entity tricks, empty files) and the split files.

The property is the COCO fuzz tests' (tests/fuzz_support.py): the data set is refused with one line that names a
file of it, or a detection run's data bundle opens and every sample becomes training targets.
"""
from __future__ import annotations

import copy
import shutil
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from .fuzz_support import fuzz_settings, make_task, trains_or_fails_clearly

DETECTION_TASK = make_task("det/faster_rcnn")   # VOC has boxes only: the detectors' data path

VOC_IMAGES = {"img1": (24, 16), "img2": (16, 12)}


def valid_voc_xml(voc_id: str) -> ET.Element:
    width, height = VOC_IMAGES[voc_id]
    root = ET.fromstring(f"""<annotation><folder>VOC</folder><filename>{voc_id}.jpg</filename>
        <size><width>{width}</width><height>{height}</height><depth>3</depth></size>
        <object><name>dog</name><pose>Left</pose><difficult>0</difficult>
          <bndbox><xmin>2</xmin><ymin>3</ymin><xmax>10</xmax><ymax>9</ymax></bndbox></object>
        <object><name>person</name><difficult>1</difficult>
          <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>{width}</xmax><ymax>{height}</ymax></bndbox></object>
        </annotation>""")
    return root


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    """JPEGImages written once; each case writes the xml files (and the split files) it reads."""
    root = tmp_path_factory.mktemp("voc_fuzz")
    (root / "JPEGImages").mkdir()
    (root / "Annotations").mkdir()
    for voc_id, size in VOC_IMAGES.items():
        Image.new("RGB", size, (120, 30, 60)).save(root / "JPEGImages" / f"{voc_id}.jpg")
    return root


def element_paths(element, prefix=()):
    yield prefix
    for k, child in enumerate(element):
        yield from element_paths(child, prefix + (k,))


VOC_PATHS = list(element_paths(valid_voc_xml("img1")))
XML_TEXTS = st.one_of(
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "-1", "0", "1e400", "1e308", "3.7", "1,5", "0x10",
                     "\uff11\uff12", "1_0", "abc", "99999999999999999999", "dog", "person", "2", "1 2", "x" * 300]),
    st.integers(-50, 60).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=5),
)
XML_TAGS = ("xmin", "ymin", "xmax", "ymax", "width", "height", "name", "difficult", "bndbox", "size", "object",
            "filename")
XML_OPERATIONS = ("text", "delete", "duplicate", "add", "invert", "rename")
# Texts aimed at one element, drawn besides XML_TEXTS: names the OS refuses, other images, sizes no image has.
AIMED_XML_TEXTS = {
    "filename": st.sampled_from(["x" * 300 + ".jpg", "", "img2.jpg", "missing.jpg", "../JPEGImages/img1.jpg", ".",
                                 "a\nb.jpg"]),
    "width": st.sampled_from(["1", "23", "25", "20000", "1e308", "24.0", "24.5"]),
    "name": st.sampled_from(["Dog", "dog ", "tvmonitor", "x" * 300, "\u00e9t\u00e9", "do\ng"]),
}
AIMED_XML_TEXTS["height"] = AIMED_XML_TEXTS["width"]
# An element's tag first (each as likely as the others, though an image has many boxes' corners), then one of its
# places in the tree.
PATHS_OF_TAG = {}
for _path in VOC_PATHS:
    _element = valid_voc_xml("img1")
    for _k in _path:
        _element = _element[_k]
    PATHS_OF_TAG.setdefault(_element.tag, []).append(_path)
XML_MUTATIONS = st.sampled_from(sorted(PATHS_OF_TAG)).flatmap(lambda tag: st.tuples(
    st.sampled_from(sorted(VOC_IMAGES)), st.sampled_from(PATHS_OF_TAG[tag]), st.sampled_from(XML_OPERATIONS),
    st.one_of(AIMED_XML_TEXTS.get(tag, st.nothing()), XML_TEXTS), st.sampled_from(XML_TAGS)))


def mutated_xml(root: ET.Element, path: tuple, operation: str, text: str, tag: str) -> None:
    """One change of the xml tree, in place: set a text, delete / duplicate / rename an element, add a child, swap
    a box's min and max."""
    parent, element = None, root
    try:
        for k in path:
            parent, element = element, element[k]
    except IndexError:
        return
    if operation == "text":
        element.text = text
    elif operation == "delete" and parent is not None:
        parent.remove(element)
    elif operation == "duplicate" and parent is not None:
        parent.append(copy.deepcopy(element))
    elif operation == "add":
        ET.SubElement(element, tag).text = text
    elif operation == "rename":
        element.tag = tag
    elif operation == "invert":
        box = element if element.tag == "bndbox" else element.find("bndbox")
        if box is not None and box.find("xmin") is not None and box.find("xmax") is not None:
            box.find("xmin").text, box.find("xmax").text = box.find("xmax").text, box.find("xmin").text


def write_voc(root, xml_bytes: dict[str, bytes], splits: dict[str, str] | None):
    for old in (root / "Annotations").glob("*.xml"):
        old.unlink()
    for voc_id, data in xml_bytes.items():
        (root / "Annotations" / f"{voc_id}.xml").write_bytes(data)
    shutil.rmtree(root / "ImageSets", ignore_errors=True)
    if splits is not None:
        split_dir = root / "ImageSets" / "Main"
        split_dir.mkdir(parents=True)
        for split, text in splits.items():
            (split_dir / f"{split}.txt").write_text(text, encoding="latin-1")


@pytest.mark.timeout(90)
@fuzz_settings(max_examples=90)
@given(st.lists(XML_MUTATIONS, min_size=1, max_size=3), st.booleans())
def test_voc_with_broken_fields_trains_or_fails_clearly(voc_root, mutations, with_splits):
    trees = {voc_id: valid_voc_xml(voc_id) for voc_id in VOC_IMAGES}
    for voc_id, *mutation in mutations:
        mutated_xml(trees[voc_id], *mutation)
    splits = {"train": "img1\nimg2\n", "val": "img2\n"} if with_splits else None
    write_voc(voc_root, {voc_id: ET.tostring(tree, encoding="utf-8") for voc_id, tree in trees.items()}, splits)
    trains_or_fails_clearly(DETECTION_TASK, voc_root, voc_root)


LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY l "lol">' + b"".join(
    b'<!ENTITY l%d "%s">' % (k, (b"&l;" if k == 1 else b"&l%d;" % (k - 1)) * 10) for k in range(1, 10))
    + b']><annotation><filename>&l9;</filename></annotation>')

# Whole files broken: each entry turns the valid xml bytes (and a drawn position, bytes) into the file's bytes.
XML_DAMAGE = {
    "truncated": lambda data, at, junk: data[:at],
    "junk inserted": lambda data, at, junk: data[:at] + junk + data[at:],
    "empty": lambda data, at, junk: b"",
    "random bytes": lambda data, at, junk: junk * (1 + at % 5),
    "latin-1 bytes declared utf-8": lambda data, at, junk:
        b'<?xml version="1.0" encoding="utf-8"?>' + data.replace(b"dog", b"d\xf6g"),
    "unknown encoding": lambda data, at, junk: b'<?xml version="1.0" encoding="klingon"?>' + data,
    "utf-16 declared utf-8": lambda data, at, junk: ('<?xml version="1.0" encoding="utf-8"?>'
                                                     + data.decode()).encode("utf-16"),
    "utf-16 with BOM": lambda data, at, junk: data.decode().encode("utf-16"),
    "not the VOC root element": lambda data, at, junk: b"<html><body>" + data + b"</body></html>",
    "billion laughs": lambda data, at, junk: LAUGHS,
    "external entity": lambda data, at, junk: b'<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                                                + data.replace(b"dog", b"&x;"),
}
SPLIT_DAMAGE = {"fine": "img1\nimg2\n", "missing id": "img1\nimg9\n", "not latin": "img1\n\xff\xfe\n",
                "empty": "", "spaces": "  img1  1\n\n"}


@pytest.mark.timeout(60)
@fuzz_settings(max_examples=60)
@given(st.sampled_from(sorted(XML_DAMAGE)), st.integers(0, 400), st.binary(min_size=1, max_size=6),
       st.sampled_from([None, *sorted(SPLIT_DAMAGE)]))
def test_voc_with_broken_bytes_trains_or_fails_clearly(voc_root, damage, at, junk, split_damage):
    good = ET.tostring(valid_voc_xml("img2"), encoding="utf-8")
    broken = XML_DAMAGE[damage](ET.tostring(valid_voc_xml("img1"), encoding="utf-8"), at, junk)
    splits = None if split_damage is None else {"train": SPLIT_DAMAGE[split_damage], "val": "img2\n"}
    write_voc(voc_root, {"img1": broken, "img2": good}, splits)
    trains_or_fails_clearly(DETECTION_TASK, voc_root, voc_root)
