"""Drawing pieces of the synthetic scenes: backgrounds, named colours, shape outlines and stick-figure people.

Everything here is plain geometry drawn with OpenCV with antialiasing *off* (``LINE_8``), so a mask drawn once is the
exact set of pixels the object paints: the image, the instance masks, the boxes and the semantic map all come from the
same drawing and can never disagree. Sizes are sampled relative to the image's short side, so a scene generator asks
for "an object of this extent" and the outline works in pixels.

Keypoint convention: a joint's (x, y) is the *pixel index* (column, row) of the pixel that holds it, like COCO's own
integer keypoints; every joint pixel is part of the person's full (unoccluded) mask.
"""
from __future__ import annotations

import functools
import math

import cv2
import numpy as np

from detseg.data.records import LSP_JOINTS, LSP_SKELETON

# --------------------------------------------------------------------------------------------------------------------
# Named colours. An object's colour is a bucket centre plus a small jitter, so its name stays the nearest bucket and a
# caption's colour word is always true.
COLOUR_BUCKETS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "orange": (240, 135, 25),
    "yellow": (235, 215, 40),
    "green": (40, 160, 60),
    "cyan": (40, 200, 215),
    "blue": (35, 70, 210),
    "purple": (130, 55, 175),
    "pink": (240, 120, 185),
    "brown": (125, 75, 35),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
}
_BUCKET_NAMES = tuple(COLOUR_BUCKETS)
_BUCKET_RGB = np.array([COLOUR_BUCKETS[name] for name in _BUCKET_NAMES], dtype=np.float32)  # (B, 3)
COLOUR_JITTER = 14          # +- per channel around the bucket centre
MIN_CONTRAST = 95.0         # RGB distance a bucket centre keeps from what lies under / beneath the object


def pick_colour(rng: np.random.Generator, references: list[np.ndarray]) -> tuple[str, np.ndarray]:
    """A random named colour that stands out from every reference colour (local background, occluded objects).

    Returns the bucket name and the jittered RGB (3,) float32. If no bucket is far enough from all references (rare:
    a mid-grey background under an object overlapping others), the most distant bucket is used.
    """
    refs = np.asarray(references, dtype=np.float32).reshape(-1, 3)                       # (R, 3)
    gaps = _BUCKET_RGB[:, None, :] - refs[None, :, :]                                    # (B, R, 3)
    distance = np.sqrt((gaps * gaps).sum(axis=2)).min(axis=1)                            # (B,)
    candidates = np.flatnonzero(distance >= MIN_CONTRAST)
    choice = int(candidates[rng.integers(len(candidates))]) if len(candidates) else int(distance.argmax())
    jitter = rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3).astype(np.float32)
    return _BUCKET_NAMES[choice], np.clip(_BUCKET_RGB[choice] + jitter, 0, 255)


# --------------------------------------------------------------------------------------------------------------------
# Backgrounds: something for a detector to learn to ignore. Kept at low contrast so objects stay clearly visible.

