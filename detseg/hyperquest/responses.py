"""What the API answers: a pydantic model of every response body, so that ``/openapi.json`` tells the truth.

The routes declare these as their ``response_model``, and FastAPI checks each answer against its model before it
leaves the server: a view in :mod:`.views` that drops or retypes a declared field fails loudly in the tests (which
also hold every endpoint to the published schema, tests/test_hyperquest_schema.py) instead of quietly breaking the
page or a research script; a key a view adds is only sent once its model declares it. Parts whose keys belong to
other modules - a data set's statistics (detseg.data), an architecture or a layer list (detseg.growth), an export
row (the database columns) - stay open dicts.

Refusals have one shape, ``{"detail": "why"}``; a 422 is either that (a request that is well-formed but impossible
for this trial) or pydantic's list of field errors (a request that is not well-formed).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .schemas import Network

TrialState = Literal["preparing", "ready", "queued", "running", "diverged", "finished", "failed"]
DatasetState = Literal["new", "preparing", "ready", "failed"]


class Message(BaseModel):
    detail: str = Field(description="why the request was refused, in words")


class FieldError(BaseModel):
    """One entry of pydantic's validation report (extra keys such as ``input`` and ``ctx`` vary by error)."""

    model_config = ConfigDict(extra="allow")
    loc: list[str | int]
    msg: str
    type: str


class InvalidRequest(BaseModel):
    detail: list[FieldError] | str = Field(
        description="the fields that failed validation, or why the request is impossible for this trial")


class Done(BaseModel):
    ok: bool


class PlayerView(BaseModel):
    id: int
    player_id: str
    name: str
    survey_done: bool
    trials: list[int]
    active_trial: int | None = Field(description="the newest trial that is not finished")


class HParamValues(BaseModel):
    """The hyperparameters a trial trains its next epoch with (every one set; see ``GET /api/limits``)."""

    lr: float
    dropout: float
    batch_size: int
    weight_decay: float
    optimizer: str


class Limits(BaseModel):
    """Caps and defaults of every input; ``min``/``max`` bounds are inclusive, ``*_exclusive`` ones are not."""

    lr: dict[str, float]
    dropout: dict[str, float]
    batch_size: dict[str, int]
    weight_decay: dict[str, float]
    optimizers: list[str]
    momentum: float
    architectures: list[str]
    width: dict[str, int | dict[str, int]] = Field(description="max: the cap per architecture")
    depth: dict[str, int | dict[str, int]] = Field(description="max: the initial cap per architecture")
    max_blocks: int
    grow_factor: dict[str, float]
    default_network: Network
    default_hparams: HParamValues
    epoch_limit: int
    baseline_draws: int


class DatasetView(BaseModel):
    id: int
    pool_index: int
    state: DatasetState
    name: str
    summary: dict[str, Any] | None = Field(description="sizes, classes, input shape; null while generating")


class EpochRow(BaseModel):
    epoch: int
    checkpoint_id: int
    seconds: float | None
    hparams: HParamValues
    train_loss: float | None = Field(description="null when not a finite number (a diverged epoch)")
    train_acc: float | None
    val_loss: float | None
    val_acc: float | None
    diverged: bool


class CheckpointRow(BaseModel):
    id: int
    epoch: int
    kind: Literal["epoch", "grow"]
    note: str
    val_acc: float | None
    diverged: bool
    current: bool


class Baselines(BaseModel):
    """A data set's baselines; each null until the server has computed it."""

    majority: float | None
    logistic_regression: float | None
    default_network: float | None
    random_search: float | None
    random_search_draws_done: int
    random_search_draws: int


class FinalScore(BaseModel):
    val_acc: float | None
    diverged: bool
    reason: str | None
    skill: float | None = Field(description="0 = the majority class, 1 = perfect")


class TrialView(BaseModel):
    id: int
    state: TrialState
    epoch: int
    epoch_limit: int
    epochs_trained: int
    hparams: HParamValues
    network: Network | None
    queue_ahead: int | None = Field(description="players whose epoch runs before this one (while queued)")
    last_error: str | None
    dataset: DatasetView
    history: list[EpochRow]
    checkpoints: list[CheckpointRow]
    architecture: dict[str, Any] | None
    layers: list[dict[str, Any]] | None
    final: FinalScore | None
    baselines: Baselines | None


class TrialSummary(BaseModel):
    id: int
    state: TrialState
    epoch: int
    final_val_acc: float | None


class LeaderboardEntry(BaseModel):
    trial_id: int
    player: str = Field(description="the player's name (never their player ID)")
    dataset_id: int
    pool_index: int
    dataset: str
    val_acc: float | None
    skill: float | None
    diverged: bool
    epochs: int
    finished_at: str | None = Field(description="ISO 8601 time with its UTC offset")


class DatasetBoard(DatasetView):
    entries: list[LeaderboardEntry]
    baselines: Baselines


class Leaderboard(BaseModel):
    overall: list[LeaderboardEntry] = Field(description="ranked by skill, so that data sets compare")
    datasets: list[DatasetBoard]


class QueueStats(BaseModel):
    running: int
    waiting: int
    workers: int
    completed: int
    failed: int


ExportTables = dict[str, list[dict[str, Any]]]
