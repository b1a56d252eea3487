"""bench lecture: the lecture's claims judged on canned study results (no training): verdicts follow the numbers,
stale, missing, failed and unavailable studies are told apart, and the reports are written."""
import json
from html.parser import HTMLParser

import numpy as np
import pytest

from detseg.bench import (STUDIES, densecap, detectors, lecture, localization, rcnn, roialign, segmentation,
                          stamp_results)
from detseg.io import read_json, write_json
from detseg.viz import save_png


# ---- canned results, one per study, numbers for which every claim holds -------------------------------------------
def seg_row(label, model="seg/encoder_decoder", **numbers):
    row = {"label": label, "model": model, "knobs": {}, "miou": 0.14, "pixel_acc": 0.8, "boundary_iou": 0.10,
           "epochs": 3, "train_seconds": 25.0, "train_images_per_second": 100.0, "gflops_per_image": 0.05,
           "train_memory_mb": 7.0, "infer_peak_mb": 3.0, "ms_per_image": 1.5, "params": 1000,
           "checkerboard_init": 0.0, "checkerboard_trained": 0.005}
    row.update(numbers)
    return row


def segmentation_results():
    rows = [seg_row("sliding window", "seg/sliding_window", gflops_per_image=94.5, ms_per_image=3000.0,
                    train_memory_mb=50.0, miou=0.10),
            seg_row("FCN full-res", "seg/fcn_fullres", gflops_per_image=0.877, ms_per_image=9.0, train_memory_mb=40.0,
                    infer_peak_mb=12.0, miou=0.12),
            seg_row("enc-dec maxpool + nearest", boundary_iou=0.10),
            seg_row("enc-dec maxpool + max_unpool", boundary_iou=0.13, checkerboard_trained=0.94),
            seg_row("enc-dec maxpool + transposed", gflops_per_image=0.066, ms_per_image=1.76, train_memory_mb=7.5,
                    miou=0.15, checkerboard_init=0.997, checkerboard_trained=0.066),
            seg_row("enc-dec maxpool + resize_conv", checkerboard_trained=0.01),
            seg_row("enc-dec maxpool + transposed k3", checkerboard_init=1.0, checkerboard_trained=0.819)]
    return with_ratios({"settings": segmentation.SETTINGS[True], "threads": 1, "rows": rows, "wall_seconds": 400.0})


def with_ratios(results):
    """The segmentation study's ratios, computed from its rows as the study does."""
    by_label = {row["label"]: row for row in results["rows"]}
    fcn, sliding = by_label["FCN full-res"], by_label["sliding window"]
    encdec = by_label["enc-dec maxpool + transposed"]
    results["ratios"] = {
        "fcn_over_encdec_flops": fcn["gflops_per_image"] / encdec["gflops_per_image"],
        "fcn_over_encdec_train_memory": fcn["train_memory_mb"] / encdec["train_memory_mb"],
        "fcn_over_encdec_infer_peak": fcn["infer_peak_mb"] / encdec["infer_peak_mb"],
        "fcn_over_encdec_ms": fcn["ms_per_image"] / encdec["ms_per_image"],
        "equal_context": {"flops_ratio": 17.8},
        "sliding_over_fcn_flops": sliding["gflops_per_image"] / fcn["gflops_per_image"],
        "sliding_over_fcn_ms": sliding["ms_per_image"] / fcn["ms_per_image"]}
    return results


def loc_row(loc_acc, per_seed, freeze):
    return {"knobs": {"freeze_epochs": freeze}, "loc_acc": loc_acc, "top1": 0.5, "box_iou": 0.5,
            "train_seconds": 30.0, "cls_loss": 1.0, "box_loss": 0.5, "box_loss_weighted": 0.5, "total_loss": 1.5,
            "seeds": len(per_seed), "per_seed": {"seed": list(range(len(per_seed))), "loc_acc": per_seed}}


