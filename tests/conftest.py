import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tests share two cores with each other; one thread per process keeps subprocess tests from oversubscribing.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``detseg ARGS`` in a fresh interpreter, capturing its output."""
    return subprocess.run([sys.executable, "-m", "detseg.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.fixture
def cli():
    return run_cli
