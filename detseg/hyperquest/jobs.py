"""What a worker process runs: generate a data set, train one epoch of a trial, compute a baseline.

Each job reads files and returns plain data: the server decides what the result means for the game and writes the
database. A job writes its checkpoint to a path the server chose before queueing it, so a job that finishes after
its server died leaves only an unreferenced file, never a half-recorded epoch.
"""
from __future__ import annotations

from ..growth import describe
from .tasks import load_dataset, prepare_dataset
from .training import build_network, make_trainer, restore, save_state, train_one_epoch

__all__ = ["prepare_dataset", "epoch_job"]


def epoch_job(dataset_path: str, source: str | None, target: str, network: dict, hparams: dict, seed: int) -> dict:
    """Train one epoch from checkpoint ``source`` (None: a fresh ``network``), save it to ``target``.

    Returns the epoch's metrics (see :func:`.training.train_one_epoch`), the architecture and the layer table.
    """
    data = load_dataset(dataset_path)
    if source is None:
        model = build_network(network, data.input_shape, data.num_classes, hparams["dropout"], seed)
        trainer = make_trainer(model, data, hparams, seed)
    else:
        trainer = restore(source, data, hparams, seed)
    result = train_one_epoch(trainer)
    result["architecture"] = save_state(target, trainer)
    result["layers"] = describe(trainer.model)
    return result
