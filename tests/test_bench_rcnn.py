"""The rcnn study's bookkeeping on hand-made numbers: rows, speed-ups over R-CNN, the two targets, the report."""
import json
import math

from detseg.bench import STUDIES
from detseg.bench import rcnn as study


def _metrics(images_per_second, ap, ap50=None):
    return {"train_seconds": 60.0, "train_images_per_second": images_per_second, "ap": ap,
            "ap50": ap if ap50 is None else ap50}


def _split(proposals, shared, per_region, other=1.0):
    return {"test_ms_per_image": proposals + shared + per_region + other, "test_ms_proposals": proposals,
            "test_ms_shared_conv": shared, "test_ms_per_region": per_region, "test_ms_other": other,
            "proposals_per_image": 100.0}


EXTRAS = {"val_images": 50, "timing_images": 10, "epochs": 3, "infer_ms_per_image": 5.0,
          "train_wall_seconds": 70.0, "timing_wall_seconds": 5.0}


def _rows():
    return [
        study.make_row("rcnn", "det/rcnn", _metrics(10.0, 0.20), _split(200.0, 0.0, 799.0), EXTRAS),
        study.make_row("fast_rcnn", "det/fast_rcnn", _metrics(80.0, 0.30), _split(200.0, 5.0, 4.0), EXTRAS),
        study.make_row("faster_rcnn", "det/faster_rcnn", _metrics(60.0, 0.35), _split(4.0, 5.0, 10.0), EXTRAS),
        study.make_row("torchvision", "det/torchvision_faster_rcnn", _metrics(20.0, 0.30),
                       {"test_ms_per_image": 50.0}, EXTRAS),
        {"method": "rfcn", "model": "det/rfcn", "skipped": "ConfigError: unknown model det/rfcn"},
    ]


def test_the_study_is_registered():
    assert STUDIES["rcnn"] == "detseg.bench.rcnn"


def test_rows_keep_metrics_and_the_stage_split():
    row = _rows()[0]
    assert row["model"] == "det/rcnn" and row["train_images_per_second"] == 10.0 and row["ap50"] == 0.20
    assert row["test_ms_per_image"] == 1000.0 and row["test_ms_proposals"] == 200.0
    assert math.isnan(study.make_row("x", "det/x", _metrics(1.0, 0.0), {})["test_ms_per_image"])


def test_speedups_are_relative_to_rcnn_with_and_without_proposals():
    ratios = study.speedups(_rows())
    assert "rfcn" not in ratios                                        # a skipped run has no numbers
    assert ratios["rcnn"]["train"] == 1.0 and ratios["rcnn"]["test_with_proposals"] == 1.0
    assert ratios["fast_rcnn"]["train"] == 8.0
    assert math.isclose(ratios["fast_rcnn"]["test_with_proposals"], 1000.0 / 210.0)
    assert math.isclose(ratios["fast_rcnn"]["test_without_proposals"], 800.0 / 10.0)
    assert math.isclose(ratios["faster_rcnn"]["test_with_proposals"], 1000.0 / 20.0)
    assert ratios["torchvision"]["test_without_proposals"] is None      # timed as a whole
    assert ratios["fast_rcnn"]["paper_train"] == 8.8 and ratios["faster_rcnn"]["lecture_test_with_proposals"] == 250
    assert study.speedups(_rows()[1:])["fast_rcnn"]["train"] is None   # no R-CNN run: no ratios


def test_targets_pass_and_fail_on_the_numbers():
    verdicts = study.targets(_rows())
    assert math.isclose(verdicts["faster_test_speedup_over_rcnn"]["value"], 50.0)
    assert verdicts["faster_test_speedup_over_rcnn"]["passed"] is True
    throughput = verdicts["faster_train_throughput_over_torchvision"]
    assert throughput["value"] == 3.0 and math.isclose(throughput["ap_difference"], 0.05) and throughput["passed"]

    worse_ap = _rows()
    worse_ap[3] = study.make_row("torchvision", "det/torchvision_faster_rcnn", _metrics(20.0, 0.40),
                                 {"test_ms_per_image": 50.0}, EXTRAS)
    assert study.targets(worse_ap)["faster_train_throughput_over_torchvision"]["passed"] is False
    slow = _rows()
    slow[2] = study.make_row("faster_rcnn", "det/faster_rcnn", _metrics(60.0, 0.35), _split(40.0, 5.0, 10.0), EXTRAS)
    assert study.targets(slow)["faster_test_speedup_over_rcnn"]["passed"] is False
    missing = study.targets(_rows()[:3])
    assert missing["faster_train_throughput_over_torchvision"]["passed"] is None


def test_report_and_validation_subset(tmp_path):
    rows = _rows()
    results = {"quick": True, "settings": study.SETTINGS[True], "rows": rows, "speedups": study.speedups(rows),
               "targets": study.targets(rows), "wall_seconds": 123.0}
    text = study.write_report(tmp_path, results)
    assert (tmp_path / "report.md").read_text() == text
    assert "| faster_rcnn | 60 | 60.0 | 20.0 |" in text and "50.0× — **PASS**" in text
    assert "rfcn** (`det/rfcn`) skipped" in text

    document = {"images": [{"id": i, "file_name": f"val/{i}.png"} for i in (1, 2, 3)],
                "annotations": [{"id": 10 + i, "image_id": i} for i in (1, 2, 3, 3)], "categories": []}
    (tmp_path / "val.json").write_text(json.dumps(document))
    subset = study.first_images(tmp_path / "val.json", 2)
    kept = json.loads(subset.read_text())
    assert [image["id"] for image in kept["images"]] == [1, 2] and len(kept["annotations"]) == 2
    assert study.first_images(tmp_path / "val.json", 5) == tmp_path / "val.json"


def test_training_overrides_only_name_knobs_the_model_has():
    settings = study.SETTINGS[True]
    assert study.training_overrides("det/faster_rcnn", settings)["backbone"] == "tiny"
    rcnn = study.training_overrides("det/rcnn", settings)
    assert "backbone" not in rcnn and rcnn["batch_size"] == settings["batch_size"] and rcnn["eval_every"] >= 1000
    assert rcnn["threads"] == settings["threads"]


def test_pictures_show_the_best_detections_first():
    prediction = {"boxes": [[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3]], "scores": [0.1, 0.7, 0.3],
                  "labels": ["circle", "star", "square"]}
    best = study.best_detections(prediction, count=2)
    assert best == {"boxes": [[1, 1, 2, 2], [2, 2, 3, 3]], "scores": [0.7, 0.3], "labels": ["star", "square"]}
