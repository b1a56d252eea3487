"""Nothing lost: kill -9 at four exact points then --resume reaches the uninterrupted run's metrics; a bad last.pt or
run directory is one clear line; a write that fails midway (a full disk) leaves the previous file intact."""
from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys

import pytest
import detseg.io
from detseg import api
from detseg.bench.resume import comparable, damaged_files, temporaries
from detseg.engine.checkpoint import load_checkpoint, save_checkpoint
from detseg.errors import ConfigError, WriteError

from .conftest import ROOT

# 600 examples in batches of 32: 19 steps an epoch, 7 validation batches; epoch-end checkpoints only, so every
# kill below has one possible on-disk state and the test one possible outcome.
ARGS = ["cls/mlp", "--data", "gaussians", "train_size=600", "val_size=200", "width=32", "batch_size=32",
        "checkpoint_seconds=0", "--epochs", "3", "--seed", "11", "--quiet"]

KILL_POINTS = {
    "during a step": ("step", 30),                    # in epoch 2: resumes from epoch 1's last.pt
    "while writing last.pt": ("write:last.pt", 2),    # epoch 2's save: epoch 1's last.pt must survive
    "while writing metrics.json": ("write:metrics.json", 1),   # everything trained, the final files not written
    "during evaluation": ("eval", 2),                 # epoch 2's validation, one batch in
}


