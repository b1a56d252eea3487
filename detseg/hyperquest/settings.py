"""What a HyperQuest server allows and starts from: the caps on every input, the defaults, the server settings.

The caps are documented here once and served to the page (``GET /api/limits``), so the form, the validation and the
instructions never disagree. They exist to keep one player's epoch from taking minutes on a shared CPU: the default
network (an MLP of two 256-unit layers) trains one epoch of 8,500 images in about a second, a capped one in ~10 s.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_write_bytes
from .access import read_roster

# ---- caps on what a player may ask for -------------------------------------------------------------------------
LR_MAX = 10.0                                  # learning rate: 0 < lr <= 10
BATCH_SIZE_RANGE = (8, 1024)
WEIGHT_DECAY_MAX = 0.1
MOMENTUM = 0.9                                 # SGD momentum is fixed: the lecture's knob is the learning rate
OPTIMIZERS = ("sgd", "adamw")
ARCHITECTURES = ("mlp", "convnet")             # convnet: image data sets only
MAX_WIDTH = {"mlp": 1024, "convnet": 128}      # units (mlp) / channels (convnet) of any hidden layer, grown or not
MAX_INITIAL_DEPTH = {"mlp": 6, "convnet": 4}   # hidden layers (mlp) / conv stages (convnet) at the start
MAX_BLOCKS = 10                                # hidden blocks after growing deeper
MAX_GROW_FACTOR = 4.0                          # widening multiplies a layer's width by a factor in (1, 4]

DEFAULT_NETWORK = {"arch": "mlp", "width": 256, "depth": 2}
DEFAULT_HPARAMS = {"lr": 0.05, "dropout": 0.0, "batch_size": 128, "weight_decay": 5e-4, "optimizer": "sgd"}


def limits() -> dict:
    """Every cap and default as plain JSON (served to the page, quoted in the instructions)."""
    return {
        "lr": {"min_exclusive": 0.0, "max": LR_MAX},
        "dropout": {"min": 0.0, "max_exclusive": 1.0},
        "batch_size": {"min": BATCH_SIZE_RANGE[0], "max": BATCH_SIZE_RANGE[1]},
        "weight_decay": {"min": 0.0, "max": WEIGHT_DECAY_MAX},
        "optimizers": list(OPTIMIZERS), "momentum": MOMENTUM,
        "architectures": list(ARCHITECTURES),
        "width": {"min": 1, "max": MAX_WIDTH}, "depth": {"min": 1, "max": MAX_INITIAL_DEPTH},
        "max_blocks": MAX_BLOCKS, "grow_factor": {"min_exclusive": 1.0, "max": MAX_GROW_FACTOR},
        "default_network": dict(DEFAULT_NETWORK), "default_hparams": dict(DEFAULT_HPARAMS),
    }


# ---- the server ------------------------------------------------------------------------------------------------
TINY_ENV = "DETSEG_HYPERQUEST_TINY"            # "1": data sets of a few hundred examples (tests, demos)
SECRET_ENV = "DETSEG_HYPERQUEST_SECRET"
ADMIN_TOKEN_ENV = "DETSEG_HYPERQUEST_ADMIN_TOKEN"


@dataclass
class Settings:
    """How one HyperQuest server runs. ``data_dir`` holds the two secrets (and the SQLite database); ``artifacts``
    (by default ``data_dir`` too) the cached data sets and checkpoints, which every worker must reach."""

    db_url: str
    data_dir: Path
    admin_token: str = ""
    admin_token_file: Path | None = None       # where the token was read from, when none was given
    secret_key: str = ""
    roster: Path | None = None                 # CSV of (player id, name): only these may log in
    roster_players: dict[str, str] | None = field(default=None, repr=False)   # read from ``roster`` by create()
    login_failures_per_player: int = 5         # failed logins per player ID per login_window_s, then 429
    login_failures_per_address: int = 20       # ... and per client address
    login_window_s: float = 60.0
    workers: int = 1                           # background processes that train epochs (this server's own)
    executor: str = "process"                  # "process" (the server) or "thread" (fast tests)
    artifacts: Path | None = None              # data sets and checkpoints: a directory every worker reaches
    queue: str = "auto"                        # "local" (in-process), "postgresql" (procrastinate), "auto": by db_url
    local_workers: bool = True                 # False: only `detseg hyperquest worker` processes train (PostgreSQL)
    epoch_limit: int = 20                      # a trial ends at this epoch; the baselines get the same budget
    dataset_pool: int = 20                     # trials draw from this many data sets, so leaderboards fill up
    pool_seed: int = 0                         # which pool (data set i is random_task(pool_seed * 10**6 + i))
    baseline_draws: int = 5                    # random-search baseline: best of this many hyperparameter draws
    train_range: tuple[int, int] = (5000, 10000)
    val_range: tuple[int, int] = (1000, 2000)
    extra: dict = field(default_factory=dict)

    @classmethod
    def create(cls, db_url: str | None = None, data_dir: str | Path | None = None, **overrides) -> "Settings":
        """Settings from arguments, then the environment, then defaults; makes ``data_dir``, resolves secrets.

        The default database is ``DATA_DIR/hyperquest.db`` (SQLite); ``postgresql://`` URLs work as well.
        ``DETSEG_HYPERQUEST_TINY=1`` shrinks the data sets to a few hundred examples. Without an admin token (argument
        or ``DETSEG_HYPERQUEST_ADMIN_TOKEN``) the one in ``DATA_DIR/admin.token`` is used, made on first start.
        A malformed ``roster`` file is a :class:`~detseg.errors.ConfigError` naming the file and line.
        """
        data_dir = Path(data_dir or "hyperquest").resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        db_url = db_url or f"sqlite:///{data_dir / 'hyperquest.db'}"
        if os.environ.get(TINY_ENV, "") not in ("", "0"):
            overrides.setdefault("train_range", (240, 320))
            overrides.setdefault("val_range", (80, 120))
        settings = cls(db_url=db_url, data_dir=data_dir, **overrides)
        settings.artifacts = Path(settings.artifacts or data_dir).resolve()
        settings.artifacts.mkdir(parents=True, exist_ok=True)
        if settings.queue not in ("auto", "local", "postgresql"):
            raise ValueError(f"queue must be 'auto', 'local' or 'postgresql', got {settings.queue!r}")
        settings.admin_token = settings.admin_token or os.environ.get(ADMIN_TOKEN_ENV, "")
        if not settings.admin_token:
            # A file, not the console: a token printed at start ends up in terminal scrollback and service logs.
            settings.admin_token_file = data_dir / "admin.token"
            settings.admin_token = _stored_secret(settings.admin_token_file, 24)
        settings.secret_key = settings.secret_key or os.environ.get(SECRET_ENV, "") or \
            _stored_secret(data_dir / "secret.key", 48)
        if settings.roster is not None:
            settings.roster = Path(settings.roster)
            settings.roster_players = read_roster(settings.roster)
        return settings


def _stored_secret(path: Path, nbytes: int) -> str:
    """A secret kept in the data directory (readable by the owner only), made on first start and reused after.

    Keeping the cookie secret across restarts means a restart does not log every player out; keeping the admin
    token means scripts that read it once keep working.
    """
    if path.is_file():
        text = path.read_text().strip()
        if len(text) >= 32:
            return text
    secret = secrets.token_urlsafe(nbytes)
    atomic_write_bytes(path, secret.encode(), mode=0o600)
    return secret
