"""Shared pieces of the fuzz tests (tests/test_fuzz_data.py, tests/test_fuzz_images.py).

Every fuzz case ends in one of two outcomes, and :func:`trains_or_fails_clearly` / :func:`assert_clear` tell them
apart: the input is refused with a one-line :class:`~detseg.errors.DetsegError` that starts with the offending
file's path, or it is accepted and then every sample reaches the training targets a run feeds its model. Any other
exception is a bug of detseg and fails the test with its traceback (hypothesis shrinks it to the smallest input).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, settings

from detseg import registry
from detseg.config import resolve
from detseg.errors import DataError, DetsegError


def fuzz_settings(max_examples: int) -> settings:
    """Deterministic (the same cases on every machine and run: CI cannot flake) and with no per-case deadline:
    the shared CI cores make timings noisy, so hangs are caught by ``pytest.mark.timeout`` on each test instead.
    Data are drawn from module-scoped fixtures' directories, which is safe because each case rewrites the files it
    reads; ``too_slow`` is off because the strategies build whole documents."""
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# What `detseg train MODEL --data FILE --val FILE` builds before its first step: the task's data bundle. Small
# inputs (32 px) keep a case cheap; the geometric augmentations are on, so crops and flips see every fuzzed target.
def make_task(model_name: str, **overrides):
    entry = registry.get(model_name)
    knobs = {"image_size": 32, "loading": "stream", "skip_bad_images": False, "hflip": True,
             "scale_jitter": "0.5,1.5", "random_crop": 0.5, **overrides}
    return entry.make_task(resolve(entry.all_options(), knobs))


def assert_clear(error: DetsegError, *allowed: Path) -> str:
    """``error`` is one line naming one of the ``allowed`` paths (a file, or a directory holding it): a DataError
    starts with it, as its format has it; a ConfigError names it after the flag it came with (``--val PATH: ...``)."""
    message = str(error)
    assert "\n" not in message, message
    named = message.startswith if isinstance(error, DataError) else message.__contains__
    assert any(named(str(path)) for path in allowed), (message, allowed)
    return message


def check_training_item(item, num_classes: int) -> None:
    """One training sample as the engine receives it: a uint8 (3, H, W) image and a target whose rows agree."""
    image, target = item
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3, image.shape
    boxes = target["boxes"]
    count = len(boxes)
    assert boxes.shape == (count, 4) and torch.isfinite(boxes).all(), boxes
    assert (boxes[:, 2:] >= boxes[:, :2]).all(), boxes
    labels = target["labels"]
    assert labels.shape == (count,) and ((labels >= 1) & (labels < num_classes)).all(), labels
    assert target["iscrowd"].shape == (count,)
    if "masks" in target:
        assert target["masks"].shape == (count, *image.shape[-2:]), target["masks"].shape
        assert target["masks"].max() <= 1 if count else True, "masks hold 0 and 1 only"
    if "keypoints" in target:
        joints = target["keypoints"]
        assert joints.shape[0] == count and joints.shape[-1] == 3 and torch.isfinite(joints).all(), joints


def trains_or_fails_clearly(task, data: Path, *allowed: Path) -> str:
    """Open ``data`` as a run's training and validation split and read every sample of both; ``"ok"``, or
    ``"refused"`` after :func:`assert_clear` on the DetsegError raised."""
    try:
        bundle = task.make_data(str(data), str(data))
        num_classes = bundle.info["num_classes"]
        for dataset in (bundle.train, bundle.val):
            for index in range(len(dataset)):
                item = dataset[index]
                if item is None:                       # skip_bad_images=true: reported, counted, left out
                    assert dataset.skipped >= 1
                    continue
                check_training_item(item, num_classes)
    except DetsegError as error:
        message = assert_clear(error, *allowed)
        event("refused: " + message.split(": ")[-1][:40])     # --hypothesis-show-statistics: what was hit
        return "refused"
    event("trained")
    return "ok"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose (CRC-correct) header declares ``width`` x ``height`` RGB, followed by a few rows of data only:
    what a decompression bomb, or a file cut off after its header, looks like to a reader."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))
