"""Every model, found by its name (``task/method``), in one flat table.

A model registers itself beside its task with :func:`register`; the CLI and the API only ever call :func:`get`
and :func:`names`, which import the modules that register models on first use. A module that fails to import is
an error naming it - never a model that silently goes missing.
"""
from __future__ import annotations

import importlib
from typing import Callable

from .config import Option
from .errors import ConfigError
from .tasks.base import ModelEntry, Task

_MODELS: dict[str, ModelEntry] = {}

# Modules whose import registers models.
_MODEL_MODULES = (
    "detseg.tasks.classification",
    "detseg.tasks.segmentation",
    "detseg.tasks.localization",
    "detseg.tasks.detection",
    "detseg.tasks.instance",
    "detseg.tasks.captioning",
)
_loaded = False


def register(name: str, task: type[Task], description: str, options: dict[str, Option] | None = None):
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
    for module in _MODEL_MODULES:
        try:
            importlib.import_module(module)
        except Exception as err:
            raise ImportError(f"registering models: importing {module} failed "
                              f"({type(err).__name__}: {err})") from err
    _loaded = True


def names() -> list[str]:
    _load_all()
    return sorted(_MODELS)


def get(name: str) -> ModelEntry:
    _load_all()
    if name not in _MODELS:
        raise ConfigError(f"unknown model '{name}'; available: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]