def localization_results():
    weights = {f"box_weight={weight:g}": {"knobs": {"box_weight": weight, "freeze_epochs": 0}, "loc_acc": acc,
                                           "total_loss": total}
               for weight, acc, total in ((0.1, 0.32, 1.59), (1.0, 0.415, 2.0), (10.0, 0.31, 4.0), (100.0, 0.22, 10.3))}
    settings = localization.SETTINGS[True]
    return {"settings": {**settings, "seeds": list(settings["seeds"])}, "image_size": 64,
            "schedules": {"frozen": loc_row(0.09, [0.08, 0.09, 0.10], 5), "joint": loc_row(0.42, [0.40, 0.42, 0.45], 0),
                          "schedule": loc_row(0.085, [0.08, 0.085, 0.09], 2),
                          "pretrained_frozen": loc_row(0.30, [0.28, 0.30, 0.31], 5),
                          "pretrained_joint": loc_row(0.50, [0.47, 0.50, 0.52], 0)},
            "box_weights": weights, "wall_seconds": 200.0}


def rcnn_results():
    def row(method, images_per_second, test_ms, proposals_ms, regions=100):
        return {"method": method, "model": f"det/{method}", "train_seconds": 60.0,
                "train_images_per_second": images_per_second, "test_ms_per_image": test_ms, "ap": 0.1, "ap50": 0.2,
                "test_ms_proposals": proposals_ms, "proposals_per_image": regions}

    rows = [row("rcnn", 10.0, 168.0, 60.0), row("spp", 40.0, 115.0, 60.0), row("fast_rcnn", 90.0, 105.0, 60.0),
            row("faster_rcnn", 100.0, 18.0, 1.0)]
    point = [row("rcnn", 10.0, 32000.0, 1600.0, 1793), row("fast_rcnn", 90.0, 1000.0, 800.0, 1793),
             row("faster_rcnn", 100.0, 47.0, 2.0, 300)]
    return {"quick": True, "settings": rcnn.SETTINGS[True], "rows": rows, "speedups": rcnn.speedups(rows),
            "targets": rcnn.targets(rows), "operating_point": {"rows": point, "speedups": rcnn.speedups(point)},
            "threads": 1, "wall_seconds": 600.0}


def detectors_results(yolo_ap=0.496):
    def row(method, ap, small, test_ms):
        return {"method": method, "model": f"det/{method}", "train_seconds": 60.0, "train_images_per_second": 50.0,
                "ap": ap, "ap50": 0.7, "ap_small_scenes": small, "test_ms_per_image": test_ms}

    rows = [row("faster_rcnn", 0.602, 0.511, 10.4), row("yolo", yolo_ap, 0.35, 3.5), row("ssd", 0.50, 0.40, 4.6)]
    return {"quick": True, "settings": detectors.SETTINGS[True], "code": "detseg", "rows": rows, "sweeps": {},
            "targets": detectors.targets(rows), "wall_seconds": 700.0}


def roialign_results():
    rows = [{"name": "mask_rcnn_roialign", "model": "inst/mask_rcnn", "train_seconds": 124.0, "ap": 0.068,
             "segm_ap": 0.059, "kp_ap": 0.034},
            {"name": "mask_rcnn_roipool", "model": "inst/mask_rcnn", "train_seconds": 78.0, "ap": 0.047,
             "segm_ap": 0.037, "kp_ap": 0.009},
            {"name": "faster_rcnn", "model": "det/faster_rcnn", "train_seconds": 60.0, "ap": 0.077}]
    return {"study": "roialign", "quick": True, "settings": roialign.SETTINGS[True], "paper": roialign.PAPER,
            "rows": rows}


def densecap_results():
    return {"study": "densecap", "quick": True, "settings": densecap.SETTINGS[True], "targets": densecap.TARGETS,
            "greedy": {"det_map": 0.862, "densecap_map": 0.711}, "faster_rcnn_det_map": 0.834,
            "det_map_ratio": 0.862 / 0.834, "word_accuracy": {"attributes": 0.82}}


