"""Run configuration: one flat dict per run, validated against the options the model and its task declare.

A run config is everything needed to rerun: the model name, every knob, every training hyperparameter and the data
arguments. It is saved as ``RUN_DIR/config.yaml`` and read back by ``--resume``, ``detseg eval`` and checkpoints;
the reading and writing is :mod:`detseg.io`'s, this module does no file I/O.
Overrides come from the command line as ``key=value`` strings and are parsed against the option's type, so a typo or
an out-of-range value is a :class:`ConfigError` that lists what is valid, never a surprise deep in training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import ConfigError


@dataclass(frozen=True)
class Option:
    """One configurable value: its default, what it means, and what values are allowed."""

    default: Any
    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    kind: type | None = None  # the value's type; inferred from the default when None
    # What a saved config written before this option existed meant (a new default that changes the weights' shapes
    # must not rebuild an older checkpoint differently); None: the default.
    before: Any = None

    @property
    def type(self) -> type:
        return self.kind or type(self.default)

    def parse(self, key: str, raw: Any) -> Any:
        """Turn ``raw`` (a string from the command line, or a YAML value) into a checked value of this option."""
        value = self._convert(key, raw)
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{key}={raw!s}: must be one of {', '.join(map(str, self.choices))}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key}={raw!s}: must be a finite number")
            if self.min is not None and value < self.min:
                raise ConfigError(f"{key}={raw!s}: must be >= {self.min}")
            if self.max is not None and value > self.max:
                raise ConfigError(f"{key}={raw!s}: must be <= {self.max}")
        return value

    def _convert(self, key: str, raw: Any) -> Any:
        kind = self.type
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}={raw!s}: must be true or false")
        if kind is int:
            if isinstance(raw, bool):
                raise ConfigError(f"{key}={raw!s}: must be an integer")
            if isinstance(raw, int):
                return raw
            try:
                as_float = float(str(raw))
            except ValueError:
                raise ConfigError(f"{key}={raw!s}: must be an integer") from None
            if not as_float.is_integer():
                raise ConfigError(f"{key}={raw!s}: must be an integer")
            return int(as_float)
        if kind is float:
            if isinstance(raw, bool):
                raise ConfigError(f"{key}={raw!s}: must be a number")
            try:
                return float(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"{key}={raw!s}: must be a number") from None
        return str(raw)


# Training hyperparameters every model shares. Models override defaults (e.g. a detector's lr) in their own options.
TRAIN_OPTIONS: dict[str, Option] = {
    "epochs": Option(10, "passes over the training set", min=0),
    "time_budget": Option(0.0, "stop after the step that crosses this many training seconds (0 = no budget)", min=0),
    "batch_size": Option(64, "images per optimisation step (per process under torchrun)", min=1),
    "optimizer": Option("adamw", "sgd (with momentum) or adamw", choices=("sgd", "adamw")),
    "lr": Option(1e-3, "peak learning rate", min=0),
    "momentum": Option(0.9, "SGD momentum", min=0, max=1),
    "weight_decay": Option(1e-4, "L2 penalty (decoupled for adamw)", min=0),
    "schedule": Option("cosine", "learning-rate schedule after warm-up", choices=("cosine", "step", "constant")),
    "warmup_epochs": Option(0.0, "linear warm-up length in epochs", min=0),
    "step_epochs": Option(3, "step schedule: decay every this many epochs", min=1),
    "gamma": Option(0.1, "step schedule: decay factor", min=0, max=1),
    "grad_clip": Option(0.0, "clip the gradient norm to this value (0 = off)", min=0),
    "eval_every": Option(1, "evaluate on the validation set every this many epochs", min=1),
    "checkpoint_seconds": Option(60.0, "also save last.pt mid-epoch at most this often (0 = epoch ends only)", min=0),
    "num_workers": Option(0, "data-loader worker processes", min=0, max=256),
    "seed": Option(0, "seed for initialisation, shuffling, dropout and augmentation", min=0, max=2**32 - 1),
    "data_seed": Option(0, "seed of the generated data set (scenes, vector tasks)", min=0, max=2**32 - 1),
    "device": Option("cpu", "cpu, cuda or auto", choices=("cpu", "cuda", "auto")),
    "threads": Option(0, "CPU threads of this process (0 = the machine's cores shared among its processes)",
                      min=0, max=1024),
}


def describe_options(options: Mapping[str, Option]) -> str:
    """One line per option: ``key=default  help [choices]`` (shown when a key is unknown)."""
    lines = []
    for key in sorted(options):
        opt = options[key]
        extra = f" [{'|'.join(map(str, opt.choices))}]" if opt.choices else ""
        lines.append(f"  {key}={opt.default}  {opt.help}{extra}")
    return "\n".join(lines)


def parse_overrides(pairs: Iterable[str]) -> dict[str, str]:
    """``["lr=0.1", "width=64"]`` -> ``{"lr": "0.1", "width": "64"}``; a pair without ``=`` is an error."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{pair}': expected key=value")
        result[key.strip()] = value.strip()
    return result


def resolve(options: Mapping[str, Option], overrides: Mapping[str, Any] | None = None,
            base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, then ``base`` (e.g. a saved config.yaml), then ``overrides``; every key and value checked. A key
    missing from a given ``base`` takes its option's ``before`` value where it has one: that config predates it."""
    config = {key: opt.default if base is None or key in base or opt.before is None else opt.before
              for key, opt in options.items()}
    for source in (base or {}), (overrides or {}):
        for key, raw in source.items():
            if key not in options:
                raise ConfigError(f"unknown config key '{key}'; valid keys are: {', '.join(sorted(options))}")
            config[key] = options[key].parse(key, raw)
    return config


def number_list(key: str, text: str | float | int, positive: bool = True) -> tuple[float, ...]:
    """A comma-separated list option (``anchor_scales=8,16,32``) as numbers; a clear ConfigError when malformed."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        items = [text]
    else:
        items = [item.strip() for item in str(text).split(",") if item.strip()]
    try:
        numbers = tuple(float(item) for item in items)
    except ValueError:
        raise ConfigError(f"{key}={text}: expected comma-separated numbers, e.g. 8,16,32") from None
    if not numbers or not all(math.isfinite(n) for n in numbers) or (positive and min(numbers) <= 0):
        raise ConfigError(f"{key}={text}: expected one or more {'positive ' if positive else ''}numbers")
    return numbers
