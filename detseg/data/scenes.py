"""The built-in synthetic data set: shapes and stick-figure people on textured backgrounds, with every annotation.

One scene = a background, then 1..``max_objects`` objects drawn one after another, so later objects occlude earlier
ones. Every annotation describes what is *visible*: the instance mask is the pixels the object still owns, the box is
that mask's tight box, and a person's joint covered by a later object is flagged ``v=1`` (labelled, not visible).
The semantic map is the category id of each pixel's owner, so it equals painting the visible masks in any order.

Conventions (also what tests check):

- category id == semantic class id; 0 is background; ids 1..6 are shapes, 7 is ``person``.
- ``size`` is one side (square images, the default 128) or ``(width, height)``. Object sizes, the minimum visible
  area and background patterns scale with the short side, so every object fits however the image is oriented and a
  square image is exactly what it always was; positions span the whole width and height.
- Size words ``small``/``medium``/``large`` use the *visible* area against COCO's 32² / 96² thresholds rescaled from
  a 256 px reference image to this image size (:func:`area_thresholds`; at 128 px: 16² and 48²; a W x H image counts
  as a square of the same area, side sqrt(W * H)). Evaluations that report AP small/medium/large on scenes should
  pass the same ranges to COCOeval's ``areaRng``.
- Only ``person`` annotations carry ``keypoints`` (14 LSP joints, flat [x, y, v] with x, y the joint's pixel index)
  and ``num_keypoints``; other annotations have neither key. v=2: the joint's pixel is in the visible mask; v=1:
  inside the image but covered by a later object; v=0: outside the image (stored as 0, 0, 0).
- No object is drawn where it would leave an earlier one less than 40% (and fewer than ~20 px at 128 px) visible,
  so no annotation is almost hidden and every painted object is annotated.
- About 20% of the objects of a multi-object scene are persons; single-object mode draws the 7 classes equally.
- Captions read "<size> <colour> <shape> <relation> a <size> <colour> <shape>" ("small person in red" for people);
  the relation to the nearest other object is "in front of"/"behind" where one visibly covers the other, else the
  dominant direction between box centres ("left of", "right of", "above", "below"); alone: "in the top left", ...
- Every scene is a pure function of (seed, split, index): ask for samples in any order, in any process.
"""
from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from detseg.data.records import LSP_JOINTS, LSP_SKELETON, Sample
from detseg.data.scenes_draw import (ELLIPSE_RATIO_RANGE, PolygonOutline, StickFigure, add_sensor_noise,
                                     draw_background, pick_colour, sample_body_rotation, sample_pose,
                                     shape_fill_factor, shape_outline)
