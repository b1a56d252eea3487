"""The detectors study's bookkeeping on hand-made numbers (targets, report, plot, --only), the scenes' area ranges in
the COCO evaluation, and the rcnn study's operating point on photo-sized scenes."""
import json

import pytest
import torch

from detseg.bench import STUDIES, run_study
from detseg.bench import detectors as study
from detseg.bench import rcnn
from detseg.errors import ConfigError
from detseg.metrics import coco_eval


def _row(method, ap, test_ms, images_per_second, ap_small=0.1, **extra):
    return {"method": method, "model": f"det/{method}", "train_seconds": 600.0, "ap": ap, "ap50": ap + 0.2,
            "ap75": ap, "ap_small": ap_small, "ap_medium": ap, "ap_large": -1.0, "ap_small_scenes": ap_small,
            "ap_medium_scenes": ap, "ap_large_scenes": ap, "test_ms_per_image": test_ms,
            "test_ms_backbone": test_ms / 2, "train_images_per_second": images_per_second, "params": 1.5e6,
            "gflops": 0.5, "epochs": 10, **extra}


def _rows():
    return [_row("faster_rcnn", 0.45, 12.0, 25.0), _row("yolo", 0.40, 5.0, 60.0),
            _row("ssd", 0.30, 7.0, 50.0), _row("torchvision_ssd", 0.28, 9.0, 30.0),
            {"method": "mask_rcnn", "model": "inst/mask_rcnn", "skipped": "inst/mask_rcnn is not in this detseg"}]


def test_the_study_is_registered_and_only_names_known_rows():
    assert STUDIES["detectors"] == "detseg.bench.detectors"
    assert [method for method, _ in study.selected("yolo,ssd")] == ["yolo", "ssd"]
    assert study.selected("sweeps") == []
    assert len(study.selected(None)) == len(study.METHODS)
    with pytest.raises(ConfigError, match="unknown yol"):
        study.selected("yol")
    with pytest.raises(ConfigError, match="always runs whole"):
        run_study("scenes", only="anything")


def test_targets_compare_single_shot_with_faster_rcnn_and_ssd_with_torchvision():
    verdicts = study.targets(_rows())
    assert verdicts["yolo"]["passed"] is True                  # 5 / 12 = 0.42x the time, 0.05 AP behind
    assert verdicts["yolo"]["test_ratio"] == pytest.approx(5 / 12)
    assert verdicts["ssd"]["passed"] is False                  # 0.58x the time and 0.15 AP behind
    assert verdicts["ssd"]["ap_gap"] == pytest.approx(0.15)
    assert verdicts["ssd_vs_torchvision"]["passed"] is True    # 50 / 30 = 1.67x the throughput, AP + 0.02
    assert verdicts["ssd_vs_torchvision"]["throughput_ratio"] == pytest.approx(50 / 30)
    missing = study.targets([_row("yolo", 0.4, 5.0, 60.0)])
    assert missing["yolo"]["passed"] is None and missing["ssd_vs_torchvision"]["passed"] is None


def test_report_and_plot_from_rows_and_sweeps(tmp_path):
    rows = _rows()
    sweeps = {"proposals": [{"proposals": n, "ap": 0.3 + n / 1000, "ap50": 0.5, "ap_small": 0.1,
                             "test_ms_per_image": 8.0 + n / 50} for n in study.PROPOSAL_SWEEP],
              "input_size": [{"image_size": s, "ap": s / 300, "ap50": 0.5, "ap_small_scenes": 0.1,
                              "test_ms_per_image": s / 10, "train_images_per_second": 4000 / s}
                             for s in study.SIZE_SWEEP]}
    results = {"quick": True, "settings": study.SETTINGS[True], "code": "detseg test", "rows": rows,
               "sweeps": sweeps, "targets": study.targets(rows), "wall_seconds": 1.0}
    study.plot_speed_accuracy(results, tmp_path)
    assert (tmp_path / "speed_accuracy.png").stat().st_size > 10_000
    text = study.write_report(tmp_path, results)
    assert "| yolo | 0.400 | 0.600 |" in text
    assert "2.5 (50%)" in text                                 # yolo's backbone share of its 5 ms
    assert "| 300 | 0.600 |" in text and "| 256 | 0.853 |" in text
    assert "det/yolo: test time ≤ 0.5× Faster R-CNN's (0.42×)" in text and "**PASS**" in text
    assert "**FAIL**" in text                                  # det/ssd's AP gap
    assert "mask_rcnn** (`inst/mask_rcnn`) skipped" in text


