import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from detseg.cli import main

# Tests share two cores with each other; one thread per process keeps subprocess tests from oversubscribing.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``detseg ARGS`` in a fresh interpreter (for what must be a real process: kills, torchrun)."""
    return subprocess.run([sys.executable, "-m", "detseg.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def invoke_cli(*args) -> SimpleNamespace:
    """Run ``detseg ARGS`` in this process (no interpreter start-up), with the exit code a shell would see."""
    result = CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


def set_at(path, value):
    """A change for a nested fixture dict: ``set_at(["images", 0, "width"], -1)(data)`` sets that field."""
    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


@pytest.fixture
def cli():
    return invoke_cli


@pytest.fixture(scope="session")
def scenes_files(tmp_path_factory):
    """A tiny scenes set written as COCO files by the CLI: 12 training and 6 validation images of 64 px."""
    out = tmp_path_factory.mktemp("scenes")
    result = CliRunner().invoke(main, ["data", "scenes", "--out", str(out), "--train", "12", "--val", "6",
                                       "--size", "64"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out
