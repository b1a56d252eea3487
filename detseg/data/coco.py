"""COCO instances json: read it, validate every record up front, serve one :class:`Sample` per image.

A data set that is wrong in one annotation out of 100,000 should fail when it is opened, with a message that
says which file, which image or annotation, which field and what value — not as a shape error three epochs into
training. So :class:`CocoSource` checks everything it can without decoding pixels when constructed (and checks
that each image file exists); pixels are decoded lazily in :meth:`RecordSource.sample`, where a corrupt file or a
size that disagrees with the json is reported the same way.

Conventions (documented here because COCO leaves them implicit):

- ``bbox`` is ``[x, y, width, height]`` in continuous pixel coordinates: pixel ``i`` spans ``[i, i + 1)``, so a
  box covering the whole image is ``[0, 0, W, H]``. A box may stick out of the image by up to
  :data:`BOX_TOLERANCE_PX` (float rounding in exporters); it is then clipped to the image. More is an error.
- ``segmentation`` is a list of polygons (each ``[x1, y1, x2, y2, ...]``, at least 3 points) or an RLE dict whose
  ``size`` must be the image's ``[height, width]``. An empty list means "no segmentation" (some exporters write
  that for box-only annotations); the Dataset then uses the filled box as the mask. Polygon points (and joints)
  may lie outside the image, but not farther than the image's own width / height; compressed RLE counts must
  decode to runs >= 0 that add up to ``height * width`` (pycocotools does not check either).
- Degenerate polygons (fewer than 3 points: real COCO train2017 has a few) are an error by default. The lenient
  mode, ``CocoSource(..., strict=False)`` (the run knob ``strict=false``, ``detseg data check --lenient``), drops
  them instead and prints how many: such a polygon covers no area (pycocotools would even read a 4-number one as a
  box), so the annotation keeps its box and its other polygons; one left with none has no segmentation at all.
- An image's ``width * height`` is at most ``PIL.Image.MAX_IMAGE_PIXELS`` (:mod:`detseg.data.images`).
- ``iscrowd`` (default 0) must be 0 or 1; ``area`` (default: mask area, else box area) must be >= 0;
  ``keypoints`` must hold 3 numbers per keypoint named by the annotation's category, visibility in {0, 1, 2};
  ``caption`` (our extension, optional) must be a string.
- Labels: categories keep their COCO ids in the records; models see *contiguous* labels 1..K in the order the
  ``categories`` list gives them, 0 = background (:func:`contiguous_labels`).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from pycocotools import mask as mask_utils

from detseg.data.images import check_pixel_count, first_file
from detseg.data.records import RecordSource
from detseg.errors import DataError

# How far (in pixels) a box may leave the image before it counts as an error rather than rounding noise.
BOX_TOLERANCE_PX = 1.0


# --- shared format helpers (used by voc.py and dataset.py too) ---------------------------------------------------

def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """A validated COCO segmentation (polygons, uncompressed or compressed RLE) -> one compressed RLE."""
    if isinstance(segmentation, list):  # polygons: one RLE per polygon, then their union
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    counts = segmentation["counts"]
    if isinstance(counts, list):        # uncompressed RLE, as COCO stores crowd regions
        return mask_utils.frPyObjects(segmentation, height, width)
    return {"size": list(segmentation["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def compressed_rle_counts(text: str) -> list[int] | None:
    """The run lengths of a compressed RLE string, as pycocotools' ``rleFrString`` reads them (signed, before its
    cast to unsigned); None when the string ends inside a number."""
    runs, position = [], 0
    while position < len(text):
        value = shift = 0
        while True:   # 5 bits per character, least significant first; 0x20 = more follow, 0x10 = sign of the last
            if position == len(text):
                return None
            char = ord(text[position]) - 48
            value |= (char & 0x1F) << shift
            position, shift = position + 1, shift + 5
            if not char & 0x20:
                break
        if char & 0x10:
            value -= 1 << shift
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))   # from the 4th run on: a delta to the one 2 back
    return runs


def rle_for_json(rle: dict) -> dict:
    """pycocotools gives ``counts`` as bytes; json needs str."""
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def checked_box(file, box, width: int, height: int, *, field: str, image_id=None, ann_id=None,
                shown=None) -> list[float]:
    """Validate an ``[x, y, w, h]`` box against its image; return it clipped to the image.

    ``shown`` is what error messages quote as the bad value (default: the box itself), for formats whose boxes
    were converted before landing here.
    """
    where = dict(image_id=image_id, ann_id=ann_id, field=field)
    shown = box if shown is None else shown
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(map(is_number, box))):
        raise DataError(file, "bbox must be 4 finite numbers [x, y, width, height]", value=box, **where)
    x, y, w, h = (float(v) for v in box)
    if w < 0 or h < 0:
        raise DataError(file, "bbox width and height must be >= 0", value=shown, **where)
    tol = BOX_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise DataError(file, f"bbox lies outside the {width}x{height} image (more than {tol:g} px)",
                        value=shown, **where)
    x0, y0 = min(max(x, 0.0), float(width)), min(max(y, 0.0), float(height))
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    return [x0, y0, max(x1 - x0, 0.0), max(y1 - y0, 0.0)]


def is_number(value) -> bool:
    """A finite int or float (bools are not numbers here, although Python says they are; nor are integers beyond
    any float, which json reads from a 400-digit literal and every later ``float()`` would overflow on)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- COCO json ------------------------------------------------------------------------------------------------------