@functools.lru_cache(maxsize=8)
def _pixel_grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Column and row index of every pixel, (H, W) float32 each, centred on the image middle."""
    return np.meshgrid(np.arange(width, dtype=np.float32) - (width - 1) / 2,
                       np.arange(height, dtype=np.float32) - (height - 1) / 2)


def _base_colour(rng: np.random.Generator) -> np.ndarray:
    """A muted colour: a grey level with a small random tint. (3,) float32."""
    return np.clip(rng.uniform(35, 220) + rng.normal(0, 18, size=3), 0, 255).astype(np.float32)


def draw_background(rng: np.random.Generator, width: int, height: int | None = None) -> np.ndarray:
    """One random background, (H, W, 3) float32 (square when ``height`` is omitted): flat, linear gradient,
    stripes, checker or blotchy noise.

    Each is a base colour plus a scalar pattern (H, W) times a per-channel strength. Values may leave 0..255 by a
    little; the final noise step clips. Per-pixel sensor noise comes later over the whole image (objects included),
    so a flat background still has texture. Pattern periods follow the short side, like the objects' sizes; the
    gradient spans at most +-60 along the long side. A square image draws exactly what it always did.
    """
    height = width if height is None else height
    short, long = min(width, height), max(width, height)
    base = _base_colour(rng)
    kind = rng.integers(5)
    if kind == 0:                                                       # flat
        background = np.empty((height, width, 3), dtype=np.float32)
        background[:] = base
        return background
    xs, ys = _pixel_grid(width, height)
    cos, sin = math.cos(angle := rng.uniform(0, 2 * math.pi)), math.sin(angle)
    along = cv2.addWeighted(xs, cos, ys, sin, 0)                        # (H, W) distance along a random direction
    if kind == 1:                                                       # linear gradient, up to +-60 across
        pattern, strength = along, rng.uniform(-60, 60, size=3) / long
    else:
        amplitude = rng.uniform(7, 20)
        period = short * rng.uniform(0.04, 0.14)
        if kind == 2:                                                   # stripes, soft or hard edged
            pattern = np.sin(along * np.float32(2 * math.pi / period))
            if rng.random() < 0.5:
                pattern = np.sign(pattern)
        elif kind == 3:                                                 # checker, rotated
            across = cv2.addWeighted(xs, -sin, ys, cos, 0)
            cells = np.floor(along / np.float32(period)) + np.floor(across / np.float32(period))
            pattern = 1 - 2 * (cells.astype(np.int32) & 1).astype(np.float32)
        else:                                                           # blotches: coarse noise, smoothly upsampled
            cells = int(rng.integers(3, 9))                             # per short side, so blotches stay round
            coarse = rng.normal(0, 1, size=(round(cells * height / short), round(cells * width / short)))
            pattern = cv2.resize(coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
            amplitude *= 1.5
        strength = amplitude * (1 + rng.normal(0, 0.2, size=3))        # slightly tinted
    # background[..., c] = strength[c] * pattern + base[c], in one pass: (H, W) -> (H, W, 3)
    affine = np.stack([strength, base], axis=1).astype(np.float32)      # (3, 2)
    return cv2.transform(pattern.astype(np.float32, copy=False), affine)


@functools.lru_cache(maxsize=4)
def _noise_bank(width: int, height: int) -> np.ndarray:
    """A fixed (H + 2s, W + 2s, 3) float32 field of standard normal noise (s the short side); each image reads a
    random H x W window of it.

    Drawing 3 * H * W fresh normals per image would be the single most expensive step of a scene; a random window of
    a fixed field looks the same and costs a slice. Seeded, so scenes stay a pure function of their own seed.
    """
    short = min(width, height)
    return np.random.default_rng(short).standard_normal((height + 2 * short, width + 2 * short, 3),
                                                         dtype=np.float32)


def add_sensor_noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3) float32 plus Gaussian noise of a random strength, clipped and returned as uint8."""
    height, width = image.shape[:2]
    x, y = rng.integers(0, 2 * min(width, height), size=2)
    window = _noise_bank(width, height)[y:y + height, x:x + width]
    noisy = cv2.scaleAdd(window, float(rng.uniform(2, 9)), image)
    return np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Outlines. Each knows its bounds relative to its own origin and draws itself into a mask at an offset.

_SUBPIXEL_BITS = 4                      # cv2 fixed-point vertices: polygons keep sub-pixel precision
_SUBPIXEL = 1 << _SUBPIXEL_BITS


def _scalar(value) -> tuple[float, ...]:
    """cv2 colour argument from 1 (mask) or an RGB triple (image)."""
    return tuple(float(v) for v in np.atleast_1d(value))


