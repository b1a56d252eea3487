"""Request bodies, validated by pydantic: anything out of range is a 422 whose message says which field and why.

Unknown fields are rejected too (``extra="forbid"``): a misspelt ``learning_rate`` must not silently train with the
old value. The actions on a trial are one tagged union on ``action``, so an unknown action is a 422 as well.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .settings import (BATCH_SIZE_RANGE, LR_MAX, MAX_GROW_FACTOR, MAX_INITIAL_DEPTH, MAX_WIDTH, OPTIMIZERS,
                       WEIGHT_DECAY_MAX)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Login(Strict):
    player_id: Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9_.@-]{1,64}$")]
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=80)]


class Survey(Strict):
    """Deep-learning experience, asked once before the first trial (stored for the research export)."""

    experience: Literal["none", "beginner", "intermediate", "advanced"]
    courses: int = Field(0, ge=0, le=50, description="machine-learning courses taken")
    frameworks: list[Literal["pytorch", "tensorflow", "jax", "keras", "other"]] = Field(default_factory=list,
                                                                                       max_length=5)
    trained_before: bool = Field(False, description="has trained a neural network before")
    comments: Annotated[str, StringConstraints(max_length=1000)] = ""


class Network(Strict):
    """The initial network: an MLP (any data) or a small convnet (images), ``depth`` hidden layers / stages."""

    arch: Literal["mlp", "convnet"] = "mlp"
    width: int = Field(ge=1, le=max(MAX_WIDTH.values()))
    depth: int = Field(ge=1, le=max(MAX_INITIAL_DEPTH.values()))

    @model_validator(mode="after")
    def _within_caps(self) -> "Network":
        if self.width > MAX_WIDTH[self.arch]:
            raise ValueError(f"width {self.width} exceeds the {self.arch} cap of {MAX_WIDTH[self.arch]}")
        if self.depth > MAX_INITIAL_DEPTH[self.arch]:
            raise ValueError(f"depth {self.depth} exceeds the {self.arch} cap of {MAX_INITIAL_DEPTH[self.arch]}")
        return self


class HParams(Strict):
    """Hyperparameters for the next epoch; fields left out keep their current value."""

    lr: float | None = Field(None, gt=0, le=LR_MAX, description="learning rate, > 0")
    dropout: float | None = Field(None, ge=0, lt=1, description="dropout probability, < 1")
    batch_size: int | None = Field(None, ge=BATCH_SIZE_RANGE[0], le=BATCH_SIZE_RANGE[1])
    weight_decay: float | None = Field(None, ge=0, le=WEIGHT_DECAY_MAX)
    optimizer: Literal[OPTIMIZERS] | None = None

    def changes(self) -> dict:
        return self.model_dump(exclude_none=True)


class TrainAction(Strict):
    action: Literal["train"]
    hparams: HParams = Field(default_factory=HParams)
    network: Network | None = Field(None, description="only before the first epoch; later the network grows")


class GrowAction(Strict):
    action: Literal["grow"]
    how: Literal["wider", "deeper"]
    layer: int = Field(ge=0, description="wider: the layer to widen; deeper: the new layer goes after this one")
    factor: float = Field(2.0, gt=1, le=MAX_GROW_FACTOR, description="wider: width multiplier")


class RevertAction(Strict):
    action: Literal["revert"]
    checkpoint_id: int | None = Field(None, ge=1)
    epoch: int | None = Field(None, ge=1, description="the latest checkpoint of this epoch in the shown history")

    @model_validator(mode="after")
    def _one_target(self) -> "RevertAction":
        if (self.checkpoint_id is None) == (self.epoch is None):
            raise ValueError("give exactly one of checkpoint_id and epoch")
        return self


class StopAction(Strict):
    action: Literal["stop"]


TrialAction = Annotated[Union[TrainAction, GrowAction, RevertAction, StopAction], Field(discriminator="action")]
