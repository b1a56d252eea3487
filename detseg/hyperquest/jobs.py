"""What a worker process runs: generate a data set, train one epoch (of a trial or a baseline), grow a network.

Each job reads files and returns plain data; what the result means for the game is recorded by :mod:`.outcomes`.
A job writes its checkpoint (completely, then renamed into place) to a path chosen before it was queued, so a job
that dies, or finishes after its server died, leaves at most an unreferenced file, never a half-recorded epoch; and
a retried job writes the same file again.

A queued piece of work is a plain JSON object, the same for the in-process queue and the PostgreSQL one::

    {"kind": "prepare" | "epoch" | "baseline", "lane": "player:7", "args": {...}}

with file paths relative to the artifact store, which every worker reaches under its own root (:func:`run`).

This module is what the server refers to when it queues work, so it imports torch only inside the jobs: the web
server itself starts without loading torch (a background thread warms the imports up after start-up).
"""
from __future__ import annotations

from pathlib import Path


def prepare_dataset(spec: dict, path: str) -> dict:
    """Generate (or find) the data set of ``spec`` at ``path``; its summary (see :func:`.tasks.prepare_dataset`)."""
    from .tasks import prepare_dataset as prepare

    return prepare(spec, path)


def epoch_job(dataset_path: str, source: str | None, target: str, network: dict, hparams: dict, seed: int) -> dict:
    """Train one epoch from checkpoint ``source`` (None: a fresh ``network``), save it to ``target``.

    Returns the epoch's metrics (see :func:`.training.train_one_epoch`), the architecture and the layer table.
    """
    from ..growth import describe
    from .tasks import load_dataset
    from .training import build_network, make_trainer, restore, save_state, train_one_epoch

    data = load_dataset(dataset_path)
    if source is None:
        model = build_network(network, data.input_shape, data.num_classes, hparams["dropout"], seed)
        trainer = make_trainer(model, data, hparams, seed)
    else:
        trainer = restore(source, data, hparams, seed)
    result = train_one_epoch(trainer)
    result["architecture"] = save_state(target, trainer)
    result["layers"] = describe(trainer.model.network)
    return result


def grow_job(source: str, target: str, how: str, layer: int, factor: float, hparams: dict, seed: int) -> dict:
    """Net2Net on checkpoint ``source`` into ``target`` (see :func:`.training.grow_checkpoint`). Milliseconds: the
    server runs it in the request's thread. A request the network cannot take raises ``ValueError``."""
    from .training import grow_checkpoint

    return grow_checkpoint(source, target, how, layer, factor, hparams, seed)


def run(work: dict, artifacts: str) -> dict:
    """Do the computing part of ``work`` with its files under ``artifacts``; what it returns is recorded after."""
    args, root = work["args"], Path(artifacts)
    if work["kind"] == "prepare":
        return prepare_dataset(args["spec"], str(root / args["path"]))
    if work["kind"] in ("epoch", "baseline"):
        source = str(root / args["source"]) if args["source"] else None
        return epoch_job(str(root / args["dataset_path"]), source, str(root / args["target"]), args["network"],
                         args["hparams"], args["seed"])
    raise ValueError(f"unknown kind of work {work['kind']!r}")


def warm_up() -> None:
    """Import what the jobs need, so that the first one does not wait for it."""
    from . import tasks, training  # noqa: F401
    from ..data import classification  # noqa: F401
