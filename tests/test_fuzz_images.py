"""Property-based fuzzing of image files: as the images of a COCO data set and as the inputs of ``detseg predict``.

Each case draws an image - a format and pixel mode (RGB, L, LA, RGBA, palette with transparency, 16- and 32-bit,
float, 1-bit, CMYK JPEG, animated GIF, ...) at an ordinary or an extreme size (1 x 1, 20,000 px wide or high) - and
then maybe damages it: cut off, bytes flipped, emptied, replaced by random bytes under an image suffix, or only a
header that claims a huge image. The property: a one-line DetsegError that starts with the image's (or the
json's) path, or a sample / a prediction that is what a good image gives. Never a traceback, never minutes or
gigabytes spent on one file.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from detseg import api, registry
from detseg.config import resolve
from detseg.engine.checkpoint import save_checkpoint
from detseg.errors import DetsegError
from detseg.predict import predict_paths

from .conftest import invoke_cli
from .fuzz_support import assert_clear, fuzz_settings, make_task, png_header_only, trains_or_fails_clearly


def _noise(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-2 ** 31, 2 ** 31 - 1, (height, width), dtype=np.int32))
    if mode == "F":                      # floats beyond 0..1 and 0..255, NaN and infinities among them
        values = rng.normal(0, 300, (height, width)).astype(np.float32)
        values.flat[:3] = [np.nan, np.inf, -np.inf][:values.size]
        return Image.fromarray(values)
    channels = len(Image.new(mode, (1, 1)).getbands())
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.frombytes(mode, (width, height), pixels.tobytes()) if mode != "1" else \
        Image.fromarray(pixels[..., 0] > 127)


def _palette_with_transparency(width: int, height: int, seed: int) -> Image.Image:
    image = _noise("L", width, height, seed).convert("P")
    image.info["transparency"] = 3
    return image


def _animated_gif(width: int, height: int, seed: int) -> bytes:
    frames = [_noise("RGB", width, height, seed + k).convert("P") for k in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    return buffer.getvalue()


def _saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


# kind -> (file suffix, bytes of a w x h image drawn from a seed)
IMAGE_KINDS = {
    "png RGB": (".png", lambda w, h, s: _saved(_noise("RGB", w, h, s), "PNG")),
    "png L": (".png", lambda w, h, s: _saved(_noise("L", w, h, s), "PNG")),
    "png LA": (".png", lambda w, h, s: _saved(_noise("LA", w, h, s), "PNG")),
    "png RGBA": (".png", lambda w, h, s: _saved(_noise("RGBA", w, h, s), "PNG")),
    "png palette + transparency": (".png", lambda w, h, s: _saved(_palette_with_transparency(w, h, s), "PNG",
                                                                   transparency=3)),
    "png 16-bit": (".png", lambda w, h, s: _saved(_noise("I;16", w, h, s), "PNG")),
    "png 1-bit": (".png", lambda w, h, s: _saved(_noise("1", w, h, s), "PNG")),
    "tiff 32-bit integer": (".tif", lambda w, h, s: _saved(_noise("I", w, h, s), "TIFF")),
    "tiff float": (".tiff", lambda w, h, s: _saved(_noise("F", w, h, s), "TIFF")),
    "tiff CMYK": (".tif", lambda w, h, s: _saved(_noise("CMYK", w, h, s), "TIFF")),
    "jpeg RGB": (".jpg", lambda w, h, s: _saved(_noise("RGB", w, h, s), "JPEG")),
    "jpeg gray": (".jpeg", lambda w, h, s: _saved(_noise("L", w, h, s), "JPEG")),
    "jpeg CMYK": (".jpg", lambda w, h, s: _saved(_noise("CMYK", w, h, s), "JPEG")),
    "gif animated": (".gif", _animated_gif),
    "bmp": (".bmp", lambda w, h, s: _saved(_noise("RGB", w, h, s), "BMP")),
    "webp RGBA": (".webp", lambda w, h, s: _saved(_noise("RGBA", w, h, s), "WEBP", lossless=True)),
    "ppm": (".ppm", lambda w, h, s: _saved(_noise("RGB", w, h, s), "PPM")),
}
SIZES = [(1, 1), (2, 1), (1, 3), (7, 5), (33, 17), (20_000, 1), (20_000, 2), (1, 20_000)]


def _flipped(data: bytes, at: float, junk: bytes) -> bytes:
    position = int(at * max(len(data) - 1, 0))
    damaged = bytearray(data)
    for offset, byte in enumerate(junk):
        if position + offset < len(damaged):
            damaged[position + offset] ^= byte or 0xFF
    return bytes(damaged)


# damage -> the file's bytes from an image's bytes, a position in 0..1 and a few drawn bytes
DAMAGE = {
    "intact": lambda data, at, junk: data,
    "truncated": lambda data, at, junk: data[:int(at * len(data))],
    "bytes flipped": _flipped,
    "header only": lambda data, at, junk: data[:16 + int(at * 48)],
    "trailing garbage": lambda data, at, junk: data + junk * 40,
    "zero bytes": lambda data, at, junk: b"",
    "random bytes": lambda data, at, junk: junk * (1 + int(at * 30)),
    "header claims 30000 x 30000": lambda data, at, junk: png_header_only(30_000, 30_000),
    "header claims 12000 x 8000": lambda data, at, junk: png_header_only(12_000, 8_000),
    "header claims 20000 x 4000": lambda data, at, junk: png_header_only(20_000, 4_000),
}
# Intact images are the most likely input, and the one that must succeed: weighted up.
DAMAGES = st.sampled_from(["intact"] * 4 + sorted(DAMAGE))
IMAGE_CASES = st.tuples(st.sampled_from(sorted(IMAGE_KINDS)), st.sampled_from(SIZES), DAMAGES, st.floats(0, 1),
                        st.binary(min_size=1, max_size=4), st.integers(0, 2 ** 16))


def write_case(folder, kind: str, size: tuple[int, int], damage: str, at: float, junk: bytes, seed: int):
    """The case's file in ``folder``, and the (width, height) of the image before any damage."""
    suffix, make = IMAGE_KINDS[kind]
    if suffix == ".webp":                # the format's own limit
        size = tuple(min(side, 16_383) for side in size)
    path = folder / f"fuzzed{suffix}"
    path.write_bytes(DAMAGE[damage](make(*size, seed), at, junk))
    return path, size


