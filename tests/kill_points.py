"""``python -m tests.kill_points POINT N -- TRAIN_ARGS...``: run ``detseg train`` and SIGKILL it at a chosen moment.

A kill at a wall-clock time lands wherever the process happens to be; these land exactly where a test wants one,
so that every kind of interruption is exercised on every run of the suite:

- ``step N``              right after the N-th optimiser step, before the trainer has counted it or saved anything;
- ``write:NAME N``        during the N-th atomic write of the run file NAME (``last.pt``, ``metrics.json``): the
                          temporary file is half written (as a kill mid-``write()`` leaves it) and never renamed;
- ``eval N``              inside the N-th evaluation, after its first validation batch has been scored.

The process dies by its own SIGKILL: no ``finally``, no atexit, no flush of anything - as under ``kill -9``.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_step(n: int) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = {"count": 0}

    def after_step(_optimizer, _args, _kwargs) -> None:
        steps["count"] += 1
        if steps["count"] == n:
            die()

    register_optimizer_step_post_hook(after_step)


def kill_during_write(name: str, n: int) -> None:
    # detseg.io's atomic write is: write a temporary file, fsync, os.replace onto the target. Dying just before the
    # rename with the temporary file cut in half is the worst a kill mid-write can leave on disk.
    replace, writes = os.replace, {"count": 0}

    def dying_replace(source, target, *args, **kwargs):
        if Path(target).name == name:
            writes["count"] += 1
            if writes["count"] == n:
                size = os.path.getsize(source)
                os.truncate(source, size // 2)
                die()
        return replace(source, target, *args, **kwargs)

    os.replace = dying_replace


def kill_during_evaluation(n: int) -> None:
    from detseg.engine.trainer import Trainer

    evaluate, calls = Trainer.evaluate, {"count": 0}

    def dying_evaluate(self, model=None, scorer=None):
        calls["count"] += 1
        if calls["count"] == n:
            scorer = scorer or self.task.scorer(self.bundle)
            update = scorer.update

            def update_then_die(*args, **kwargs):
                update(*args, **kwargs)
                die()

            scorer.update = update_then_die
        return evaluate(self, model, scorer)

    Trainer.evaluate = dying_evaluate


def main(argv: list[str]) -> None:
    point, count, separator, *train_args = argv
    assert separator == "--", "usage: python -m tests.kill_points POINT N -- TRAIN_ARGS..."
    n = int(count)
    if point == "step":
        kill_after_step(n)
    elif point.startswith("write:"):
        kill_during_write(point.split(":", 1)[1], n)
    elif point == "eval":
        kill_during_evaluation(n)
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    from detseg.cli import main as detseg

    sys.argv = ["detseg", "train", *train_args]
    detseg()


if __name__ == "__main__":
    main(sys.argv[1:])
