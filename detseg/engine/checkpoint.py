"""Checkpoints: written atomically, read back with one clear error when the file is not what we expect.

A checkpoint is a plain dict saved with ``torch.save``. It carries the model name, the run config and the data info
next to the weights, so ``detseg eval`` and ``detseg predict`` can rebuild the model from the file alone.
"""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

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
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, AttributeError,
            ModuleNotFoundError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a readable detseg checkpoint ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a detseg checkpoint (missing format '{FORMAT}')")
    return payload
