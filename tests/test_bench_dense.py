"""The segmentation and localization studies' measuring pieces, on micro configurations (the studies are slow)."""
import json
import math

import pytest
import torch

from detseg.bench import STUDIES, localization
from detseg.bench import segmentation as seg_bench
from detseg.models.segmentation.encoder_decoder import EncoderDecoder
from detseg.models.segmentation.fcn_fullres import FullResolutionFCN


def test_both_studies_are_registered():
    assert STUDIES["segmentation"] == "detseg.bench.segmentation"
    assert STUDIES["localization"] == "detseg.bench.localization"


def test_checkerboard_score_is_one_for_a_checkerboard_and_zero_for_flat_or_smooth_maps():
    rows, columns = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    checkerboard = ((rows + columns) % 2).float() * 2 - 1                     # +1 / -1 every pixel
    assert seg_bench.checkerboard_score(checkerboard) == pytest.approx(1.0)
    assert seg_bench.checkerboard_score(torch.full((3, 32, 32), 7.0)) == 0.0
    stripes = (columns % 2).float()                                           # flips every pixel along x only
    assert seg_bench.checkerboard_score(stripes) == pytest.approx(1.0)
    smooth = torch.sin(rows.float() / 32 * math.pi) + 3.0
    assert seg_bench.checkerboard_score(smooth) < 0.01
    # Half checkerboard, half smooth, with equal energies: the share is in between.
    mixed = torch.stack([checkerboard, torch.sin(columns.float() / 32 * 2 * math.pi) * math.sqrt(2)])
    assert 0.3 < seg_bench.checkerboard_score(mixed) < 0.7


def test_bed_of_nails_answers_a_flat_image_with_more_checkerboard_than_nearest():
    torch.manual_seed(0)
    nails = EncoderDecoder(8, width=8, depth=2, up="bed_of_nails", skips=0)
    torch.manual_seed(0)
    nearest = EncoderDecoder(8, width=8, depth=2, up="nearest", skips=0)
    nails_score = seg_bench.flat_input_checkerboard(nails, size=32)
    assert nails_score > 0.2
    assert seg_bench.flat_input_checkerboard(nearest, size=32) < 0.1 * nails_score


