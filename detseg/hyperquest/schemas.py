"""Request bodies, validated by pydantic: anything out of range is a 422 whose message says which field and why.

Unknown fields are rejected too (``extra="forbid"``): a misspelt ``learning_rate`` must not silently train with the
old value. Nor are types coerced (``strict``): ``"0.1"`` is not a number and ``1`` is not ``true``, so what the
OpenAPI schema says is what the server accepts (JSON Schema's rule that ``3.0`` is an integer included). The actions
on a trial are one tagged union on ``action``, so an unknown action is a 422 as well.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .settings import (BATCH_SIZE_RANGE, LR_MAX, MAX_GROW_FACTOR, MAX_INITIAL_DEPTH, MAX_WIDTH, OPTIMIZERS,
                       WEIGHT_DECAY_MAX)


# Row ids stay below 2**53, the integers JavaScript (the page) and a JSON schema's float bounds hold exactly. A larger
# number names no row, and past 2**63 would overflow SQLite's driver (a 500): it is refused as invalid input instead.
MAX_ROW_ID = 2 ** 53 - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _integral_numbers_are_integers(cls, data):
        """JSON has one number type, and JSON Schema counts 3.0 as the integer 3: take it as 3, as a strict int
        field would not. (A model validator, not a field type: that would leave the bounds out of the schema.)"""
        if not isinstance(data, dict):
            return data
        integers = {name for name, field in cls.model_fields.items() if field.annotation in (int, Optional[int])}
        return {key: int(value) if key in integers and isinstance(value, float) and value.is_integer() else value
                for key, value in data.items()}


class Login(Strict):
    """Taken as sent (the page trims what was typed), so that the schema's patterns are exactly what is accepted.

    A name is shown on the leaderboards: printable text without leading or trailing spaces. Control characters are
    refused as well because PostgreSQL cannot store a NUL in a text column.
    """

    player_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")]
    name: Annotated[str, StringConstraints(min_length=1, max_length=80,
                                           pattern=r"^[^\x00-\x20\x7f](?:[^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?$")]


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
    """Back to a point of the shown history: give exactly one of checkpoint_id and epoch, and leave the other out."""

    # Typed int, not int | None: null is refused, so "exactly one" is a plain oneOf of the schema. None is only the
    # default that stands for "not given".
    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["checkpoint_id"]}, {"required": ["epoch"]}]})
    action: Literal["revert"]
    checkpoint_id: int = Field(None, ge=1, le=MAX_ROW_ID)
    epoch: int = Field(None, ge=1, description="the latest checkpoint of this epoch in the shown history")

    @model_validator(mode="after")
    def _one_target(self) -> "RevertAction":
        if (self.checkpoint_id is None) == (self.epoch is None):
            raise ValueError("give exactly one of checkpoint_id and epoch")
        return self


class StopAction(Strict):
    action: Literal["stop"]


TrialAction = Annotated[Union[TrainAction, GrowAction, RevertAction, StopAction], Field(discriminator="action")]
