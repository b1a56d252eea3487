"""The localization study's pre-trained rows: a classification-only pre-training on other images, its backbone loaded
into pretrained_frozen / pretrained_joint, on a micro configuration (the study itself is slow)."""
import json

import pytest
import torch

from detseg import api, registry
from detseg.bench import localization
from detseg.engine.checkpoint import load_checkpoint
from detseg.io import load_yaml

TINY = {"train_size": 12, "val_size": 6, "epochs": 1, "seeds": (0,),
        "knobs": {"image_size": 32, "width": 4, "depth": 2, "hidden": 16, "batch_size": 6, "threads": 1}}


def backbone_of(state_dict: dict) -> dict:
    return {name: tensor for name, tensor in state_dict.items() if name.startswith(localization.BACKBONE_PREFIX)}


def fresh_backbone(payload: dict, seed: int) -> dict:
    """The backbone api.train builds before any --init: the run's seed, then the registry's builder."""
    api.seed_everything(seed)
    return backbone_of(registry.get(localization.MODEL).build(payload["config"], payload["info"]).state_dict())


def same(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("localization")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(localization.SETTINGS, True, TINY)
        patch.setattr(localization, "BOX_WEIGHTS", (1.0,))
        results = localization.run(out, quick=True)
    return out, results


def test_study_writes_pretrained_rows_like_the_others_and_the_pretraining(study):
    out, results = study
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["schedules"]) == ["frozen", "joint", "schedule", "pretrained_frozen", "pretrained_joint"]
    assert saved["settings"]["epochs"] == 1 and saved["settings"]["seeds"] == [0]
    for name, row in saved["schedules"].items():
        assert {"knobs", "init", "seeds", "per_seed", "cls_loss", "total_loss", "train_seconds",
                *localization.METRICS} <= set(row), name
        assert row["init"] == ("pretrained" if name.startswith("pretrained_") else "random")
        assert row["per_seed"]["seed"] == [0] and row["seeds"] == 1
        for key in localization.METRICS:
            assert row["per_seed"][key] == [row[key]] and 0.0 <= row[key] <= 1.0
    assert saved["schedules"]["pretrained_frozen"]["knobs"] == saved["schedules"]["frozen"]["knobs"]
    assert saved["schedules"]["pretrained_joint"]["knobs"] == saved["schedules"]["joint"]["knobs"]
    assert set(saved["box_weights"]) == {"box_weight=1"}
    pretraining = saved["pretraining"]
    assert pretraining["knobs"]["box_weight"] == 0.0 and pretraining["seeds"] == 1
    assert 0.0 <= pretraining["top1"] <= 1.0 and pretraining["train_seconds"] > 0
    assert pretraining["per_seed"]["top1"] == [pretraining["top1"]]
    assert pretraining["total_seconds"] == pytest.approx(pretraining["train_seconds"])
    report = (out / "report.md").read_text()
    assert "pretrained_frozen" in report and "pretrained_joint" in report and "Pre-training" in report
    assert results["schedules"].keys() == saved["schedules"].keys()


def test_pretraining_uses_other_images_and_classification_only(study):
    out, _ = study
    pretrain_config = load_yaml(out / "runs" / "pretrain-seed0" / "config.yaml")["config"]
    run_config = load_yaml(out / "runs" / "pretrained_joint-seed0" / "config.yaml")
    assert pretrain_config["box_weight"] == 0.0
    assert pretrain_config["data_seed"] == localization.PRETRAIN_DATA_SEED != run_config["config"]["data_seed"]
    assert run_config["init"].endswith("backbone.pt")


def test_pretrained_backbone_is_loaded_and_frozen_backbones_stay_put(study):
    out, _ = study
    runs = out / "runs"
    transferred = load_checkpoint(runs / "pretrain-seed0" / "backbone.pt")["model"]
    pretrained = load_checkpoint(runs / "pretrain-seed0" / "best.pt")["model"]
    assert transferred and set(transferred) == set(backbone_of(pretrained))     # the backbone, nothing of the heads
    assert same(transferred, backbone_of(pretrained))
    frozen = load_checkpoint(runs / "frozen-seed0" / "best.pt")
    random_init = fresh_backbone(frozen, seed=0)
    assert not same(transferred, random_init)                                  # pre-training moved the weights
    assert same(backbone_of(frozen["model"]), random_init)                     # frozen at random init: unchanged
    pretrained_frozen = backbone_of(load_checkpoint(runs / "pretrained_frozen-seed0" / "best.pt")["model"])
    assert same(pretrained_frozen, transferred)                                # loaded, then frozen: unchanged
    pretrained_joint = backbone_of(load_checkpoint(runs / "pretrained_joint-seed0" / "best.pt")["model"])
    assert not same(pretrained_joint, transferred)                             # joint fine-tuning moved it