def test_full_resolution_costs_more_than_the_encoder_decoder_at_equal_width_and_context():
    ratios = []
    for size, depth in ((32, 3), (64, 4)):
        encdec = EncoderDecoder(8, width=8, depth=depth)
        field_side = seg_bench.receptive_field(encdec, size=size)
        assert field_side == size                 # poolings and the decoder: the whole image reaches every pixel
        fcn = FullResolutionFCN(8, width=8, depth=(field_side - 1) // 2)
        ratios.append(seg_bench.inference_flops(fcn, size=size) / seg_bench.inference_flops(encdec, size=size))
    assert seg_bench.receptive_field(fcn, size=80) == 2 * ((64 - 1) // 2) + 1     # 2 px per 3x3 layer
    # Seeing the whole image at full resolution costs more, and the more so the larger the image.
    assert 1.0 < ratios[0] < ratios[1]
    assert seg_bench.train_memory_bytes(fcn, size=64) > 2 * seg_bench.train_memory_bytes(encdec, size=64)
    # Memory grows with the image: four times the pixels, about four times the activations.
    small, large = (seg_bench.train_memory_bytes(fcn, size=side) for side in (16, 32))
    assert 3.5 < large / small < 4.5
    assert seg_bench.inference_peak_bytes(fcn, size=32) > 0


def test_native_scores_read_the_classifier_before_the_bilinear_upsampling():
    model = EncoderDecoder(8, width=4, depth=2, stem_stride=2).eval()
    with torch.no_grad():
        native = seg_bench.native_scores(model, torch.randn(1, 3, 32, 32))
        assert native.shape == (1, 8, 16, 16)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 8, 32, 32)


def test_every_lecture_design_is_a_variant_and_max_unpool_only_follows_maxpool():
    found = seg_bench.variants()
    models = {variant.model for variant in found}
    assert models == {"seg/sliding_window", "seg/fcn_fullres", "seg/encoder_decoder"}
    pairs = {(v.knobs.get("down"), v.knobs.get("up")) for v in found if v.model == "seg/encoder_decoder"}
    assert ("maxpool", "max_unpool") in pairs and ("strided", "max_unpool") not in pairs
    assert len(pairs) == 9
    assert seg_bench.default_encdec_label() in {v.label for v in found}


def test_segmentation_variant_trains_and_is_measured(tmp_path):
    settings = {"train_size": 8, "val_size": 4, "image_size": 32, "time_budget": 0.0, "epochs": 1,
                "timing_runs": 1, "knobs": {"width": 4, "depth": 2, "batch_size": 4, "threads": 1}}
    variant = seg_bench.Variant("enc-dec strided + transposed", "seg/encoder_decoder",
                                {"down": "strided", "up": "transposed"})
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    row, model = seg_bench.run_variant(variant, settings, tmp_path / "run", images)
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert 0.0 <= row["miou"] <= 1.0 and row["epochs"] == 1
    assert row["gflops_per_image"] > 0 and row["train_memory_mb"] > 0 and row["ms_per_image"] > 0
    assert 0.0 <= row["checkerboard_init"] <= 1.0 and 0.0 <= row["checkerboard_trained"] <= 1.0
    picture = seg_bench.prediction_rows({"a": model}, images, torch.zeros(2, 32, 32, dtype=torch.long))
    assert picture.dtype == torch.uint8 and picture.shape[0] == 3


def test_localization_study_writes_results_with_every_schedule_and_weight(tmp_path, monkeypatch):
    tiny = {"train_size": 12, "val_size": 6, "epochs": 2, "seeds": (0,),
            "knobs": {"image_size": 32, "width": 4, "depth": 2, "hidden": 16, "batch_size": 6, "threads": 1}}
    monkeypatch.setitem(localization.SETTINGS, True, tiny)
    monkeypatch.setattr(localization, "BOX_WEIGHTS", (0.1, 100.0))
    results = localization.run(tmp_path, quick=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["schedules"]) == {"frozen", "joint", "schedule", "pretrained_frozen", "pretrained_joint"}
    assert saved["schedules"]["frozen"]["knobs"]["freeze_epochs"] == 2
    assert saved["schedules"]["schedule"]["knobs"]["freeze_epochs"] == 1
    assert set(saved["box_weights"]) == {"box_weight=0.1", "box_weight=100"}
    for result in saved["box_weights"].values():
        assert {"loc_acc", "top1", "box_iou", "cls_loss", "box_loss", "box_loss_weighted", "total_loss"} <= set(result)
        assert result["box_loss_weighted"] == pytest.approx(result["box_loss"] * result["knobs"]["box_weight"])
        assert len(result["loc_acc_per_epoch"]) == 2
    # The weight scales the box term: a 1000x larger weight gives a far larger weighted box loss.
    light, heavy = saved["box_weights"]["box_weight=0.1"], saved["box_weights"]["box_weight=100"]
    assert heavy["box_loss_weighted"] > 100 * light["box_loss_weighted"]
    assert (tmp_path / "report.md").is_file() and (tmp_path / "localization.png").is_file()
    assert results["schedules"].keys() == saved["schedules"].keys()


def test_class_weights_favour_rare_classes_and_keep_the_average_pixel_at_one():
    from detseg.models.segmentation.segmenter import class_weights
    share = [0.8, 0.15, 0.05, 0.0]
    assert class_weights(share, "none") is None
    for weighting in ("sqrt_inverse", "inverse"):
        weights = class_weights(share, weighting)
        assert weights[2] > weights[1] > weights[0]                       # rarer -> heavier
        assert float(sum(s * w for s, w in zip(share, weights))) == pytest.approx(1.0)
        assert weights[3] == 1.0                                         # absent class: nothing to weigh
    inverse = class_weights(share, "inverse")
    assert float(inverse[0] * share[0]) == pytest.approx(float(inverse[2] * share[2]))   # equal total per class
