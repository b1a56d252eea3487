"""Checkpoints: written atomically, read back with one clear error when the file is not what we expect.

A checkpoint is a plain dict saved with ``torch.save``. It carries the model name, the run config and the data info
next to the weights, so ``detseg eval`` and ``detseg predict`` can rebuild the model from the file alone. Another
run can start from its weights (``detseg train MODEL --init CHECKPOINT``: :func:`load_matching`).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import resolve
from ..errors import ConfigError
from ..io import atomic_write_bytes

FORMAT = "detseg-checkpoint-v2"   # v2: models own their preprocessing (the model contract)


def save_checkpoint(path: Path | str, payload: dict[str, Any]) -> None:
    """Serialise to memory first, then write-and-rename: a crash mid-save leaves the previous file intact."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise ConfigError(f"{path}: directory holds no best.pt or last.pt")
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        # weights_only=False: our checkpoints hold plain Python containers (config, history, RNG states) as well.
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:   # noqa: BLE001 - a truncated or foreign file fails in any of pickle's many ways
        raise ConfigError(f"{path}: not a readable detseg checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a detseg checkpoint (missing format '{FORMAT}')")
    return payload


# ---- what a checkpoint holds, checked before a model is built from it -------------------------------------------


def checked_payload(path, payload: dict) -> dict:
    """A checkpoint's fields checked before a model is built from them: a known model name, a config whose every
    known knob is valid (knobs added since it was written take their defaults; ones since removed are ignored), an
    info mapping and a state dict; anything else is a ConfigError naming the file and the field."""
    name = payload.get("model_name")
    if not isinstance(name, str):
        raise ConfigError(f"{path}: field 'model_name' is missing or not a name (got {name!r:.60})")
    from .. import registry      # the registry imports every model; checkpoints are read by some of them

    try:
        entry = registry.get(name)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    for field in ("config", "info", "model"):
        if not isinstance(payload.get(field), Mapping):
            raise ConfigError(f"{path}: field '{field}' is missing or not a mapping")
    check_info(path, payload["info"])
    options = entry.all_options()
    try:
        config = resolve(options, base={key: value for key, value in payload["config"].items() if key in options})
    except ConfigError as error:
        raise ConfigError(f"{path}: field 'config': {error}") from None
    return {**payload, "config": config}


def check_info(path, info: Mapping[str, Any]) -> None:
    """The data description every model is built from: class count and names, input size and shape, the joints'
    class and count, normalisation statistics - present ones of the right type and range."""
    def fail(field: str, value, expected: str):
        raise ConfigError(f"{path}: field 'info.{field}': expected {expected} (got {value!r:.60})")

    def positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1_000_000

    if "num_classes" in info and not positive_int(info["num_classes"]):
        fail("num_classes", info["num_classes"], "a positive integer")
    joints = info.get("num_keypoints", 0)
    if joints != 0 and not positive_int(joints):     # 0: a model without a keypoint head
        fail("num_keypoints", joints, "a count of joints")
    person = info.get("keypoint_class")
    if person is not None and not (isinstance(person, int) and not isinstance(person, bool)    # 0: no joints
                                   and 0 <= person < info.get("num_classes", 1_000_001)):
        fail("keypoint_class", info["keypoint_class"], "a class index")
    names = info.get("class_names", [])
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names) or (
            "num_classes" in info and len(names) not in (0, info["num_classes"])):
        fail("class_names", names, "a list of num_classes names")
    size = info.get("image_size", 1)
    if not (positive_int(size) or (isinstance(size, (list, tuple)) and len(size) == 2
                                   and all(positive_int(side) for side in size))):
        fail("image_size", size, "a positive side or [width, height]")
    shape = info.get("input_shape", [1])
    if not isinstance(shape, (list, tuple)) or not shape or not all(positive_int(side) for side in shape):
        fail("input_shape", shape, "a list of positive sizes")
    statistics = info.get("normalization", {"mean": [0.0], "std": [1.0]})
    if not isinstance(statistics, Mapping) or not all(
            isinstance(statistics.get(key), (list, tuple)) and statistics[key]
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in statistics[key]) for key in ("mean", "std")
    ) or min(statistics["std"]) <= 0:
        fail("normalization", statistics, "finite mean and positive std lists")


# ---- fine-tuning: start a run from another run's weights -------------------------------------------------------


@dataclass
class InitReport:
    """What :func:`load_matching` did: which tensors came from the checkpoint and which kept their fresh values."""

    origin: str
    loaded: list[str] = field(default_factory=list)
    # (name, checkpoint shape, model shape): e.g. the class layers when the class count differs
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # the model's, absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)   # the checkpoint's, absent from the model

    @property
    def skipped(self) -> list[str]:
        """Every tensor of the model that keeps its fresh initialisation."""
        return [name for name, _, _ in self.mismatched] + self.missing

    def summary(self, most: int = 8) -> str:
        def names(items: list[str]) -> str:
            return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")

        lines = [f"init from {self.origin}: loaded {len(self.loaded)} tensors, "
                 f"{len(self.skipped)} of the model's keep their fresh initialisation"]
        if self.mismatched:
            lines.append("  skipped, shape differs: " + names(
                [f"{name} {list(theirs)} -> {list(ours)}" for name, theirs, ours in self.mismatched]))
        if self.missing:
            lines.append("  skipped, not in the checkpoint: " + names(self.missing))
        if self.unexpected:
            lines.append("  ignored, not in this model: " + names(self.unexpected))
        return "\n".join(lines)


def load_matching(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                  origin: str = "checkpoint") -> InitReport:
    """Copy into ``model`` every tensor of ``state_dict`` (parameters and buffers, preprocessing statistics
    included) whose name and shape match one of the model's; the others keep their fresh initialisation.

    Matching by name is what makes a different class count work: only the layers whose shape depends on it (the
    classifier, the box regressor of a per-class head) differ, so exactly those start afresh. It also carries a
    backbone across methods that name it the same (``det/faster_rcnn`` into ``det/rfcn``). Nothing matching at all
    is almost certainly the wrong file, hence a ConfigError rather than a silent fresh start.
    """
    own = model.state_dict()
    report = InitReport(origin)
    matching = {}
    for name, tensor in state_dict.items():
        if name not in own:
            report.unexpected.append(name)
        elif tuple(tensor.shape) != tuple(own[name].shape):
            report.mismatched.append((name, tuple(tensor.shape), tuple(own[name].shape)))
        else:
            matching[name] = tensor
            report.loaded.append(name)
    report.missing = [name for name in own if name not in state_dict]
    if not matching:
        raise ConfigError(f"--init {origin}: no tensor of the checkpoint matches this model by name and shape")
    model.load_state_dict(matching, strict=False)
    return report