from detseg.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "star", "ellipse", "hexagon")
PERSON_ID = len(SHAPES) + 1
SCENE_CATEGORIES: list[dict] = [
    *({"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)),
    {"id": PERSON_ID, "name": "person", "supercategory": "person", "keypoints": list(LSP_JOINTS),
     "skeleton": [[a + 1, b + 1] for a, b in LSP_SKELETON]},
]
CLASS_NAMES = [category["name"] for category in SCENE_CATEGORIES]

PERSON_PROBABILITY = 0.2          # share of persons among the objects of a multi-object scene
SCENE_FULLY_INSIDE = 0.8          # share of objects kept fully inside the image; the rest may cross the border
PLACEMENT_ATTEMPTS = 8            # tries to place an object before giving up on it (every 2 failures shrink it)
MIN_VISIBLE_FRACTION = 0.4        # an earlier object keeps at least this share of its pixels visible


def area_thresholds(size: int | tuple[int, int]) -> tuple[float, float]:
    """Visible-area limits (small below the first, large above the second) for a ``size`` px image, or a
    ``(width, height)`` one taken as the square of the same area (side sqrt(W * H))."""
    side = math.sqrt(size[0] * size[1]) if isinstance(size, (tuple, list)) else size
    scale = side / 256
    return (32 * scale) ** 2, (96 * scale) ** 2


def size_word(area: float, size: int | tuple[int, int]) -> str:
    """``small``/``medium``/``large`` for a visible area in a ``size`` px (or ``(width, height)``) image."""
    small, large = area_thresholds(size)
    return "small" if area < small else ("medium" if area <= large else "large")


@dataclass
class SceneObject:
    """One drawn object: what it is, where, its colour and (person) its joints' pixel indices."""

    category_id: int
    outline: PolygonOutline | StickFigure
    offset: np.ndarray                 # (2,) where the outline's origin sits in the image, px
    colour_name: str
    colour: np.ndarray                 # (3,) float32 RGB
    full_area: int                     # pixels it painted inside the image before anything covered it
    joints: np.ndarray | None = None   # (14, 2) int, person only
    covers: tuple[int, ...] = ()       # earlier objects it was drawn over (took visible pixels from)


@dataclass
class Scene:
    """A rendered scene before it becomes COCO records."""

    image: np.ndarray                  # (H, W, 3) uint8
    owner: np.ndarray                  # (H, W) uint8: 0 background, k + 1 where objects[k] is on top
    objects: list[SceneObject]


class ScenesSource:
    """Synthetic scenes as a :class:`detseg.data.records.Source`.

    ``size`` is the side of square images or ``(width, height)``. ``self.size`` keeps it as given, an int for a
    square (``(S, S)`` becomes ``S``: the same scenes); ``self.width`` and ``self.height`` are set for every source.
    ``single_object=True`` gives exactly one medium or large object fully inside the image (classes balanced),
    placed anywhere or, with ``centered=True``, centred — for classification, localization and pose. (Beyond about
    4:1 the short side bounds that object and the size words, taken at side sqrt(W * H), may call it small.)
    """

    def __init__(self, num_images: int, size: int | tuple[int, int] = 128, seed: int = 0, split: str = "train",
                 single_object: bool = False, centered: bool = False, max_objects: int = 8,
                 category_ids: tuple[int, ...] | None = None):
        _check_int("num_images", num_images, 0)
        self.width, self.height = _check_size(size)
        _check_int("max_objects", max_objects, 1, 99)          # annotation id = image_id * 100 + k
        _check_int("seed", seed, 0)
        if not isinstance(split, str) or not split:
            raise ConfigError(f"scenes: split must be a non-empty string (got {split!r})")
        if centered and not single_object:
            raise ConfigError("scenes: centered=True only applies with single_object=True")
        known = {category["id"] for category in SCENE_CATEGORIES}
        if category_ids is not None and (not single_object or not category_ids or set(category_ids) - known):
            raise ConfigError(f"scenes: category_ids={category_ids!r} needs single_object=True and ids in "
                              f"{sorted(known)}")
        self.category_ids = tuple(category_ids) if category_ids else None
        self.size = self.width if self.width == self.height else (self.width, self.height)
        self.num_images, self.seed, self.split = num_images, seed, split
        self.single_object, self.centered, self.max_objects = single_object, centered, max_objects
        self._split_code = zlib.crc32(split.encode())          # stable across runs and processes, unlike hash()
        self._side = min(self.width, self.height)              # what object sizes scale with
        self._min_visible = max(6, round(20 * (self._side / 128) ** 2))
        self.categories = copy.deepcopy(SCENE_CATEGORIES)           # callers may edit theirs
        self.images = [{"id": i + 1, "file_name": f"{split}/{i + 1:06d}.png", "width": self.width,
                        "height": self.height} for i in range(num_images)]

    def __len__(self) -> int:
        return self.num_images

    # ---------------------------------------------------------------------------------------------------- drawing
    def render(self, index: int) -> Scene:
        """Draw scene ``index``: the image and who owns each pixel, no COCO records (the fast path)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"scene index {index} out of range 0..{self.num_images - 1}")
        rng = np.random.default_rng([self.seed, self._split_code, index])
        background = draw_background(rng, self.width, self.height)                   # (H, W, 3) float32
        owner = np.zeros((self.height, self.width), dtype=np.uint8)
        visible: list[int] = []                # pixels each object still owns
        objects: list[SceneObject] = []
        count = 1 if self.single_object else int(rng.integers(1, self.max_objects + 1))
        for _ in range(count):
            self._place_object(rng, background, owner, visible, objects)
        # Paint the objects in drawing order with the very rasterizer that drew their masks (same pixels, so the
        # image agrees with ``owner`` exactly), then sensor noise over everything.
        for obj in objects:
            obj.outline.draw(background, obj.offset, obj.colour)
        return Scene(add_sensor_noise(rng, background), owner, objects)

    def _sample_category(self, rng: np.random.Generator) -> int:
        if self.single_object:                                   # balanced classes for classification
            if self.category_ids:                                # e.g. people only, for pose
                return int(self.category_ids[rng.integers(len(self.category_ids))])
            return int(rng.integers(1, PERSON_ID + 1))
        if rng.random() < PERSON_PROBABILITY:
            return PERSON_ID
        return int(rng.integers(1, PERSON_ID))

    def _make_outline(self, rng: np.random.Generator, category_id: int, shrink: float):
        """A randomly sized and rotated outline. Shapes are sized by target area (log-uniform), people by height."""
        s = self._side
        if category_id == PERSON_ID:
            low, high = (0.5 * s, 0.9 * s) if self.single_object else (max(0.14 * s, 10.0), 0.62 * s)
            height = _log_uniform(rng, low, high) * shrink
            return StickFigure(*sample_pose(rng), height, sample_body_rotation(rng))
        shape = SHAPES[category_id - 1]
        ratio = rng.uniform(*ELLIPSE_RATIO_RANGE)
        if self.single_object:   # medium or large: classifiable and localizable
            low, high, max_radius = 0.06 * s * s, 0.3 * s * s, 0.45 * s
        else:                    # about 40% small, 42% medium, 18% large before occlusion (COCO-like)
            low, high, max_radius = 30 * (s / 128) ** 2, 6000 * (s / 128) ** 2, 0.36 * s
        area = _log_uniform(rng, max(low, 2 * self._min_visible), high) * shrink ** 2
        radius = min(math.sqrt(area / (math.pi * shape_fill_factor(shape, ratio))), max_radius)
        return shape_outline(shape, radius, rng.uniform(0, 2 * math.pi), ratio)

    def _sample_offset(self, rng: np.random.Generator, bounds, first: bool) -> np.ndarray:
        """Where the outline's origin goes: its box fully inside the image, or (sometimes) crossing the border.

        The first object of a scene always lies fully inside, so every scene has at least one object.
        """
        x0, y0, x1, y1 = bounds
        last_x, last_y = self.width - 1, self.height - 1
        if self.centered:
            return np.array([last_x / 2 - (x0 + x1) / 2, last_y / 2 - (y0 + y1) / 2])
        slack = 0.0 if self.single_object or first or rng.random() < SCENE_FULLY_INSIDE else 0.3
        offset = []
        for lo_edge, hi_edge, last in ((x0, x1, last_x), (y0, y1, last_y)):
            lo, hi = -lo_edge - slack * (hi_edge - lo_edge), last - hi_edge + slack * (hi_edge - lo_edge)
            offset.append(rng.uniform(lo, hi) if lo <= hi else (lo + hi) / 2)
        return np.array(offset)

    def _place_object(self, rng: np.random.Generator, background: np.ndarray, owner: np.ndarray,
                      visible: list[int], objects: list[SceneObject]) -> None:
        """Try a few positions (shrinking the object now and then) until it hides no earlier object too much."""
        category_id = self._sample_category(rng)
        full_areas = np.array([obj.full_area for obj in objects], dtype=np.int64)
        keep_at_least = np.maximum(self._min_visible, MIN_VISIBLE_FRACTION * full_areas)
        for attempt in range(PLACEMENT_ATTEMPTS):
            outline = self._make_outline(rng, category_id, 0.8 ** (attempt // 2))
            mask = np.zeros_like(owner)
            offset = self._sample_offset(rng, outline.bounds, first=not objects)
            joints = outline.draw(mask, offset)
            full = mask.view(bool)
            full_area = int(np.count_nonzero(full))
            if full_area < self._min_visible:
                continue
            covered = np.bincount(owner[full], minlength=len(objects) + 1)[1:]      # pixels taken from each
            if np.any(np.asarray(visible) - covered < keep_at_least):
                continue
            # Contrast with what lies beneath: the local background and every object it overlaps.
            references = [np.array(cv2.mean(background, mask)[:3])]
            references += [objects[k].colour for k in np.flatnonzero(covered)]
            colour_name, colour = pick_colour(rng, references)
            for k in np.flatnonzero(covered):
                visible[k] -= int(covered[k])
            owner[full] = len(objects) + 1
            visible.append(full_area)
            objects.append(SceneObject(category_id, outline, offset, colour_name, colour, full_area,
                                       joints if category_id == PERSON_ID else None,
                                       tuple(int(k) for k in np.flatnonzero(covered))))
            return

    # ---------------------------------------------------------------------------------------------------- records
    def sample(self, index: int) -> Sample:
        """Scene ``index`` with COCO annotations, visible masks (N, H, W) uint8 and the semantic map (H, W) uint8."""
        scene = self.render(index)
        image_id = index + 1
        owners = np.arange(1, len(scene.objects) + 1, dtype=np.uint8)
        masks = (scene.owner[None] == owners[:, None, None]).astype(np.uint8)         # (N, H, W)
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))        # one RLE per mask
        boxes = [cv2.boundingRect(mask) for mask in masks]                           # tight (x, y, w, h)
        areas = [int(np.count_nonzero(mask)) for mask in masks]
        captions = _captions(scene.objects, boxes, areas, masks, self.size)
        annotations = []
        for k, obj in enumerate(scene.objects):
            annotation = {
                "id": image_id * 100 + k + 1, "image_id": image_id, "category_id": obj.category_id,
                "bbox": [float(v) for v in boxes[k]], "area": float(areas[k]), "iscrowd": 0,
                "segmentation": {"size": list(rles[k]["size"]), "counts": rles[k]["counts"].decode("ascii")},
                "caption": captions[k],
            }
            if obj.joints is not None:
                annotation["keypoints"] = _keypoints(obj.joints, scene.owner, k + 1)
                annotation["num_keypoints"] = sum(1 for v in annotation["keypoints"][2::3] if v > 0)
            annotations.append(annotation)
        palette = np.array([0] + [obj.category_id for obj in scene.objects], dtype=np.uint8)
        return Sample(image=scene.image, image_id=image_id, annotations=annotations, masks=masks,
                      semantic=palette[scene.owner], file_name=self.images[index]["file_name"])


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """Sizes spread evenly over scales (as many 8-16 px objects as 32-64 px ones); ``high`` below ``low`` gives low."""
    return math.exp(rng.uniform(math.log(low), math.log(max(low, high))))


def _check_size(size) -> tuple[int, int]:
    """(width, height) from one side (a square) or a (width, height) pair; every side at least 16 px."""
    sides = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    try:
        if len(sides) != 2:
            raise ConfigError("two sides")
        for side in sides:
            _check_int("size", side, 16)
    except ConfigError:
        raise ConfigError(f"scenes: size must be an integer >= 16 or a (width, height) pair of them "
                          f"(got {size!r})") from None
    return int(sides[0]), int(sides[1])


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or \
            (high is not None and value > high):
        limit = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        raise ConfigError(f"scenes: {name} must be {limit} (got {value!r})")


def _keypoints(joints: np.ndarray, owner: np.ndarray, owner_id: int) -> list[int]:
    """Flat COCO keypoints: v=2 the joint's pixel is still the person's, v=1 covered, v=0 outside the image."""
    height, width = owner.shape
    flat = []
    for x, y in joints.tolist():
        if 0 <= x < width and 0 <= y < height:
            flat += [x, y, 2 if owner[y, x] == owner_id else 1]
        else:
            flat += [0, 0, 0]
    return flat


# -------------------------------------------------------------------------------------------------------- captions
def _describe(obj: SceneObject, area: int, size: int | tuple[int, int]) -> str:
    if obj.category_id == PERSON_ID:
        return f"{size_word(area, size)} person in {obj.colour_name}"
    return f"{size_word(area, size)} {obj.colour_name} {SHAPES[obj.category_id - 1]}"


def _absolute_position(cx: float, cy: float, width: int, height: int) -> str:
    column = ("left", "center", "right")[min(int(3 * cx / width), 2)]
    row = ("top", "middle", "bottom")[min(int(3 * cy / height), 2)]
    if row == "middle":
        return "in the center" if column == "center" else f"on the {column}"
    return f"at the {row}" if column == "center" else f"in the {row} {column}"


def _captions(objects: list[SceneObject], boxes, areas, masks: np.ndarray, size: int | tuple[int, int]) -> list[str]:
    """One true sentence per object: size, colour, shape, and where it is relative to its nearest neighbour.

    ``size`` is the image's (for the size words); thirds of the width and height name absolute positions.

    When one was drawn over part of the other and their visible masks still touch, the relation is "in front of" /
    "behind"; otherwise it is the dominant direction between their visible boxes' centres ("left of", "above", ...).
    """
    centres = np.array([[x + w / 2, y + h / 2] for x, y, w, h in boxes])              # (N, 2)
    height, width = masks.shape[1:]                                                   # masks (N, H, W)
    captions = []
    for i, obj in enumerate(objects):
        text = _describe(obj, areas[i], size)
        if len(objects) == 1:
            captions.append(f"{text} {_absolute_position(*centres[i], width, height)}")
            continue
        distances = ((centres - centres[i]) ** 2).sum(axis=1)
        distances[i] = np.inf
        j = int(distances.argmin())
        dx, dy = centres[i] - centres[j]
        if _visibly_occludes(objects, masks, i, j):
            relation = "in front of"
        elif _visibly_occludes(objects, masks, j, i):
            relation = "behind"
        elif abs(dx) >= abs(dy) and dx != 0:
            relation = "left of" if dx < 0 else "right of"
        elif dy != 0:
            relation = "above" if dy < 0 else "below"
        else:
            captions.append(f"{text} {_absolute_position(*centres[i], width, height)}")
            continue
        captions.append(f"{text} {relation} a {_describe(objects[j], areas[j], size)}")
    return captions


def _visibly_occludes(objects: list[SceneObject], masks: np.ndarray, front: int, back: int) -> bool:
    """``front`` was drawn over part of ``back`` and the two still visibly touch (the occlusion edge shows)."""
    if back not in objects[front].covers:
        return False
    grown = cv2.dilate(masks[front], np.ones((3, 3), np.uint8))
    return bool(np.any(grown & masks[back]))


def render_single_object_images(n: int, size: int | tuple[int, int], seed: int = 0, split: str = "train",
                                centered: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` single-object scenes for image classification, rendered directly at ``size`` px (or (width, height)).

    Returns images (N, H, W, 3) uint8, labels (N,) int64 with label = category_id - 1, and the class names.
    """
    source = ScenesSource(n, size=size, seed=seed, split=split, single_object=True, centered=centered)
    images = np.zeros((n, source.height, source.width, 3), dtype=np.uint8)
    labels = np.zeros(n, dtype=np.int64)
    for index in range(n):
        scene = source.render(index)
        images[index] = scene.image
        labels[index] = scene.objects[0].category_id - 1
    return images, labels, list(CLASS_NAMES)