class PolygonOutline:
    """A filled polygon (circles and ellipses are many-sided polygons): one drawing path for every shape."""

    def __init__(self, points: np.ndarray):
        self.points = points                                       # (P, 2) float x, y relative to the origin
        self.bounds = (*points.min(axis=0), *points.max(axis=0))   # x0, y0, x1, y1

    def draw(self, canvas: np.ndarray, offset: np.ndarray, value=1) -> None:
        """Fill the polygon, origin moved to ``offset`` (x, y), into a mask (H, W) or an image (H, W, 3).

        ``value`` is 1 for a mask or an RGB colour for an image; both get exactly the same pixels.
        """
        fixed = np.round((self.points + offset) * _SUBPIXEL).astype(np.int32)
        cv2.fillPoly(canvas, [fixed], _scalar(value), cv2.LINE_8, _SUBPIXEL_BITS)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    """Rotate (P, 2) points about the origin by ``angle`` radians (clockwise on screen, since y points down)."""
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _circle_points(radius_x: float, radius_y: float, count: int = 40) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, count, endpoint=False)
    return np.stack([radius_x * np.cos(t), radius_y * np.sin(t)], axis=1)


def _regular_points(corners: int, radius: float) -> np.ndarray:
    t = np.arange(corners) * (2 * math.pi / corners) - math.pi / 2   # first corner points up
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


STAR_INNER_RATIO = 0.45
ELLIPSE_RATIO_RANGE = (0.42, 0.62)      # minor/major: clearly not a circle


