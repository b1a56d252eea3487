"""Shared pieces of the HyperQuest tests: tiny settings, both databases, waiting for background work."""
from __future__ import annotations

import os
import time
import warnings

import pytest

from detseg.hyperquest import Settings
from detseg.hyperquest.db import Database

# A few hundred examples per data set: an epoch takes milliseconds, the whole game a few seconds.
TINY = {"train_range": (240, 320), "val_range": (80, 120)}
VECTOR_POOL, IMAGE_POOL = 0, 2        # pool seeds whose data set 0 is vectors (gaussians) / images (digits)
POSTGRES_ENV = "DETSEG_TEST_POSTGRES_URL"
BUSY = ("preparing", "queued", "running")

with warnings.catch_warnings():
    # Starlette's TestClient warns that it would rather use httpx2; the plain httpx it uses works.
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient  # noqa: F401  (re-exported for the tests)


def make_settings(data_dir, db_url: str | None = None, **overrides) -> Settings:
    options = {"executor": "thread", "epoch_limit": 4, "dataset_pool": 1, "pool_seed": VECTOR_POOL,
               "admin_token": "test-admin-token", **TINY, **overrides}
    return Settings.create(db_url, data_dir, **options)


def skip_unless_present(present: bool, reason: str):
    """A skip mark for a missing tool - except under CI (CI=true), where .ci/run installs it: there it must run."""
    return pytest.mark.skipif(not present and os.environ.get("CI") != "true", reason=reason)


def database_params() -> list:
    """SQLite always; PostgreSQL when DETSEG_TEST_POSTGRES_URL names one (.ci/run starts one and sets it)."""
    url = os.environ.get(POSTGRES_ENV, "")
    postgres = pytest.param(url, id="postgresql",
                            marks=skip_unless_present(bool(url), f"{POSTGRES_ENV} not set (no PostgreSQL here)"))
    return [pytest.param(None, id="sqlite"), postgres]


def reset_database(url: str | None) -> None:
    """PostgreSQL is one shared database: empty it before a test (SQLite files are fresh per test anyway)."""
    if url == "":
        pytest.fail(f"CI must run the PostgreSQL tests: .ci/run sets {POSTGRES_ENV}")
    if url:
        database = Database(url)
        database.drop_all()
        with database.engine.begin() as connection:      # and procrastinate's queue (reinstalled at start)
            connection.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        database.dispose()


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def wait_idle(client, trial_id: int, timeout: float = 60.0) -> dict:
    """Poll a trial through the API until no epoch / data set generation is pending."""
    def settled():
        view = client.get(f"/api/trials/{trial_id}").json()
        return view if view["state"] not in BUSY else None
    return wait_until(settled, timeout)


# Jobs for process-pool tests: defined here, in a module a spawned worker imports quickly (no torch).
def exit_abruptly() -> None:
    os._exit(3)


def square(value: int) -> int:
    return value * value


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
