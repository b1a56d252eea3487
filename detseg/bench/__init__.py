"""Benchmarks: the lecture's comparisons, measured. One module per study, each writing report.md, plots and
results.json into its output directory. Studies are slow by design and are not part of the test suite."""
from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import ConfigError

# study name -> module defining ``run(out: Path, quick: bool) -> dict``
STUDIES = {
    "scenes": "detseg.bench.scenes",
    "hyperquest": "detseg.bench.hyperquest",
    "segmentation": "detseg.bench.segmentation",
    "localization": "detseg.bench.localization",
    "rcnn": "detseg.bench.rcnn",
}


def run_study(study: str, out: str | Path | None = None, quick: bool = False) -> dict:
    if study not in STUDIES:
        raise ConfigError(f"unknown study '{study}'; available: {', '.join(sorted(STUDIES))}")
    out_dir = Path(out) if out is not None else Path("bench") / study
    out_dir.mkdir(parents=True, exist_ok=True)
    return importlib.import_module(STUDIES[study]).run(out_dir, quick)