class CocoSource(RecordSource):
    """A COCO instances json and its images.

    Image files are looked up as ``image_root / file_name`` then ``<json dir> / file_name`` when ``image_root`` is
    given, else as ``<json dir> / file_name`` then ``<json dir> / images / file_name``. Everything is validated
    here (see the module docstring); a problem raises :class:`DataError`. ``strict=False`` drops degenerate
    polygons (< 3 points) instead of failing, keeping their annotations' boxes; ``degenerate_polygons`` counts them.
    """

    def __init__(self, json_path: str | Path, image_root: str | Path | None = None, strict: bool = True):
        self.json_path = Path(json_path)
        self.image_root = Path(image_root) if image_root is not None else None
        self.strict, self.degenerate_polygons = strict, 0
        data = _read_json_object(self.json_path)
        categories = self._validated_categories(data["categories"])
        images, paths = self._validated_images(data["images"])
        annotations = self._validated_annotations(data["annotations"], images, categories)
        if self.degenerate_polygons:
            print(f"{self.json_path}: {self.degenerate_polygons} degenerate polygons (< 3 points) dropped, boxes "
                  f"kept (strict=false)", file=sys.stderr, flush=True)
        super().__init__(self.json_path, categories, images, annotations, paths)

    def _fail(self, message: str, **where):
        raise DataError(self.json_path, message, **where)

    def _validated_categories(self, raw: list) -> list[dict]:
        categories, seen = [], set()
        for k, category in enumerate(raw):
            if not isinstance(category, dict):
                self._fail("category must be an object", field=f"categories[{k}]", value=category)
            cid = category.get("id")
            if not is_int(cid):
                self._fail("category id must be an integer", field=f"categories[{k}].id", value=cid)
            if cid in seen:
                self._fail(f"duplicate category id {cid}", field=f"categories[{k}].id", value=cid)
            seen.add(cid)
            name = category.get("name")
            if not isinstance(name, str) or not name:
                self._fail(f"category {cid} needs a non-empty string name", field=f"categories[{k}].name", value=name)
            names = category.get("keypoints", [])
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                self._fail(f"category {cid}: keypoints must be a list of joint names",
                           field=f"categories[{k}].keypoints", value=names)
            bones, sigmas = category.get("skeleton", []), category.get("keypoint_sigmas")
            if not isinstance(bones, list):
                self._fail(f"category {cid}: skeleton must be a list of bones", field=f"categories[{k}].skeleton",
                           value=bones)
            for bone in bones:
                if not (isinstance(bone, list) and len(bone) == 2 and all(is_int(j) and 1 <= j <= len(names)
                                                                          for j in bone)):
                    self._fail(f"category {cid}: skeleton bones must be pairs of 1-based joint indices "
                               f"1..{len(names)}", field=f"categories[{k}].skeleton", value=bone)
            # Our extension, read by keypoint evaluation (OKS): one spread per joint.
            if sigmas is not None and not (isinstance(sigmas, list) and len(sigmas) == len(names)
                                           and all(is_number(s) and s > 0 for s in sigmas)):
                self._fail(f"category {cid}: keypoint_sigmas must be {len(names)} numbers > 0, one per joint",
                           field=f"categories[{k}].keypoint_sigmas", value=sigmas)
            categories.append(dict(category))
        return categories

    def _validated_images(self, raw: list) -> tuple[list[dict], list[Path]]:
        images, paths, seen = [], [], set()
        for k, image in enumerate(raw):
            if not isinstance(image, dict):
                self._fail("image entry must be an object", field=f"images[{k}]", value=image)
            iid = image.get("id")
            if not is_int(iid):
                self._fail("image id must be an integer", field=f"images[{k}].id", value=iid)
            if iid in seen:
                self._fail(f"duplicate image id {iid}", field=f"images[{k}].id", value=iid)
            seen.add(iid)
            entry = dict(image)
            for side in ("width", "height"):
                size = image.get(side)
                if not (is_number(size) and size > 0 and float(size).is_integer()):
                    self._fail(f"image {side} must be a positive integer", image_id=iid, field=side, value=size)
                entry[side] = int(size)
            check_pixel_count(self.json_path, entry["width"], entry["height"], image_id=iid)
            file_name = image.get("file_name")
            if not isinstance(file_name, str) or not file_name:
                self._fail("file_name must be a non-empty string", image_id=iid, field="file_name", value=file_name)
            paths.append(self._find_image(file_name, iid))
            images.append(entry)
        return images, paths

    def _find_image(self, file_name: str, image_id: int) -> Path:
        json_dir = self.json_path.parent
        if self.image_root is not None:
            candidates = [self.image_root / file_name, json_dir / file_name]
        else:
            candidates = [json_dir / file_name, json_dir / "images" / file_name]
        found = first_file(candidates)
        if found is not None:
            return found
        self._fail(f"image file not found (looked for {', '.join(map(str, candidates))})",
                   image_id=image_id, field="file_name", value=file_name)

    def _validated_annotations(self, raw: list, images: list[dict], categories: list[dict]) -> list[dict]:
        image_by_id = {image["id"]: image for image in images}
        category_by_id = {category["id"]: category for category in categories}
        annotations, seen = [], set()
        for k, annotation in enumerate(raw):
            if not isinstance(annotation, dict):
                self._fail("annotation must be an object", field=f"annotations[{k}]", value=annotation)
            aid = annotation.get("id")
            if not is_int(aid):
                self._fail("annotation id must be an integer", field=f"annotations[{k}].id", value=aid)
            if aid in seen:
                self._fail(f"duplicate annotation id {aid}", field=f"annotations[{k}].id", value=aid)
            seen.add(aid)
            image_id = annotation.get("image_id")
            if not is_int(image_id) or image_id not in image_by_id:
                self._fail("image_id refers to no image in 'images'", ann_id=aid, field="image_id", value=image_id)
            category_id = annotation.get("category_id")
            if not is_int(category_id) or category_id not in category_by_id:
                self._fail("category_id refers to no category in 'categories'", ann_id=aid, image_id=image_id,
                           field="category_id", value=category_id)
            annotations.append(self._validated_annotation(annotation, image_by_id[image_id],
                                                          category_by_id[category_id]))
        return annotations

    def _validated_annotation(self, raw: dict, image: dict, category: dict) -> dict:
        """Check one annotation's geometry and extras; return a normalized copy."""
        where = dict(ann_id=raw["id"], image_id=image["id"])
        height, width = image["height"], image["width"]
        annotation = dict(raw)
        annotation["bbox"] = checked_box(self.json_path, raw.get("bbox"), width, height, field="bbox", **where)

        iscrowd = raw.get("iscrowd", 0)
        if not is_number(iscrowd) or iscrowd not in (0, 1):
            self._fail("iscrowd must be 0 or 1", field="iscrowd", value=iscrowd, **where)
        annotation["iscrowd"] = int(iscrowd)

        segmentation = raw.get("segmentation")
        if segmentation is not None:
            segmentation = self._checked_segmentation(segmentation, height, width, where)
            if segmentation == []:    # none written, or (lenient) every polygon degenerate: the box stands alone
                del annotation["segmentation"]
            else:
                annotation["segmentation"] = segmentation

        area = raw.get("area")
        if area is None:
            if "segmentation" in annotation:
                area = float(mask_utils.area(segmentation_to_rle(segmentation, height, width)))
            else:
                area = annotation["bbox"][2] * annotation["bbox"][3]
        elif not (is_number(area) and area >= 0):
            self._fail("area must be a finite number >= 0", field="area", value=area, **where)
        annotation["area"] = float(area)

        if "keypoints" in raw:
            annotation["num_keypoints"] = self._check_keypoints(raw["keypoints"], category, width, height, where)

        caption = raw.get("caption")
        if caption is not None and not isinstance(caption, str):
            self._fail("caption must be a string", field="caption", value=caption, **where)
        return annotation

    def _checked_segmentation(self, segmentation, height: int, width: int, where: dict):
        """The segmentation, validated; in lenient mode without its degenerate polygons (possibly none left)."""
        if isinstance(segmentation, list):
            kept = []
            for k, polygon in enumerate(segmentation):
                field = f"segmentation[{k}]"
                if not (isinstance(polygon, list) and all(map(is_number, polygon))):
                    self._fail("polygon must be a list of finite numbers", field=field, value=polygon, **where)
                if len(polygon) < 6 and not self.strict:
                    self.degenerate_polygons += 1
                    continue
                if len(polygon) < 6 or len(polygon) % 2:
                    hint = "; strict=false drops such polygons and keeps the box" if len(polygon) < 6 else ""
                    self._fail(f"polygon needs an even number (>= 6) of coordinates, has {len(polygon)}{hint}",
                               field=field, value=polygon, **where)
                self._check_near_image(polygon, width, height, field, where)
                kept.append(polygon)
            return kept
        if not isinstance(segmentation, dict):
            self._fail("segmentation must be a list of polygons or an RLE object", field="segmentation",
                       value=segmentation, **where)
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, list) and all(map(is_int, size)) and size == [height, width]):
            self._fail(f"RLE size must be the image's [height, width] = [{height}, {width}]",
                       field="segmentation.size", value=size, **where)
        if isinstance(counts, list):
            if not all(is_int(c) and c >= 0 for c in counts):
                self._fail("uncompressed RLE counts must be integers >= 0", field="segmentation.counts",
                           value=counts, **where)
            if sum(counts) != height * width:
                self._fail(f"uncompressed RLE counts must sum to height*width = {height * width}",
                           field="segmentation.counts", value=sum(counts), **where)
        elif not (isinstance(counts, str) and counts and all(48 <= ord(c) < 112 for c in counts)):
            # Compressed counts are characters '0'..'o' (6 bits each), checked below.
            self._fail("RLE counts must be a list of integers or a compressed RLE string",
                       field="segmentation.counts", value=counts, **where)
        else:
            # pycocotools decodes such a string unchecked: runs that fall short of height*width leave the rest of
            # the mask uninitialised memory, and a string ending inside a number is read past its end.
            runs = compressed_rle_counts(counts)
            if runs is None or min(runs) < 0 or sum(runs) != height * width:
                self._fail(f"compressed RLE counts must decode to run lengths >= 0 summing to height*width = "
                           f"{height * width}", field="segmentation.counts", value=counts, **where)
        return segmentation

    def _check_near_image(self, flat_xy: list, width: int, height: int, field: str, where: dict) -> None:
        """Points may leave the image (masks are clipped to it, joints outside it dropped), but not by more than
        its own size: that is a coordinate error (normalised or swapped coordinates, another image's size), and
        pycocotools rasterises a polygon in time proportional to its length - a point at 1e8 px takes minutes."""
        xs, ys = flat_xy[0::2], flat_xy[1::2]
        if not (all(-width <= x <= 2 * width for x in xs) and all(-height <= y <= 2 * height for y in ys)):
            self._fail(f"points lie farther outside the {width}x{height} image than its own size",
                       field=field, value=flat_xy, **where)

    def _check_keypoints(self, keypoints, category: dict, width: int, height: int, where: dict) -> int:
        """Validate flat ``[x1, y1, v1, ...]`` against the category's joints; return how many are labelled."""
        names = category.get("keypoints", [])
        if not (isinstance(keypoints, list) and all(map(is_number, keypoints))):
            self._fail("keypoints must be a list of finite numbers", field="keypoints", value=keypoints, **where)
        if len(keypoints) != 3 * len(names):
            self._fail(f"keypoints must hold 3 x {len(names)} = {3 * len(names)} numbers for category "
                       f"'{category['name']}' (x, y, visibility per joint)",
                       field="keypoints", value=len(keypoints), **where)
        xy = [value for position, value in enumerate(keypoints) if position % 3 != 2]
        self._check_near_image(xy, width, height, "keypoints", where)
        for joint, name in enumerate(names):
            flag = keypoints[3 * joint + 2]
            if flag not in (0, 1, 2):
                self._fail(f"visibility of joint '{name}' must be 0, 1 or 2", field=f"keypoints[{3 * joint + 2}]",
                           value=flag, **where)
        return sum(1 for flag in keypoints[2::3] if flag > 0)


def _read_json_object(path: Path) -> dict:
    """Read a COCO json and check its top level: an object with lists images, annotations, categories."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, "annotation file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(path, f"cannot read annotation file: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(path, f"invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    except ValueError:               # json's one other complaint: an integer longer than Python converts
        raise DataError(path, f"cannot read annotation file: an integer has more than "
                        f"{sys.get_int_max_str_digits()} digits") from None
    except RecursionError:
        raise DataError(path, "cannot read annotation file: lists or objects nested too deeply") from None
    if not isinstance(data, dict):
        raise DataError(path, "top level must be a JSON object with images, annotations and categories",
                        value=type(data).__name__)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(path, f"missing top-level key '{key}'", field=key)
        if not isinstance(data[key], list):
            raise DataError(path, f"'{key}' must be a list", field=key, value=type(data[key]).__name__)
    return data
