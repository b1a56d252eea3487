"""Fine-tuning: ``detseg train MODEL --init CHECKPOINT`` loads the tensors whose name and shape match, only."""
import pytest
import torch

from detseg import api
from detseg.engine.checkpoint import load_checkpoint, load_matching
from detseg.errors import ConfigError
from detseg.io import load_yaml

# Spirals: 3 classes, moons: 2, both 2-D points: an MLP for one differs from one for the other in its classifier.
# No batch norm and lr=0 for the fine-tuning runs: their last.pt then holds the weights they started from.
TINY = {"train_size": 120, "val_size": 30, "width": 16, "depth": 2, "batchnorm": False}


def _train(out, data: str, **kwargs) -> None:
    overrides = {**TINY, **kwargs.pop("overrides", {})}
    api.train("cls/mlp", data=data, epochs=1, out=out, overrides=overrides, progress=False, **kwargs)


def test_init_loads_matching_tensors_and_leaves_the_class_layers_fresh(tmp_path, capsys):
    _train(tmp_path / "source", "spirals", verbose=False)
    _train(tmp_path / "tuned", "moons", overrides={"lr": 0.0}, init=tmp_path / "source")
    _train(tmp_path / "fresh", "moons", overrides={"lr": 0.0}, verbose=False)
    printed = capsys.readouterr().out
    assert "init from" in printed and "(cls/mlp): loaded" in printed
    assert "network.classifier.weight [3, 16] -> [2, 16]" in printed

    source = load_checkpoint(tmp_path / "source" / "best.pt")["model"]
    tuned = load_checkpoint(tmp_path / "tuned" / "last.pt")["model"]
    fresh = load_checkpoint(tmp_path / "fresh" / "last.pt")["model"]
    skipped = {name for name in tuned if source[name].shape != tuned[name].shape}
    assert skipped == {"network.classifier.weight", "network.classifier.bias"}    # exactly the class-dependent ones
    for name, tensor in tuned.items():
        # Loaded tensors (the standardisation statistics included) equal the source; the rest are the run's own
        # fresh initialisation, the same as a run without --init.
        expected = fresh[name] if name in skipped else source[name]
        assert torch.equal(tensor, expected), name
    assert not torch.equal(tuned["network.blocks.0.0.weight"], fresh["network.blocks.0.0.weight"])
    assert load_yaml(tmp_path / "tuned" / "config.yaml")["init"] == str(tmp_path / "source")


def test_load_matching_reports_mismatches_and_missing_names_and_refuses_no_match():
    source = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    target = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 5), torch.nn.Linear(5, 2))
    report = load_matching(target, source.state_dict(), origin="source.pt")
    assert report.loaded == ["0.weight", "0.bias"]
    assert [name for name, _, _ in report.mismatched] == ["1.weight", "1.bias"]
    assert report.missing == ["2.weight", "2.bias"] and report.unexpected == []
    assert torch.equal(target[0].weight, source[0].weight)
    assert "loaded 2 tensors" in report.summary() and "1.weight [3, 8] -> [5, 8]" in report.summary()
    with pytest.raises(ConfigError, match="no tensor of the checkpoint matches"):
        load_matching(torch.nn.Conv2d(3, 3, 1), source.state_dict(), origin="source.pt")


def test_bad_init_path_and_init_with_resume_exit_2(tmp_path, cli):
    result = cli("train", "cls/mlp", "--data", "moons", "--init", tmp_path / "nowhere.pt", "--quiet")
    assert result.returncode == 2 and "nowhere.pt" in result.stderr and "not found" in result.stderr
    result = cli("train", "cls/mlp", "--data", "moons", "--init", tmp_path, "--resume", "--out", tmp_path, "--quiet")
    assert result.returncode == 2 and "--init" in result.stderr and "--resume" in result.stderr
