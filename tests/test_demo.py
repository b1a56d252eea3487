"""The tour (`make demo`) end to end at a tiny scale: every family trains, predicts and lands in tour.png."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from detseg import demo
from detseg.io import load_yaml

TINY = {"train_size": 16, "batch_size": 4}


def test_the_tour_trains_every_family_and_draws_one_row_each(tmp_path, capsys):
    families = tuple(dataclasses.replace(family, overrides={**family.overrides, **TINY, "epochs": 1})
                     for family in demo.FAMILIES)
    results = demo.main(tmp_path, families, scale=0.02, val_scenes=4)
    assert set(results) == {family.title for family in demo.FAMILIES} | {"total_seconds"}
    for family in demo.FAMILIES:
        assert family.metric in results[family.title], family.title
        run = tmp_path / f"run-{family.model.replace('/', '-')}"
        assert (run / "best.pt").is_file() and (run / "metrics.json").is_file()
    assert 0.0 <= results["dense captioning"]["attributes"] <= 1.0
    picture = np.asarray(Image.open(tmp_path / "tour.png"))
    rows = len(demo.FAMILIES)
    assert picture.shape[0] >= rows * 224 and picture.shape[1] >= 2 * demo.NEW_SCENES * 224
    # every cell holds a drawing, not the white canvas
    for row in range(rows):
        top = 22 + row * (224 + 6)
        for column in range(2 * demo.NEW_SCENES):
            left = 190 + column * (224 + 6)
            cell = picture[top:top + 100, left:left + 100]
            assert (cell < 250).any(), (row, column)
    printed = capsys.readouterr().out
    assert "==== detseg tour ====" in printed and "tour.png" in printed
    for family in demo.FAMILIES:
        assert family.model in printed
    # a row that starts from an earlier row's weights records that checkpoint as its init
    for family in demo.FAMILIES:
        if family.init_from is not None:
            config = load_yaml(tmp_path / f"run-{family.model.replace('/', '-')}" / "config.yaml")
            assert config["init"] == str(tmp_path / f"run-{family.init_from.replace('/', '-')}" / "best.pt")
            assert f"started from {family.init_from}" in printed


def test_a_row_starting_from_a_model_no_earlier_row_trains_is_refused(tmp_path):
    family = demo.Family("instances", "inst/mask_rcnn", 1, "segm_ap50", None, {**TINY, "epochs": 1},
                         init_from="det/yolo")
    with pytest.raises(ValueError, match="det/yolo, which no earlier row trains"):
        demo.main(tmp_path, (family,), scale=0.02, val_scenes=2)
