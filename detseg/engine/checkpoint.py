"""Checkpoints: written atomically, read back with one clear error when the file is not what we expect.

A checkpoint is a plain dict saved with ``torch.save``. It carries the model name, the run config and the data info
next to the weights, so ``detseg eval`` and ``detseg predict`` can rebuild the model from the file alone. Another
run can start from its weights (``detseg train MODEL --init CHECKPOINT``: :func:`load_matching`).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

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
