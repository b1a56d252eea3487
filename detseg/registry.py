"""Every model, found by its name (``task/method``), in one flat table.

A model registers itself next to its definition with :func:`register`; the CLI and the API only ever call
:func:`get` and :func:`names`. Importing :mod:`detseg.registry` imports the modules that register models.
"""
from __future__ import annotations

import importlib
from typing import Callable

from .config import Option
from .errors import ConfigError
from .tasks.base import ModelEntry, Task

_MODELS: dict[str, ModelEntry] = {}

# Modules whose import registers models. A module listed here that does not exist yet is simply skipped, so that
# the table grows as methods land without a central edit elsewhere.
_MODEL_MODULES = (
    "detseg.tasks.classification",
    "detseg.tasks.segmentation",
    "detseg.tasks.localization",
    "detseg.tasks.detection",
)
_loaded = False


def register(name: str, task: Task, description: str, options: dict[str, Option] | None = None):
    """Decorator for a builder ``(config, info) -> nn.Module``."""

    def decorate(build: Callable):
        if name in _MODELS:
            raise RuntimeError(f"model {name} registered twice")
        _MODELS[name] = ModelEntry(name, task, description, build, dict(options or {}))
        return build

    return decorate


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _MODEL_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real missing dependency inside an existing module: surface it
                raise


def names() -> list[str]:
    _load_all()
    return sorted(_MODELS)


def get(name: str) -> ModelEntry:
    _load_all()
    if name not in _MODELS:
        raise ConfigError(f"unknown model '{name}'; available: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]
