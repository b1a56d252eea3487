"""`detseg bench growth` (Net2Net): a tiny run writes every arm x seed, the summary keys, a function-preserving
growth and the figure; seconds_to_target finds the first epoch at the target, or None."""
from __future__ import annotations

import pytest

from detseg.bench import STUDIES, growth
from detseg.io import read_json

SUMMARY_KEYS = ("seeds", "target_acc", "grown_seconds_mean", "grown_seconds_std", "scratch_seconds_mean",
                "scratch_seconds_std", "grown_final_mean", "grown_final_std", "scratch_final_mean",
                "scratch_final_std", "speedup_mean", "function_preserved_max_diff")
TINY = {"data": {"name": "digits_images", "n_train": 192, "n_val": 96, "seed": 1, "classes": 4},
        "small": {"arch": "mlp", "width": 8, "depth": 1}, "big": {"arch": "mlp", "width": 16, "depth": 2},
        "hparams": {"lr": 0.05, "dropout": 0.0, "batch_size": 64, "weight_decay": 5e-4, "optimizer": "sgd"},
        "small_epochs": 2, "grown_epochs": 1, "seeds": (0, 1), "tolerance": 0.005, "threads": 1}


def test_tiny_study_writes_every_arm_and_seed(tmp_path, monkeypatch):
    monkeypatch.setitem(growth.SETTINGS, True, TINY)
    returned = growth.run(tmp_path, quick=True)
    results = read_json(tmp_path / "results.json")
    assert results["summary"] == returned["summary"]
    assert results["settings"]["seeds"] == [0, 1] and results["settings"]["small_epochs"] == 2
    assert {(row["seed"], row["arm"]) for row in results["rows"]} == \
        {(seed, arm) for seed in (0, 1) for arm in growth.ARMS}
    summary = results["summary"]
    assert all(key in summary for key in SUMMARY_KEYS)
    assert summary["seeds"] == 2
    assert summary["function_preserved_max_diff"] < 1e-4
    for row in results["rows"]:
        assert len(row["epochs"]) == 3 and row["target_acc"] == summary["target_acc"]
        assert [epoch["epoch"] for epoch in row["epochs"]] == [1, 2, 3]
        seconds = [epoch["seconds"] for epoch in row["epochs"]]
        assert seconds == sorted(seconds) and seconds[0] > 0
        assert row["final_acc"] == row["epochs"][-1]["val_acc"]
        assert row["seconds_to_target"] == growth.seconds_to_target(row["epochs"], summary["target_acc"])
    by_arm = {(row["seed"], row["arm"]): row for row in results["rows"]}
    for seed in (0, 1):
        grown, small = by_arm[seed, "grown"], by_arm[seed, "small"]
        # The grown arm's clock starts with the teacher's epochs, then the growth.
        assert grown["epochs"][:2] == small["epochs"][:2]
        assert grown["growth"]["seconds"] >= small["epochs"][1]["seconds"]
        assert grown["epochs"][2]["seconds"] > grown["growth"]["seconds"]
    assert (tmp_path / "growth.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "| grown |" in report and "| scratch |" in report and "upported" in report
    assert STUDIES["growth"] == "detseg.bench.growth"


def test_seconds_to_target_is_the_first_epoch_at_the_target():
    curve = [{"epoch": 1, "seconds": 1.5, "val_acc": 0.5}, {"epoch": 2, "seconds": 3.0, "val_acc": 0.8},
             {"epoch": 3, "seconds": 4.5, "val_acc": 0.7}, {"epoch": 4, "seconds": 6.0, "val_acc": 0.9}]
    assert growth.seconds_to_target(curve, 0.8) == 3.0          # reached exactly at epoch 2, not re-counted later
    assert growth.seconds_to_target(curve, 0.85) == 6.0
    assert growth.seconds_to_target(curve, 0.4) == 1.5
    assert growth.seconds_to_target(curve, 0.95) is None        # never reached
    assert growth.seconds_to_target([], 0.5) is None


def test_summary_speedup_over_seeds_where_both_reached():
    def row(seed, arm, reached, final=0.9):
        return {"seed": seed, "arm": arm, "seconds_to_target": reached, "final_acc": final,
                "epochs": [{"epoch": 1, "seconds": 10.0, "val_acc": final}],
                "growth": {"max_logit_diff": 1e-6} if arm in ("grown", "random_pad") else None}
    rows = [row(0, "scratch", 8.0), row(0, "grown", 4.0), row(1, "scratch", 9.0), row(1, "grown", None),
            row(0, "small", None), row(1, "small", None), row(0, "random_pad", None), row(1, "random_pad", 6.0)]
    summary = growth.summarize(rows, 0.9)
    assert summary["speedup_mean"] == pytest.approx(2.0) and summary["grown_reached"] == 1
    assert summary["scratch_seconds_mean"] == pytest.approx(8.5) and summary["grown_seconds_std"] == 0.0
    assert summary["small_seconds_mean"] is None and summary["function_preserved_max_diff"] == 1e-6
    assert growth.verdict(summary).startswith("**Not supported**")
