"""The engine: learning, exact resume after SIGKILL, time budgets, hyperparameter changes, snapshots, files."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from detseg import api, registry
from detseg.config import resolve
from detseg.engine.checkpoint import load_checkpoint
from detseg.engine.trainer import EpochSampler, Trainer, lr_factor

from .conftest import ROOT

SMALL = ["--data", "gaussians", "train_size=1200", "val_size=300", "width=32", "lr=0.01", "--quiet"]


def _trainer(overrides=None):
    entry = registry.get("cls/mlp")
    config = resolve(entry.all_options(), {"train_size": 600, "val_size": 200, "width": 32, "epochs": 4,
                                           **(overrides or {})})
    api.seed_everything(config["seed"])
    task = entry.make_task(config)
    bundle = task.make_data("gaussians", None)
    api.seed_everything(config["seed"])
    return Trainer(entry.build(config, bundle.info), task, bundle, config, progress=False)


def test_evaluate_changes_no_buffer_and_no_training_randomness():
    """Evaluation runs every module in eval mode (batch-norm statistics stay put, so exact resume still holds) and on
    a forked RNG (what training draws next is the same whether or not it evaluated); one pass per batch is timed."""
    trainer = _trainer({"dropout": 0.3})
    trainer.run_epoch()
    buffers = {name: value.clone() for name, value in trainer.model.named_buffers()}
    assert any("running_mean" in name for name in buffers)
    rng = torch.get_rng_state()
    first = trainer.evaluate()
    assert trainer.model.training                                    # the trainer's mode is restored
    assert all(torch.equal(buffers[name], value) for name, value in trainer.model.named_buffers())
    assert torch.equal(rng, torch.get_rng_state())
    second = trainer.evaluate()
    assert {key: second[key] for key in ("top1", "val_loss")} == {key: first[key] for key in ("top1", "val_loss")}
    assert first["infer_ms_per_image"] > 0 and math.isfinite(first["val_loss"])


def test_training_learns_and_writes_every_run_file(tmp_path, cli):
    result = cli("train", "cls/mlp", *SMALL, "--epochs", "4", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    for name in ("config.yaml", "last.pt", "best.pt", "history.csv", "curves.png", "metrics.json"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert list(rows[0])[:6] == ["epoch", "seconds", "lr", "train_loss", "val_loss", "top1"]
    assert float(rows[-1]["train_loss"]) < 0.7 * float(rows[0]["train_loss"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["top1"] > 0.6  # 5 Gaussian-mixture classes: chance is 0.2
    for key in ("epochs", "train_seconds", "train_images_per_second", "infer_ms_per_image", "params"):
        assert key in metrics
    assert metrics["epochs"] == 4 and metrics["params"] > 0


def test_same_seed_same_metrics_different_seed_different(tmp_path, cli):
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert cli("train", "cls/mlp", *SMALL, "--epochs", "2", "--seed", seed, "--out", tmp_path / name).returncode == 0
        outs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert outs[0]["val_loss"] == outs[1]["val_loss"] and outs[0]["top1"] == outs[1]["top1"]
    assert outs[0]["val_loss"] != outs[2]["val_loss"]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, cli):
    args = ["train", "cls/mlp", "--data", "gaussians", "train_size=3000", "val_size=300", "width=64",
            "batch_size=8", "checkpoint_seconds=0.05", "--epochs", "3", "--seed", "5", "--quiet"]
    reference = cli(*args, "--out", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr

    run = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "detseg.cli", *args, "--out", str(run)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        killed_at = _kill_after_a_mid_epoch_checkpoint(process, run / "last.pt")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert killed_at is not None, "the run finished before it was seen saving a mid-epoch checkpoint"
    assert not (run / "metrics.json").exists()
    # What was on disk when the child died is exactly what was observed: the resume starts mid-epoch.
    state = load_checkpoint(run / "last.pt")["trainer"]
    assert (state["epoch"], state["step_in_epoch"]) == killed_at

    resumed = cli(*args, "--out", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    got = json.loads((run / "metrics.json").read_text())
    assert got["top1"] == expected["top1"] and got["val_loss"] == expected["val_loss"], killed_at
    history = [row["train_loss"] for row in csv.DictReader(open(run / "history.csv"))]
    assert history == [row["train_loss"] for row in csv.DictReader(open(tmp_path / "reference" / "history.csv"))]


def _frozen(process: subprocess.Popen) -> bool:
    """SIGSTOP ``process`` and wait until it has actually stopped; False (and its exit code kept) if it ended."""
    os.kill(process.pid, signal.SIGSTOP)
    _, status = os.waitpid(process.pid, os.WUNTRACED)
    if os.WIFSTOPPED(status):
        return True
    process.returncode = os.waitstatus_to_exitcode(status)     # reaped here, so tell Popen
    return False


def _kill_after_a_mid_epoch_checkpoint(process: subprocess.Popen, checkpoint) -> tuple[int, int] | None:
    """SIGKILL ``process`` once it has written a checkpoint in the middle of its second epoch or later.

    The decision is made on the checkpoint's content, never on elapsed time, and each look at ``checkpoint`` happens
    with the child stopped (SIGSTOP), so it cannot write another checkpoint, or finish, between the look and the
    kill. Returns the observed (epoch, step_in_epoch), or None when the run ended first.
    """
    hang_guard = time.monotonic() + 900        # only so that a hung child fails the test instead of blocking it
    while process.poll() is None and time.monotonic() < hang_guard:
        if checkpoint.is_file():
            if not _frozen(process):
                return None
            state = load_checkpoint(checkpoint)["trainer"]
            if state["epoch"] >= 1 and state["step_in_epoch"] > 0:
                os.kill(process.pid, signal.SIGKILL)
                return state["epoch"], state["step_in_epoch"]
            os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.05)                       # a polling interval only: what decides is the checkpoint's content
    return None


def test_time_budget_stops_after_the_crossing_step_and_still_evaluates(tmp_path, cli):
    result = cli("train", "cls/mlp", *SMALL, "batch_size=4", "--epochs", "50", "--time-budget", "1.5",
                 "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_seconds"] >= 1.5                        # the budget was crossed (no upper bound on time)
    assert metrics["epochs"] < 50 and metrics["top1"] > 0.2       # ... and it stopped the run


def test_set_hparams_snapshot_and_revert():
    trainer = _trainer()
    trainer.run_epoch()
    snapshot = trainer.snapshot()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.set_hparams(lr=0.05, weight_decay=0.0, batch_size=32)
    assert trainer.config["lr"] == 0.05 and trainer.steps_per_epoch() == math.ceil(600 / 32)
    trainer.run_epoch()
    assert trainer.epoch == 2
    assert any(not torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    trainer.revert(snapshot)
    assert trainer.epoch == 1 and trainer.config["lr"] == snapshot["trainer"]["config"]["lr"]
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    # Training from the snapshot twice gives the same result: RNG state travels with it.
    first = trainer.run_epoch()["loss"]
    trainer.revert(snapshot)
    assert trainer.run_epoch()["loss"] == first
    with pytest.raises(KeyError):
        trainer.set_hparams(colour="blue")


def test_gradient_clipping_and_sgd_step_schedule_train():
    trainer = _trainer({"optimizer": "sgd", "lr": 0.1, "schedule": "step", "step_epochs": 1, "gamma": 0.5,
                        "grad_clip": 1.0, "warmup_epochs": 0.5})
    losses = [trainer.run_epoch()["loss"] for _ in range(3)]
    assert losses[-1] < losses[0]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2, rel=1e-6)


def test_lr_schedules():
    config = {"schedule": "cosine", "gamma": 0.1, "step_epochs": 2}
    assert lr_factor(config, 0.0, 0, 0.0) == 1.0
    assert lr_factor(config, 0.5, 0, 0.0) == pytest.approx(0.5)
    assert lr_factor(config, 1.0, 0, 0.0) == pytest.approx(0.0)
    assert lr_factor(config, 0.05, 0, 0.1) == pytest.approx(0.5)  # halfway through warm-up
    assert lr_factor({**config, "schedule": "step"}, 0.9, 4.5, 0.0) == pytest.approx(0.01)


def test_epoch_sampler_shards_and_skips():
    full = EpochSampler(10, seed=1, epoch=2).indices
    assert sorted(full) == list(range(10)) and full != list(range(10))
    assert full == EpochSampler(10, seed=1, epoch=2).indices != EpochSampler(10, seed=1, epoch=3).indices
    shards = [EpochSampler(10, 1, 2, rank=r, world=3).indices for r in range(3)]
    assert all(len(s) == 4 for s in shards) and set(sum(shards, [])) == set(range(10))
    assert EpochSampler(10, 1, 2, skip=4).indices == full[4:]


def test_torchrun_two_cpu_processes(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "detseg.cli",
                             "train", "cls/mlp", *SMALL, "--epochs", "2", "--out", str(tmp_path / "ddp")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["top1"] > 0.6 and metrics["epochs"] == 2
    # Each process saw half of the data per epoch: 1200 / 2 / 64 -> 10 steps.
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["trainer"]["global_step"] == 20
