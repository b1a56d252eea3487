"""HyperQuest: the lecture's hyperparameter game, played in the browser on detseg's engine.

A player logs in, answers a short survey, and gets a random classification data set (images or vectors). They pick
a learning rate, a network size and dropout, then train one epoch at a time, watching the training and validation
curves; between epochs they may change hyperparameters, grow the network (Net2Net), revert to an earlier epoch, or
stop. The final validation accuracy goes on a leaderboard beside baselines the server computes for the same data.

Modules, in the order a request travels:

- :mod:`.settings`  limits, defaults and server settings (one place for every cap the API enforces)
- :mod:`.schemas`   the pydantic request bodies (out-of-range input -> 422 with a reason)
- :mod:`.app`       FastAPI routes, session cookie, admin export
- :mod:`.game`      the trial state machine; every action is logged
- :mod:`.worker`    the fair queue that hands epochs to background worker processes
- :mod:`.jobs`      what runs inside a worker: preparing a data set, one epoch, a baseline
- :mod:`.training`  models, checkpoints, Net2Net growth and train-accuracy tracking on top of the Trainer
- :mod:`.tasks`     the pool of random data sets and their on-disk cache
- :mod:`.baselines` majority class, logistic regression, default network, random search
- :mod:`.db`        SQLAlchemy 2 models (SQLite by default, PostgreSQL too)

The web stack (FastAPI, uvicorn, SQLAlchemy, plotly, itsdangerous, psycopg) is the optional extra
``detseg[hyperquest]``; :func:`require_web_extra` turns its absence into one clear error.
"""
from __future__ import annotations

import importlib

from ..errors import ConfigError
from .settings import Settings

__all__ = ["Settings", "create_app", "require_web_extra", "INSTALL_HINT"]

# What the server imports; psycopg is left out, it is only needed for a postgresql:// database URL.
WEB_MODULES = ("fastapi", "uvicorn", "sqlalchemy", "plotly", "itsdangerous")
INSTALL_HINT = "pip install 'detseg[hyperquest]'"


def require_web_extra(*also: str) -> None:
    """Raise a one-line :class:`ConfigError` naming the install command when the web extra is missing.

    ``also`` names further modules of the extra a caller needs (the load benchmark's HTTP client, httpx).
    """
    missing = []
    for name in (*WEB_MODULES, *also):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"HyperQuest needs the optional web extra (missing: {', '.join(missing)}); "
                          f"install it with: {INSTALL_HINT}")


def create_app(settings: Settings):
    """The FastAPI application (imported lazily so that ``detseg`` itself does not need FastAPI to start)."""
    from .app import create_app as _create_app

    return _create_app(settings)
