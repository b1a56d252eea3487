"""Studies record the code and settings their results came from; stale results are told apart from current ones."""
import json

from detseg.bench import code_fingerprint, stale_reason, stamp_results
from detseg.io import write_json


def stamped(tmp_path, settings, quick=False, options=None):
    path = tmp_path / "results.json"
    write_json(path, {"settings": settings, "rows": [1, 2]})
    stamp_results(path, "segmentation", quick, options or {})
    return json.loads(path.read_text())


def test_fingerprint_covers_the_loaded_detseg_modules():
    fingerprint = code_fingerprint()
    assert "bench/__init__.py" in fingerprint and "metrics.py" in fingerprint
    assert all(len(digest) == 16 for digest in fingerprint.values())


def test_fresh_results_are_current_and_keep_their_content(tmp_path):
    settings = {"train": 3000, "sizes": (64, 128)}
    results = stamped(tmp_path, settings)
    assert results["rows"] == [1, 2] and results["provenance"]["study"] == "segmentation"
    assert stale_reason(results, "segmentation", quick=False, settings=settings) is None


def test_each_way_of_being_stale_has_its_reason(tmp_path):
    settings = {"train": 3000}
    results = stamped(tmp_path, settings)
    assert stale_reason(None, "segmentation", False) == "no results"
    assert stale_reason({"settings": settings}, "segmentation", False).startswith("no provenance")
    assert stale_reason(results, "rcnn", False) == "results of the 'segmentation' study"
    assert stale_reason(results, "segmentation", quick=True) == "a full run, not --quick"
    assert stale_reason(results, "segmentation", False, settings={"train": 400}) == "settings changed: train"
    partial = stamped(tmp_path, settings, options={"only": "fcn"})
    assert stale_reason(partial, "segmentation", False, settings) == "a partial run (--only fcn)"
    # a reader that needs only some rows accepts a partial run that ran every one of them, and no other
    partial = stamped(tmp_path, settings, options={"only": "fcn,unet"})
    assert stale_reason(partial, "segmentation", False, settings, rows=("unet", "fcn")) is None
    assert stale_reason(partial, "segmentation", False, settings, rows=("fcn", "segnet")) == \
        "a partial run (--only fcn,unet)"
    edited = json.loads(json.dumps(results))
    edited["provenance"]["code"]["metrics.py"] = "0" * 16                     # the module changed since the run
    assert stale_reason(edited, "segmentation", False, settings) == "code changed: metrics.py"
    edited["provenance"]["code"] = {"models/gone.py": "0" * 16}
    assert stale_reason(edited, "segmentation", False, settings) == "code changed: models/gone.py is gone"