# ---- images of a COCO data set -------------------------------------------------------------------------------------

TASKS = {skip: make_task("inst/mask_rcnn", skip_bad_images=skip) for skip in (False, True)}


@pytest.mark.timeout(120)
@fuzz_settings(max_examples=90)
@given(IMAGE_CASES, st.booleans(), st.sampled_from([0, 0, 0, 1, -1]))
def test_images_of_a_coco_file_train_or_fail_clearly(tmp_path_factory, case, skip_bad_images, size_error):
    folder = tmp_path_factory.mktemp("coco_images", numbered=True)
    image_path, (width, height) = write_case(folder, *case)
    document = {
        "images": [{"id": 1, "file_name": image_path.name, "width": width + size_error, "height": height}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, min(width, 5), min(height, 5)]}],
    }
    json_path = folder / "instances.json"
    json_path.write_text(json.dumps(document))
    outcome = trains_or_fails_clearly(TASKS[skip_bad_images], json_path, json_path, image_path)
    if case[2] == "intact" and size_error == 0:       # every kind of intact image is one detseg reads
        assert outcome == "ok", case


# ---- inputs of `detseg predict` --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """An untrained det/faster_rcnn checkpoint (8 px wide, 64 px inputs): predictions are noise, and shaped right."""
    name = "det/faster_rcnn"
    entry = registry.get(name)
    config = resolve(entry.all_options(), {"width": 8, "image_size": 64})
    info = entry.make_task(config).placeholder_info(None)
    path = tmp_path_factory.mktemp("detector") / "model.pt"
    save_checkpoint(path, {"model_name": name, "config": config, "info": info,
                           "model": entry.build(config, info).state_dict()})
    return (path, *api.load(path))


def _check_prediction(entry: dict, image_path) -> None:
    with Image.open(image_path) as image:
        width, height = image.size
    assert entry["image"] == str(image_path)
    for box, score in zip(entry["boxes"], entry["scores"]):
        assert all(math.isfinite(v) for v in box) and 0 <= score <= 1
        assert -1e-3 <= box[0] <= box[2] <= width + 1e-2 and -1e-3 <= box[1] <= box[3] <= height + 1e-2, box


def _predict_named(model, payload, image_path, out, readable: bool) -> str:
    """A file given by name: predicted, or refused with one line naming it."""
    try:
        run = predict_paths(model, payload, [image_path], out=out, workers=0)
    except DetsegError as error:
        message = assert_clear(error, image_path)
        assert not readable, message
        return "refused: " + message.split(": ")[-1][:40]
    assert len(run.results) == 1
    _check_prediction(run.results[0], image_path)
    return "predicted"


def _predict_in_directory(model, payload, image_path, out, readable: bool) -> str:
    """A file turned up by a directory listing, beside a good one: a bad file is skipped, the good one predicted."""
    Image.new("RGB", (9, 6), (200, 10, 10)).save(image_path.parent / "good.png")
    run = predict_paths(model, payload, [image_path.parent], out=out, workers=0)
    assert len(run.results) + len(run.skipped) == 2 and len(run.skipped) <= (0 if readable else 1), run.skipped
    assert all(reason.startswith(str(image_path)) for reason in run.skipped), run.skipped
    for entry in run.results:
        _check_prediction(entry, entry["image"])
    return f"directory: {len(run.skipped)} skipped"


def _predict_by_cli(checkpoint, image_path, out, readable: bool) -> str:
    """The same through the command line: exit 2 and one line naming the file, or exit 0 and a prediction."""
    result = invoke_cli("predict", checkpoint, image_path, "--out", out, "--workers", 0, "--quiet")
    assert result.returncode == 0 if readable else result.returncode in (0, 2), result.stderr
    if result.returncode == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {image_path}"), result.stderr
    else:
        _check_prediction(json.loads((out / "predictions.json").read_text())[0], image_path)
    return f"cli exit {result.returncode}"


@pytest.mark.timeout(150)
@fuzz_settings(max_examples=90)
@given(IMAGE_CASES, st.sampled_from(["named", "named", "in a directory", "cli", "name too long"]))
def test_predict_on_any_image_file_predicts_or_fails_clearly(detector, tmp_path_factory, case, how):
    checkpoint, model, payload = detector
    folder = tmp_path_factory.mktemp("predict_inputs", numbered=True)
    image_path, _ = write_case(folder, *case)
    readable, out = case[2] == "intact", folder / "out"
    if how == "name too long":          # no such file can exist: the OS refuses to look the name up
        image_path, readable, how = folder / ("x" * 300 + image_path.suffix), False, "named"
    if how == "cli":
        event(_predict_by_cli(checkpoint, image_path, out, readable))
    elif how == "in a directory":
        event(_predict_in_directory(model, payload, image_path, out, readable))
    else:
        event(_predict_named(model, payload, image_path, out, readable))