def growth_results(grown_seconds=(30.0, 34.0, 32.0), scratch_seconds=(60.0, 55.0, 65.0), seeds=(0, 1, 2)):
    rows = []
    for seed, grown, scratch in zip(seeds, grown_seconds, scratch_seconds):
        rows += [{"seed": seed, "arm": "grown", "final_acc": 0.90, "seconds_to_target": grown, "target_acc": 0.85},
                 {"seed": seed, "arm": "scratch", "final_acc": 0.905, "seconds_to_target": scratch, "target_acc": 0.85},
                 {"seed": seed, "arm": "small", "final_acc": 0.80, "seconds_to_target": None, "target_acc": 0.85}]
    speedups = [scratch / grown for grown, scratch in zip(grown_seconds, scratch_seconds) if grown and scratch]
    return {"rows": rows, "summary": {"seeds": len(seeds), "target_acc": 0.85, "speedups": speedups}}


CANNED = {"segmentation": segmentation_results, "localization": localization_results, "rcnn": rcnn_results,
          "detectors": detectors_results, "roialign": roialign_results, "densecap": densecap_results,
          "growth": growth_results}


def write_study(root, study, results):
    """A study's results.json as run_study leaves it: written, then stamped with the current code's provenance."""
    path = root / study / "results.json"
    write_json(path, results)
    stamp_results(path, study, True, {})
    return path


@pytest.fixture
def studies(tmp_path, monkeypatch):
    """Every study's canned results under tmp/bench, a figure for segmentation; ``growth`` registered (by a stand-in
    module without SETTINGS) whether or not this detseg has it yet."""
    monkeypatch.setitem(STUDIES, "growth", "detseg.bench.lecture")
    root = tmp_path / "bench"
    for study, make in CANNED.items():
        write_study(root, study, make())
    save_png(root / "segmentation" / "cost_quality.png", np.full((8, 8, 3), 200, dtype=np.uint8))
    return root


def judged(tmp_path, root, **options):
    results = lecture.run(tmp_path / "lecture", quick=True, studies_dir=root, **options)
    return results, {claim["id"]: claim for claim in results["claims"]}


class StrictHTML(HTMLParser):
    """Records image sources and fails on a closing tag that does not close the innermost open one."""
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.open, self.images = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()


# ---- tests -------------------------------------------------------------------------------------------------------
def test_every_claim_holds_on_numbers_that_support_it_and_the_reports_say_so(tmp_path, studies):
    results, claims = judged(tmp_path, studies, reuse_only=True)
    assert set(range(1, 12)) == set(claims)
    assert {name: state["status"] for name, state in results["studies"].items()} == dict.fromkeys(lecture.NEEDED,
                                                                                                  "reused")
    for claim in claims.values():
        assert claim["verdict"] == "holds", (claim["id"], claim["measured"], claim["why"])
        assert claim["stale"] is None and claim["numbers"] and claim["why"].startswith("Holds if")
        part = lecture.PARTS.get(claim["study"])
        assert claim["command"] == f"detseg bench {claim['study']} --quick" + (f" --only {','.join(part)}" if part
                                                                                else "")
    assert claims[1]["numbers"]["flops_ratio"] == pytest.approx(0.877 / 0.066)
    assert claims[1]["numbers"]["encdec"] == "enc-dec maxpool + transposed"
    assert "0.400–0.450" in claims[5]["measured"] and "pre-trained backbone" in claims[5]["measured"]
    assert claims[6]["numbers"]["verdict_basis"] == "operating_point" and claims[6]["numbers"]["test_operating_point"][
        "fast_rcnn"] == pytest.approx(32.0)
    assert claims[7]["numbers"]["share"] == pytest.approx(0.8)
    assert "32.0 ± 2.0 s" in claims[10]["measured"] and "30.0–34.0 s" in claims[10]["measured"]
    assert "speed-up per seed 1.62–2.03×" in claims[10]["measured"]

    out = tmp_path / "lecture"
    assert read_json(out / "claims.json") == json.loads(json.dumps(results["claims"]))
    assert read_json(out / "results.json")["studies"]["rcnn"]["status"] == "reused"
    report = (out / "report.md").read_text()
    assert "| # | claim | reference | measured | verdict |" in report
    table = [line for line in report.splitlines() if line.startswith("| ") and "**" in line]
    assert len(table) == 11 and all(line.endswith("| **holds** |") for line in table)
    assert "`detseg bench rcnn --quick --only rcnn,spp,fast_rcnn,faster_rcnn`" in report

    page = (out / "report.html").read_text()
    parser = StrictHTML()
    parser.feed(page)
    parser.close()
    assert parser.open == []
    assert [src[:22] for src in parser.images] == ["data:image/png;base64,"]   # segmentation's figure, nothing else
    assert "R-CNN &lt; SPP-net" in page and "R-CNN < SPP-net" not in page        # text is escaped


