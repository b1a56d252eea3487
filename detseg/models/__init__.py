"""The lecture's methods as plain ``nn.Module``s, one file per method, all behind one contract.

The model contract (every model of every task; :class:`detseg.models.base.DetsegModel` is it in code):

1. **A model owns its whole forward path**, as torchvision's ``GeneralizedRCNN`` does. Its input is a list of
   ``(3, H_i, W_i)`` images of any sizes - uint8 (0-255) or float in [0, 1] - or an ``(N, 3, H, W)`` batch, which
   means the same; vector classifiers take ``(D,)`` vectors. Preprocessing (to float, resize to the model's input
   size, normalisation) is its first stage (:class:`detseg.models.base.ImageTransform`), with the statistics kept as
   buffers, so they are saved in the checkpoint with the weights.
2. **The switch is ``self.training``**, never "were targets given":

   * ``model.train(); model(images, targets)`` returns a dict of named scalar losses; the engine minimises their
     sum. ``targets`` is one dict per image with torchvision's keys where they exist: ``boxes`` (G, 4) XYXY pixels,
     ``labels``, ``iscrowd``, ``masks``, ``keypoints`` (G, J, 3); dense tasks add ``semantic`` (H, W).
   * ``model.eval(); model(images)`` returns one dict per image, **in that image's own pixels**: detectors
     ``boxes`` (D, 4) XYXY, ``scores`` (D,), ``labels`` (D,); localization the same with one box; pose
     ``keypoints`` (1, 14, 3); segmentation ``scores`` (C, H, W) and ``labels`` (H, W); classification
     ``logits`` (K,), ``probabilities`` (K,), ``labels`` and ``scores`` (0-d).
   * ``model.training_losses(images, targets)`` is the training-mode half on its own. The engine calls it with the
     model in eval mode to measure ``val_loss`` (batch norm on running statistics, dropout off, nothing updated):
     one extra pass, timed apart from the prediction pass that ``infer_ms_per_image`` measures.
3. **Losses live in the model.** A task (:mod:`detseg.tasks`) loads data, calls the model and scores what comes
   out; it never normalises, flips or computes a loss. Models never import from ``detseg.tasks``.
4. **Shared pieces live below the methods that share them**: :mod:`.base` (the contract, preprocessing),
   :mod:`.backbones`, ``detection/generalized.py`` and ``detection/heads.py``; no lecture method imports a later one.

Every model module declares its knobs once, next to the model, as ``OPTIONS: dict[str, Option]`` (default, one-line
help, allowed values), and gives its model class a ``build(num_classes, **knobs)`` classmethod. The helpers below
are what those modules share to check knobs the same way everywhere.
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


def build_with_options(model_class, options: Mapping[str, Option], num_classes: int, knobs: Mapping[str, Any],
                       **fixed: Any):
    """``model_class(num_classes, **knobs, **fixed)`` after checking every knob against ``options`` (unknown keys
    included); ``fixed`` are arguments that come from the data, not from knobs (the input size, say)."""
    return model_class(num_classes=num_classes, **resolve(options, knobs), **fixed)
