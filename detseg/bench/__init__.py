"""Benchmarks: the lecture's comparisons, measured. One module per study, each writing report.md, plots and
results.json into its output directory. Studies are slow by design and are not part of the test suite."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from ..errors import ConfigError

# study name -> module defining ``run(out: Path, quick: bool) -> dict``
STUDIES = {
    "scenes": "detseg.bench.scenes",
    "hyperquest": "detseg.bench.hyperquest",
    "segmentation": "detseg.bench.segmentation",
    "localization": "detseg.bench.localization",
    "rcnn": "detseg.bench.rcnn",
    "detectors": "detseg.bench.detectors",
    "streaming": "detseg.bench.streaming",
    "predict": "detseg.bench.predict",
    "export": "detseg.bench.export",
    "convert": "detseg.bench.convert",
    "roialign": "detseg.bench.roialign",
    "densecap": "detseg.bench.densecap",
    "resume": "detseg.bench.resume",
}


def run_study(study: str, out: str | Path | None = None, quick: bool = False, only: str | None = None,
              **options) -> dict:
    """Run ``study`` into ``out`` (default bench/STUDY). ``only`` (studies that take it) runs part of it; ``options``
    are a study's own settings (hyperquest: players, minutes, web_processes, worker_processes, db)."""
    if study not in STUDIES:
        raise ConfigError(f"unknown study '{study}'; available: {', '.join(sorted(STUDIES))}")
    module = importlib.import_module(STUDIES[study])
    accepted = inspect.signature(module.run).parameters
    if only and "only" not in accepted:
        raise ConfigError(f"--only: the {study} study always runs whole")
    for name in options:
        if name not in accepted:
            raise ConfigError(f"--{name.replace('_', '-')}: not an option of the {study} study")
    out_dir = Path(out) if out is not None else Path("bench") / study
    out_dir.mkdir(parents=True, exist_ok=True)
    if only:
        options["only"] = only
    return module.run(out_dir, quick, **options)