@pytest.mark.parametrize("study, edit, claim_id", [
    ("detectors", lambda r: detectors_results(yolo_ap=0.70), 8),                  # single shot more accurate
    ("detectors", lambda r: _set_row(r, "yolo", key="method", ap_small_scenes=0.50), 8),   # not worse on small
    ("detectors", lambda r: _set_row(r, "ssd", key="method", test_ms_per_image=12.0), 8),   # not faster
    ("segmentation", lambda r: _set_row(r, "enc-dec maxpool + max_unpool", boundary_iou=0.09), 4),
    ("segmentation", lambda r: _set_row(r, "enc-dec maxpool + transposed k3", checkerboard_trained=0.05), 3),
    ("segmentation", lambda r: with_ratios(_set_row(r, "FCN full-res", gflops_per_image=0.1, miou=0.3)), 1),
    ("localization", lambda r: _set(r, ("schedules", "pretrained_joint", "loc_acc"), 0.29), 5),
    ("rcnn", lambda r: _set(r, ("operating_point", "speedups", "fast_rcnn", "test_with_proposals"), 2.0), 6),
    ("roialign", lambda r: _set_row(r, "mask_rcnn_roipool", segm_ap=0.07, key="name"), 9),
    ("densecap", lambda r: _set(r, ("word_accuracy", "attributes"), 0.5), 11),
    ("growth", lambda r: growth_results(grown_seconds=(70.0, 60.0, 80.0)), 10),
])
def test_a_claim_does_not_hold_when_its_numbers_say_otherwise(tmp_path, studies, study, edit, claim_id):
    write_study(studies, study, edit(CANNED[study]()))
    _, claims = judged(tmp_path, studies, reuse_only=True)
    assert claims[claim_id]["verdict"] == "does not hold", claims[claim_id]
    assert all(claim["verdict"] == "holds" for number, claim in claims.items() if number != claim_id)


def _set(results, keys, value):
    target = results
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return results


def _set_row(results, label, key="label", **numbers):
    next(row for row in results["rows"] if row[key] == label).update(numbers)
    return results


def test_stale_results_are_shown_and_flagged_missing_ones_not_measured(tmp_path, studies):
    path = studies / "segmentation" / "results.json"
    results = read_json(path)
    results["provenance"]["code"]["metrics.py"] = "0" * 16                   # a module changed since the run
    write_json(path, results)
    (studies / "roialign" / "results.json").unlink()
    summary, claims = judged(tmp_path, studies, reuse_only=True)
    assert summary["studies"]["segmentation"] == {"status": "stale", "reason": "code changed: metrics.py",
                                                  "results": str(path)}
    for number in (1, 2, 3, 4):
        assert claims[number]["stale"] == "code changed: metrics.py" and claims[number]["verdict"] == "holds"
    assert claims[5]["stale"] is None
    assert summary["studies"]["roialign"]["status"] == "missing"
    assert claims[9]["verdict"] == "not measured" and "no results" in claims[9]["why"]
    report = (tmp_path / "lecture" / "report.md").read_text()
    assert "**holds** (stale) |" in report and "- stale: code changed: metrics.py" in report
    assert "stale: code changed: metrics.py" in (tmp_path / "lecture" / "report.html").read_text()


