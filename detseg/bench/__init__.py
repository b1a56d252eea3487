"""Benchmarks: the lecture's comparisons, measured. One module per study, each writing report.md, plots and
results.json into its output directory. Studies are slow by design and are not part of the test suite."""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

from .. import __version__
from ..errors import ConfigError
from ..io import read_json, write_json

PACKAGE_ROOT = Path(__file__).resolve().parents[1]

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
    "growth": "detseg.bench.growth",
    "lecture": "detseg.bench.lecture",
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
    results = module.run(out_dir, quick, **options)
    stamp_results(out_dir / "results.json", study, quick, options)
    return results


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of ``values`` over seeds (0 for one value; None, None for none)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ---- provenance: what code and settings a study's results came from ----------------------------------------------
def code_fingerprint() -> dict[str, str]:
    """``{path inside the package: sha256 prefix}`` of every detseg module loaded in this process: what a study's
    numbers depend on (conservatively: modules loaded for an earlier study in the same process count too)."""
    fingerprint = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not (name == "detseg" or name.startswith("detseg.")) or not path:
            continue
        path = Path(path).resolve()
        if path.suffix == ".py" and path.is_file():
            fingerprint[path.relative_to(PACKAGE_ROOT).as_posix()] = _file_hash(path)
    return dict(sorted(fingerprint.items()))


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def stamp_results(path: Path, study: str, quick: bool, options: dict) -> None:
    """Add ``provenance`` (study, quick, options, detseg version, code fingerprint, time) to a results.json."""
    if not path.is_file():
        return
    results = read_json(path)
    if not isinstance(results, dict):
        return
    results["provenance"] = {"study": study, "quick": bool(quick), "options": dict(options),
                             "detseg_version": __version__, "code": code_fingerprint(),
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(path, results)


def stale_reason(results: dict | None, study: str, quick: bool, settings: dict | None = None,
                 rows: tuple[str, ...] | None = None) -> str | None:
    """Why ``results`` (a study's results.json) cannot stand for a run of ``study`` now, or None if it can: no
    results, no provenance (written before studies recorded it), another study or mode, a partial run (``only``)
    that did not run every one of ``rows`` (the parts a reader needs; None: the whole study), settings other than
    ``settings``, or a module it ran on changed since (or gone). A partial run's other rows come from earlier runs
    whose code is not recorded, so only the rows it ran count."""
    if not isinstance(results, dict):
        return "no results"
    provenance = results.get("provenance")
    if not isinstance(provenance, dict):
        return "no provenance (results written before studies recorded their code and settings)"
    if provenance.get("study") != study:
        return f"results of the {provenance.get('study')!r} study"
    if bool(provenance.get("quick")) != bool(quick):
        return "a --quick run" if provenance.get("quick") else "a full run, not --quick"
    only = (provenance.get("options") or {}).get("only")
    if only:
        ran = {name.strip() for name in str(only).split(",")}
        if rows is None or not set(rows) <= ran:
            return f"a partial run (--only {only})"
    if settings is not None:
        wanted, recorded = json.loads(json.dumps(settings)), results.get("settings") or {}   # tuples as lists
        changed = sorted(key for key in set(wanted) | set(recorded) if wanted.get(key) != recorded.get(key))
        if changed:
            return "settings changed: " + ", ".join(changed)
    for relative, digest in (provenance.get("code") or {}).items():
        path = PACKAGE_ROOT / relative
        if not path.is_file():
            return f"code changed: {relative} is gone"
        if _file_hash(path) != digest:
            return f"code changed: {relative}"
    return None