def _star_points(radius: float) -> np.ndarray:
    outer = _regular_points(5, radius)
    inner = _rotate(_regular_points(5, radius * STAR_INNER_RATIO), math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(10, 2)          # alternate outer and inner corners


def shape_fill_factor(shape: str, ellipse_ratio: float = 0.5) -> float:
    """Area of ``shape`` as a fraction of its circumscribed disc; turns a wanted pixel area into an extent."""
    return {
        "circle": 1.0,
        "square": 2 / math.pi,
        "triangle": 3 * math.sqrt(3) / (4 * math.pi),
        "star": 5 * STAR_INNER_RATIO * math.sin(math.pi / 5) / math.pi,
        "ellipse": ellipse_ratio,
        "hexagon": 3 * math.sqrt(3) / (2 * math.pi),
    }[shape]


def shape_outline(shape: str, radius: float, angle: float, ellipse_ratio: float = 0.5) -> PolygonOutline:
    """The outline of a shape with circumscribed radius ``radius`` px, rotated by ``angle`` radians."""
    if shape == "circle":
        points = _circle_points(radius, radius)
    elif shape == "ellipse":
        points = _circle_points(radius, radius * ellipse_ratio)
    elif shape == "square":
        points = _regular_points(4, radius)
        angle += math.pi / 4                                        # angle 0 is an upright square, not a diamond
    elif shape == "triangle":
        points = _regular_points(3, radius)
    elif shape == "hexagon":
        points = _regular_points(6, radius)
    elif shape == "star":
        points = _star_points(radius)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return PolygonOutline(_rotate(points, angle))


# --------------------------------------------------------------------------------------------------------------------
# The person: a stick figure with the 14 LSP joints. The pose is built upright in units of body height, facing the
# viewer (the person's right side on the image's left, as in LSP), then rotated and scaled.

_J = {name: i for i, name in enumerate(LSP_JOINTS)}
_ARM_STYLES = ((5, 35), (55, 110), (120, 172))     # upper-arm angle from straight down, degrees: down, out, up
UPPER_ARM, FOREARM, THIGH, SHIN = 0.16, 0.15, 0.24, 0.23
HEAD_RADIUS, NECK_LENGTH = 0.09, 0.04


def _limb_end(start: np.ndarray, degrees_from_down: float, outward: float, length: float) -> np.ndarray:
    """End of a limb leaving ``start`` at an angle from straight down, measured away from the body's midline."""
    a = math.radians(degrees_from_down)
    return start + length * np.array([outward * math.sin(a), math.cos(a)])


def sample_pose(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random upright pose in body-height units: (14, 2) joints in LSP order and the head centre (2,).

    The origin is the middle of the hips; y points down; the head top is about one unit above the ankles.
    """
    joints = np.zeros((14, 2))
    neck = np.array([0.0, -0.30])
    joints[_J["neck"]] = neck
    for side, outward in (("r", -1.0), ("l", 1.0)):              # right side drawn on the image's left
        shoulder = joints[_J[f"{side}_shoulder"]] = neck + [outward * 0.11, 0.03]
        lo, hi = _ARM_STYLES[rng.integers(3)]
        upper = rng.uniform(lo, hi)
        elbow = joints[_J[f"{side}_elbow"]] = _limb_end(shoulder, upper, outward, UPPER_ARM)
        joints[_J[f"{side}_wrist"]] = _limb_end(elbow, upper + rng.uniform(-70, 70), outward, FOREARM)
        hip = joints[_J[f"{side}_hip"]] = np.array([outward * 0.07, 0.0])
        thigh = rng.uniform(45, 90) if rng.random() < 0.15 else rng.uniform(-3, 32)   # sometimes a raised leg
        knee = joints[_J[f"{side}_knee"]] = _limb_end(hip, thigh, outward, THIGH)
        joints[_J[f"{side}_ankle"]] = _limb_end(knee, thigh - rng.uniform(-10, 45), outward, SHIN)
    tilt = math.radians(rng.uniform(-15, 15))
    up = np.array([math.sin(tilt), -math.cos(tilt)])
    head_centre = neck + (NECK_LENGTH + HEAD_RADIUS) * up
    joints[_J["head_top"]] = neck + (NECK_LENGTH + 1.85 * HEAD_RADIUS) * up   # just inside the top of the head disc
    return joints, head_centre


def sample_body_rotation(rng: np.random.Generator) -> float:
    """Mostly upright, sometimes lying down, occasionally at any angle short of upside down. Radians."""
    u = rng.random()
    if u < 0.7:
        degrees = rng.uniform(-15, 15)
    elif u < 0.9:
        degrees = rng.choice([-1, 1]) * rng.uniform(75, 105)
    else:
        degrees = rng.uniform(-120, 120)
    return math.radians(degrees)


class StickFigure:
    """A person of ``height`` px: thick limbs, a filled torso, a head disc; joints in pixels relative to the origin."""

    def __init__(self, joints: np.ndarray, head_centre: np.ndarray, height: float, angle: float):
        self.joints = _rotate(joints, angle) * height                  # (14, 2) px
        self.head_centre = _rotate(head_centre[None], angle)[0] * height
        self.thickness = max(2, round(height / 13))
        self.head_radius = max(2, round(HEAD_RADIUS * height))
        half = self.thickness / 2
        lo = np.minimum(self.joints.min(axis=0) - half, self.head_centre - self.head_radius)
        hi = np.maximum(self.joints.max(axis=0) + half, self.head_centre + self.head_radius)
        self.bounds = (*lo, *hi)

    def draw(self, canvas: np.ndarray, offset: np.ndarray, value=1) -> np.ndarray:
        """Draw into a mask (H, W) with ``value`` 1 or an image (H, W, 3) with an RGB ``value``.

        Returns the joints' pixel indices (14, 2) int; they may lie outside the image.
        """
        colour = _scalar(value)
        joints = np.round(self.joints + offset).astype(np.int32)
        points = [tuple(int(v) for v in p) for p in joints]
        torso = joints[[_J["r_shoulder"], _J["l_shoulder"], _J["l_hip"], _J["r_hip"]]]
        cv2.fillPoly(canvas, [torso], colour, cv2.LINE_8)
        for a, b in LSP_SKELETON:
            cv2.line(canvas, points[a], points[b], colour, self.thickness, cv2.LINE_8)
        head = tuple(int(v) for v in np.round(self.head_centre + offset))
        cv2.circle(canvas, head, self.head_radius, colour, -1, cv2.LINE_8)
        # Thick lines cover their end points, but make it exact: each joint's own pixel belongs to the figure.
        height, width = canvas.shape[:2]
        inside = (joints[:, 0] >= 0) & (joints[:, 0] < width) & (joints[:, 1] >= 0) & (joints[:, 1] < height)
        canvas[joints[inside, 1], joints[inside, 0]] = value
        return joints