def test_only_keeps_the_rows_of_an_earlier_run_with_the_same_settings(tmp_path):
    settings = dict(study.SETTINGS[True])
    (tmp_path / "results.json").write_text(json.dumps({"settings": settings, "rows": _rows(), "sweeps": {"x": 1}}))
    previous = study.previous_results(tmp_path, settings)
    assert [row["method"] for row in previous["rows"]][:2] == ["faster_rcnn", "yolo"] and previous["sweeps"] == {"x": 1}
    assert study.previous_results(tmp_path, {**settings, "budget": 1.0}) == {}
    fresh = [{"method": "faster_rcnn", "ap": 0.9}]
    merged = study.merge_rows(previous["rows"], fresh, study.METHODS)
    assert [row for row in merged if row["method"] == "faster_rcnn"] == fresh
    assert {row["method"] for row in merged} == {row["method"] for row in previous["rows"]}


def test_scenes_area_ranges_change_only_the_size_stats():
    # One 20 x 20 box (400 px²): "small" by COCO's 32² limit, "medium" by the 128 px scenes' 16² / 48².
    gt = {"images": [{"id": 1, "width": 128, "height": 128}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
                           "iscrowd": 0}]}
    results = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}]
    coco = coco_eval(gt, results)
    scenes = coco_eval(gt, results, area_thresholds=(16 ** 2, 48 ** 2))
    assert coco["ap_small"] == pytest.approx(1.0) and coco["ap_medium"] == -1.0
    assert scenes["ap_small"] == -1.0 and scenes["ap_medium"] == pytest.approx(1.0)
    assert scenes["ap"] == coco["ap"] == pytest.approx(1.0) and scenes["ap50"] == coco["ap50"]


def test_operating_point_scenes_are_photo_sized_and_cluttered():
    images = rcnn.photo_sized_scenes(2, 375, 500)
    assert [image.shape for image in images] == [(375, 500, 3)] * 2
    assert images[0].dtype.name == "uint8" and not (images[0] == images[1]).all()


def test_operating_point_table_and_verdict():
    def timed(method, total, proposals):
        return {"method": method, "model": f"det/{method}", "train_seconds": 60.0, "train_images_per_second": 10.0,
                "test_ms_per_image": total, "test_ms_proposals": proposals, "test_ms_shared_conv": 1.0,
                "test_ms_per_region": total - proposals - 1.0, "proposals_per_image": 2000.0}
    rows = [timed("rcnn", 3000.0, 1400.0), timed("fast_rcnn", 1450.0, 1400.0), timed("faster_rcnn", 60.0, 2.0)]
    results = {"settings": rcnn.SETTINGS[True], "operating_point": {"rows": rows, "speedups": rcnn.speedups(rows)}}
    lines = "\n".join(rcnn._operating_point_lines(results))
    assert "| rcnn | 3000 | 1400 |" in lines and "| 2000 |" in lines
    assert "| faster_rcnn | 60 |" in lines and "50.0×" in lines and "**PASS**" in lines
    assert rcnn._operating_point_lines({"settings": rcnn.SETTINGS[True]}) == []


def test_a_model_runs_at_a_given_non_square_input_size():
    from .detection_support import tiny_detector

    model = tiny_detector("det/faster_rcnn").eval()
    image = torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8)
    with torch.no_grad(), model.transform.resized_to((48, 80)):
        batch = model.transform.batch([image])
        detections = model([image])[0]
    assert batch.input_size == (48, 80) and not batch.resized(0)
    assert model.transform.shape == (64, 64) and model.transform.size == 64
    if len(detections["boxes"]):
        assert float(detections["boxes"][:, 0::2].max()) <= 80 and float(detections["boxes"][:, 1::2].max()) <= 48