def detseg_train(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detseg.cli", "train", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def killed_at(point: str, n: int, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.kill_points", point, str(n), "--", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def assert_sound(run) -> None:
    """Every file of the run directory is whole (checkpoints load, JSON parses, PNGs verify), no temporary left."""
    assert temporaries(run) == [] and damaged_files(run) == []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference")
    result = detseg_train(*ARGS, "--out", run)
    assert result.returncode == 0, result.stderr
    return comparable(run)


@pytest.mark.parametrize("where", list(KILL_POINTS))
def test_kill_9_then_resume_reaches_the_uninterrupted_metrics_exactly(where, reference, tmp_path):
    point, n = KILL_POINTS[where]
    run = tmp_path / "run"
    killed = killed_at(point, n, *ARGS, "--out", run)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    assert not (run / "metrics.json").exists() or point != "write:metrics.json"
    # On disk at the moment of death: the previous checkpoint whole, at most a temporary file beside it.
    assert load_checkpoint(run / "last.pt")["trainer"]["epoch"] == (3 if point == "write:metrics.json" else 1)

    resumed = detseg_train(*ARGS, "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(run) == reference
    assert_sound(run)


def test_resume_from_a_truncated_or_foreign_last_pt_names_it(tmp_path, cli):
    run = tmp_path / "run"
    assert cli("train", *ARGS[:-3], "--epochs", "1", "--out", run, "--quiet").returncode == 0
    whole = (run / "last.pt").read_bytes()

    (run / "last.pt").write_bytes(whole[: len(whole) // 3])
    result = cli("train", *ARGS, "--out", run, "--resume")
    assert result.returncode == 2 and "last.pt" in result.stderr and "not a readable" in result.stderr

    (run / "last.pt").write_bytes(os.urandom(4096))
    result = cli("train", *ARGS, "--out", run, "--resume")
    assert result.returncode == 2 and "last.pt" in result.stderr

    payload = load_checkpoint(run / "best.pt")   # another model's checkpoint put in its place
    save_checkpoint(run / "last.pt", {**payload, "model_name": "cls/convnet"})
    result = cli("train", *ARGS, "--out", run, "--resume")
    assert result.returncode == 2 and "last.pt" in result.stderr and "cls/convnet" in result.stderr

    save_checkpoint(run / "last.pt", {**payload})   # the right model, other knobs: shapes differ
    result = cli("train", *ARGS, "width=48", "--out", run, "--resume")
    assert result.returncode == 2 and "last.pt" in result.stderr and "does not fit" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_run_directory_that_cannot_be_written_fails_at_the_start(tmp_path, cli):
    if os.geteuid() == 0:      # root writes through permission bits: take a place no one may write, /sys
        target, restore = "/sys/detseg-run", None
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target, restore = locked / "run", lambda: locked.chmod(0o700)
    try:
        result = cli("train", *ARGS, "--out", target)
    finally:
        if restore:
            restore()
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ("detseg-run" in lines[0] or "locked" in lines[0]), lines
    assert "cannot write" in lines[0], lines
    assert "training" not in result.stdout   # it stopped before making data or a model


def test_a_run_directory_that_is_a_file_fails_at_the_start(tmp_path, cli):
    (tmp_path / "run").write_text("not a directory")
    result = cli("train", *ARGS, "--out", tmp_path / "run")
    assert result.returncode == 2 and "is a file" in result.stderr and len(result.stderr.strip().splitlines()) == 1


class _DiskFull:
    """Stands in for ``os.fdopen`` in detseg.io: the ``nth`` write of a file called ``name`` fails with ENOSPC after
    half of its bytes, as a filling disk does."""

    def __init__(self, name: str, nth: int):
        self.name, self.nth, self.seen = name, nth, 0
        self.fdopen = os.fdopen

    def __call__(self, fd, *args, **kwargs):
        handle = self.fdopen(fd, *args, **kwargs)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{self.name}."):
            self.seen += 1
            if self.seen == self.nth:
                write = handle.write

                def write_half_then_fail(data):
                    write(data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                handle.write = write_half_then_fail
        return handle


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name an open file")
def test_a_full_disk_midway_keeps_the_previous_last_pt(tmp_path, monkeypatch, cli):
    run = tmp_path / "run"
    monkeypatch.setattr(detseg.io.os, "fdopen", _DiskFull("last.pt", nth=2))
    with pytest.raises(WriteError, match="last.pt.*No space left on device"):
        api.train(*ARGS[:1], overrides=ARGS[3:8], data="gaussians", epochs=3, seed=11, out=run,
                  progress=False, verbose=False)
    state = load_checkpoint(run / "last.pt")["trainer"]
    assert state["epoch"] == 1 and not math.isnan(state["history"][0]["train_loss"])
    assert not [path.name for path in run.iterdir() if path.name.endswith(".tmp")]

    monkeypatch.setattr(detseg.io.os, "fdopen", _DiskFull("last.pt", nth=1))   # the CLI: one line, exit 2
    result = cli("train", *ARGS, "--out", run, "--resume")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "last.pt" in result.stderr and "No space left" in result.stderr
    assert load_checkpoint(run / "last.pt")["trainer"]["epoch"] == 1


def test_write_errors_are_named_and_leave_nothing_behind(tmp_path):
    target = tmp_path / "x.json"
    detseg.io.write_json(target, {"a": 1})
    with pytest.raises(WriteError, match="x.json"):
        detseg.io.atomic_write_bytes(tmp_path / "x.json" / "inside", b"a file is not a directory")
    assert json.loads(target.read_text()) == {"a": 1}
    (tmp_path / ".x.json.abc.tmp").write_bytes(b"half")
    assert [path.name for path in detseg.io.remove_stale_temporaries(tmp_path)] == [".x.json.abc.tmp"]
    with pytest.raises(ConfigError, match="not a directory"):
        detseg.io.check_writable(target)


def test_the_resume_bench_sees_damage_and_runs_a_trial(tmp_path, reference):
    from detseg.bench.resume import trial

    run = tmp_path / "damaged"
    run.mkdir()
    save_checkpoint(run / "last.pt", {"model_name": "cls/mlp"})
    (run / "metrics.json").write_text('{"top1": 0.')           # cut off mid-write by something not detseg
    (run / "ok.json").write_text("{}")
    (run / "best.pt").write_bytes((run / "last.pt").read_bytes()[:100])
    assert damaged_files(run) == ["best.pt", "metrics.json"]

    row = trial([*ARGS[:-1]], tmp_path / "trial", delay=3.0, reference=reference)   # --quiet: trial adds it
    assert row is not None and row["exact"], row
    assert row["left_after"] == [] and row["damaged"] == []