def test_settings_and_mode_make_results_stale(tmp_path, studies):
    rcnn_path = studies / "rcnn" / "results.json"
    results = rcnn_results()
    results["settings"] = {**results["settings"], "budget": 1.0}
    write_study(studies, "rcnn", results)
    write_json(studies / "densecap" / "results.json", densecap_results())   # no provenance at all
    summary, claims = judged(tmp_path, studies, reuse_only=True)
    assert summary["studies"]["rcnn"]["status"] == "stale"
    assert summary["studies"]["rcnn"]["reason"] == "settings changed: budget" and rcnn_path.is_file()
    assert claims[6]["stale"] == claims[7]["stale"] == "settings changed: budget"
    assert summary["studies"]["densecap"]["reason"].startswith("no provenance")
    summary = lecture.run(tmp_path / "full", quick=False, studies_dir=studies, reuse_only=True)
    assert all(state["status"] == "stale" for name, state in summary["studies"].items())
    assert summary["claims"][0]["command"] == "detseg bench segmentation"


def test_a_study_this_detseg_lacks_is_not_measurable_here(tmp_path, studies, monkeypatch):
    monkeypatch.delitem(STUDIES, "growth")
    summary, claims = judged(tmp_path, studies, reuse_only=True)
    assert summary["studies"]["growth"] == {"status": "missing", "reason": "study not available",
                                            "results": str(studies / "growth" / "results.json")}
    assert claims[10]["verdict"] == "not measurable here" and "study not available" in claims[10]["why"]
    assert claims[9]["verdict"] == "holds"


def test_stale_studies_are_run_again_and_a_failing_one_does_not_stop_the_report(tmp_path, studies, monkeypatch):
    (studies / "roialign" / "results.json").unlink()
    results = read_json(studies / "detectors" / "results.json")
    results["provenance"]["quick"] = False
    write_json(studies / "detectors" / "results.json", results)
    calls = []

    def fake_run_study(study, out, quick, only=None):                        # what run_study leaves behind
        calls.append((study, out, quick, only))
        if study == "detectors":
            raise RuntimeError("out of memory\ntraceback")
        write_study(out.parent, study, CANNED[study]())
        return {}

    monkeypatch.setattr(lecture, "run_study", fake_run_study)
    summary, claims = judged(tmp_path, studies)
    # detectors runs only the rows claim 8 reads; roialign runs whole
    assert calls == [("detectors", studies / "detectors", True, "faster_rcnn,yolo,ssd"),
                     ("roialign", studies / "roialign", True, None)]
    assert claims[8]["command"] == "detseg bench detectors --quick --only faster_rcnn,yolo,ssd"
    assert summary["studies"]["roialign"] == {"status": "ran", "reason": "no results",
                                              "results": str(studies / "roialign" / "results.json")}
    assert claims[9]["verdict"] == "holds" and claims[9]["stale"] is None
    assert summary["studies"]["detectors"]["status"] == "failed"
    assert summary["studies"]["detectors"]["reason"] == "RuntimeError: out of memory"
    assert claims[8]["verdict"] == "not measured" and "out of memory" in claims[8]["why"]
    assert summary["studies"]["segmentation"]["status"] == "reused"


def test_results_without_the_numbers_a_claim_reads_leave_it_not_measured(tmp_path, studies):
    write_study(studies, "segmentation", {"settings": segmentation.SETTINGS[True], "rows": []})
    old_rows = segmentation_results()
    for row in old_rows["rows"]:
        row["boundary_iou"] = None                                            # written before boundary IoU existed
    write_study(studies, "densecap", {"settings": densecap.SETTINGS[True]})
    _, claims = judged(tmp_path, studies, reuse_only=True)
    assert all(claims[number]["verdict"] == "not measured" for number in (1, 2, 3, 4, 11))
    assert "lacks" in claims[1]["why"] and "det_map ratio" in claims[11]["why"]
    write_study(studies, "segmentation", old_rows)
    _, claims = judged(tmp_path, studies, reuse_only=True)
    assert claims[4]["verdict"] == "not measured" and "boundary IoU" in claims[4]["why"]
    assert claims[1]["verdict"] == claims[3]["verdict"] == "holds"


