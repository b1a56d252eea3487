"""The lecture's methods as plain ``nn.Module``s, one file per method (see DESIGN §1).

Every model module declares its knobs once, next to the model, as ``OPTIONS: dict[str, Option]`` (default, one-line
help, allowed values), derives ``DEFAULTS`` from it, and gives its model class a ``build(num_classes, **knobs)``
classmethod. The helpers below are what those modules share to check knobs the same way everywhere.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..config import Option, resolve


def defaults_of(options: Mapping[str, Option]) -> dict[str, Any]:
    """``{knob: default}`` of an ``OPTIONS`` table."""
    return {key: option.default for key, option in options.items()}


def check_knobs(options: Mapping[str, Option], **knobs: Any) -> dict[str, Any]:
    """Each knob parsed and range/choice-checked by its :class:`Option`; a bad value is a one-line ConfigError.

    Constructors call this so that a model built directly from Python gets the same clear errors as one built from
    a config file or the command line.
    """
    return resolve({key: options[key] for key in knobs}, knobs)


def build_with_options(model_class, options: Mapping[str, Option], num_classes: int, knobs: Mapping[str, Any]):
    """``model_class(num_classes, **knobs)`` after checking every knob against ``options`` (unknown keys included)."""
    return model_class(num_classes=num_classes, **resolve(options, knobs))