def test_localization_without_pretrained_rows_says_so():
    results = localization_results()
    del results["schedules"]["pretrained_frozen"], results["schedules"]["pretrained_joint"]
    claim = lecture.claim_fine_tuning(results)
    assert claim["verdict"] == "holds" and "pre-trained comparison missing" in claim["measured"]
    assert "missing" in claim["why"]


def test_net2net_needs_three_seeds_and_a_grown_network_that_gets_there():
    with pytest.raises(lecture.Unmeasured, match="needs ≥ 3"):
        lecture.claim_net2net(growth_results(seeds=(0, 1)))
    never = growth_results(grown_seconds=(None, None, None))
    assert lecture.claim_net2net(never)["verdict"] == "does not hold"             # scratch got there, grown never
    both_never = growth_results(grown_seconds=(None,) * 3, scratch_seconds=(None,) * 3)
    with pytest.raises(lecture.Unmeasured, match="neither"):
        lecture.claim_net2net(both_never)
    worse = growth_results()
    for row in worse["rows"]:
        if row["arm"] == "grown":
            row["final_acc"] = 0.85                                               # faster, but not as good
    assert lecture.claim_net2net(worse)["verdict"] == "does not hold"
    summary = growth_results()
    summary["summary"].update(grown_seconds_mean=100.0, grown_seconds_std=1.0)   # the study's own summary wins
    assert lecture.claim_net2net(summary)["verdict"] == "does not hold"


def test_cli_runs_the_lecture_through_run_study(tmp_path, studies, monkeypatch, cli):
    def no_training(*args, **kwargs):
        raise AssertionError("every canned study is current: nothing may run")

    monkeypatch.setattr(lecture, "run_study", no_training)
    monkeypatch.chdir(studies.parent)                                          # the default studies_dir: ./bench
    result = cli("bench", "lecture", "--quick", "--out", tmp_path / "out")
    assert result.returncode == 0
    saved = read_json(tmp_path / "out" / "results.json")
    assert saved["provenance"]["study"] == "lecture" and len(saved["claims"]) == 11
    assert all(state["status"] == "reused" for state in saved["studies"].values())
    assert "segmentation: reused" in result.stdout



def test_a_partial_run_is_reused_only_when_it_ran_every_row_the_claims_read(tmp_path, studies):
    path = studies / "detectors" / "results.json"
    stamp_results(path, "detectors", True, {"only": "ssd,faster_rcnn,yolo"})
    assert lecture.gather("detectors", studies, quick=True, reuse_only=True)["status"] == "reused"
    stamp_results(path, "detectors", True, {"only": "faster_rcnn,yolo"})            # the SSD row is not this code's
    state = lecture.gather("detectors", studies, quick=True, reuse_only=True)
    assert (state["status"], state["reason"]) == ("stale", "a partial run (--only faster_rcnn,yolo)")


def test_the_real_growth_study_is_reused_when_its_settings_match(tmp_path):
    if STUDIES.get("growth") != "detseg.bench.growth":
        pytest.skip("this detseg has no growth study")
    growth = pytest.importorskip("detseg.bench.growth")
    settings = growth.SETTINGS[True]
    results = {**growth_results(), "settings": {**settings, "seeds": list(settings["seeds"])}}
    write_study(tmp_path, "growth", results)
    state = lecture.gather("growth", tmp_path, quick=True, reuse_only=True)
    assert (state["status"], state["reason"]) == ("reused", None)
    results["settings"]["tolerance"] = 1.0
    write_study(tmp_path, "growth", results)
    state = lecture.gather("growth", tmp_path, quick=True, reuse_only=True)
    assert (state["status"], state["reason"]) == ("stale", "settings changed: tolerance")
