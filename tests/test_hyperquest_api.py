"""HyperQuest through its HTTP API (FastAPI's TestClient, epochs in a worker thread, tiny data sets)."""
from __future__ import annotations

import csv
import io
import json
import threading

import pytest
import torch
from detseg.hyperquest import create_app
from detseg.hyperquest import jobs as jobs_module
from detseg.hyperquest import training as training_module

from .hyperquest_support import IMAGE_POOL, TestClient, make_settings, wait_idle, wait_until


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as client:
        yield client


def login(client, player_id="ann", name="Ann", survey=True) -> dict:
    response = client.post("/api/login", json={"player_id": player_id, "name": name})
    assert response.status_code == 200, response.text
    if survey:
        answers = {"experience": "intermediate", "courses": 2, "frameworks": ["pytorch"], "trained_before": True}
        assert client.post("/api/survey", json=answers).status_code == 200
    return response.json()


def new_trial(client) -> dict:
    response = client.post("/api/trials")
    assert response.status_code == 200, response.text
    return wait_idle(client, response.json()["id"])


def act(client, trial_id: int, **body):
    return client.post(f"/api/trials/{trial_id}/actions", json=body)


def train(client, trial_id: int, **body) -> dict:
    response = act(client, trial_id, action="train", **body)
    assert response.status_code == 200, response.text
    return wait_idle(client, trial_id)


def test_page_and_plotly_are_served_locally(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>HyperQuest</title>" in page.text
    assert '<script src="/vendor/plotly.min.js">' in page.text         # no CDN
    script = client.get("/vendor/plotly.min.js")
    assert script.status_code == 200 and len(script.content) > 1_000_000 and b"plotly" in script.content[:2000]
    assert client.get("/static/app.js").status_code == 200


def test_a_whole_trial_train_grow_revert_stop_leaderboard_export(client, settings):
    assert client.get("/api/me").status_code == 401
    login(client, survey=False)
    refused = client.post("/api/trials")
    assert refused.status_code == 409 and "survey" in refused.json()["detail"]
    login(client)
    trial = new_trial(client)
    tid, stats = trial["id"], trial["dataset"]["summary"]
    assert trial["state"] == "ready" and trial["history"] == []
    assert stats["kind"] == "vector" and 2 <= stats["num_classes"] <= 10
    assert 240 <= stats["train_size"] <= 320 and 80 <= stats["val_size"] <= 120
    assert 0 < stats["class_balance"] <= 1 and len(stats["class_counts_train"]) == stats["num_classes"]

    trial = train(client, tid, hparams={"lr": 0.05, "dropout": 0.1}, network={"arch": "mlp", "width": 32, "depth": 2})
    trial = train(client, tid)
    assert trial["state"] == "ready" and [row["epoch"] for row in trial["history"]] == [1, 2]
    for row in trial["history"]:
        assert row["train_loss"] > 0 and row["val_loss"] > 0 and 0 <= row["train_acc"] <= 1 and 0 <= row["val_acc"] <= 1
    assert trial["hparams"]["dropout"] == 0.1                    # kept from the first epoch
    epoch2 = trial["checkpoints"][-1]

    trial = act(client, tid, action="grow", how="wider", layer=0, factor=2).json()
    assert [layer["width"] for layer in trial["layers"]] == [64, 32, stats["num_classes"]]
    trial = act(client, tid, action="grow", how="deeper", layer=1).json()
    assert [layer["width"] for layer in trial["layers"]] == [64, 32, 32, stats["num_classes"]]
    assert trial["checkpoints"][-1]["val_acc"] == epoch2["val_acc"]   # growth keeps the function (and its score)
    trial = train(client, tid, hparams={"lr": 0.01})
    assert len(trial["history"]) == 3 and trial["history"][-1]["hparams"]["lr"] == 0.01
    assert len(trial["layers"]) == 4                               # the epoch trained the grown network

    trial = act(client, tid, action="revert", checkpoint_id=epoch2["id"]).json()
    assert trial["epoch"] == 2 and len(trial["history"]) == 2
    assert [layer["width"] for layer in trial["layers"]] == [32, 32, stats["num_classes"]]   # before the growth

    trial = act(client, tid, action="stop").json()
    assert trial["state"] == "finished" and trial["final"]["val_acc"] == epoch2["val_acc"]
    assert act(client, tid, action="train").status_code == 409

    def baselines_done():
        board = client.get("/api/leaderboard").json()
        return board if board["datasets"][0]["baselines"]["random_search"] is not None else None
    board = wait_until(baselines_done, timeout=90)
    assert board["overall"][0]["trial_id"] == tid and board["overall"][0]["player"] == "Ann"
    dataset = board["datasets"][0]
    assert dataset["entries"][0]["val_acc"] == epoch2["val_acc"]
    baselines = dataset["baselines"]
    assert baselines["random_search_draws"] == 5 and baselines["random_search_draws_done"] == 5
    assert baselines["majority"] == pytest.approx(max(stats["class_counts_val"]) / stats["val_size"], abs=0.05)
    for name in ("logistic_regression", "default_network", "random_search"):
        assert 0.0 <= baselines[name] <= 1.0
    # Networks beat guessing the majority class on the Gaussian blobs.
    assert baselines["default_network"] > baselines["majority"]

    export = client.get("/admin/export", headers={"Authorization": f"Bearer {settings.admin_token}"}).json()
    kinds = [row["kind"] for row in export["actions"] if row["status"] == "done"]
    assert kinds.count("train") == 3 and kinds.count("grow") == 2 and "revert" in kinds and "stop" in kinds
    assert {"login", "survey", "new_trial"} <= set(kinds)
    epochs = [row for row in export["actions"] if row["kind"] == "train" and row["status"] == "done"]
    assert all(row["result"]["val_acc"] is not None and row["started_at"] for row in epochs)
    assert [row["result"]["reason"] for row in export["actions"] if row["status"] == "rejected"] == [
        "answer the survey before your first trial", "cannot train: this trial is finished; start a new one"]
    assert export["players"][0]["survey"]["experience"] == "intermediate"
    assert len(export["checkpoints"]) == 5 and len(export["baselines"]) == 7
    table = client.get("/admin/export", params={"format": "csv", "table": "checkpoints"},
                       headers={"Authorization": f"Bearer {settings.admin_token}"})
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert len(rows) == 5 and json.loads(rows[0]["hparams"])["lr"] == 0.05


@pytest.mark.parametrize("body, field", [
    ({"action": "train", "hparams": {"lr": 0}}, "lr"),
    ({"action": "train", "hparams": {"lr": -0.1}}, "lr"),
    ({"action": "train", "hparams": {"lr": 11}}, "lr"),
    ({"action": "train", "hparams": {"dropout": 1.0}}, "dropout"),
    ({"action": "train", "hparams": {"batch_size": 100000}}, "batch_size"),
    ({"action": "train", "hparams": {"learning_rate": 0.1}}, "learning_rate"),
    ({"action": "train", "network": {"arch": "mlp", "width": 5000, "depth": 2}}, "width"),
    ({"action": "train", "network": {"arch": "convnet", "width": 16, "depth": 9}}, "depth"),
    ({"action": "grow", "how": "wider", "layer": 0, "factor": 1.0}, "factor"),
    ({"action": "grow", "how": "sideways", "layer": 0}, "how"),
    ({"action": "revert"}, "exactly one"),
    ({"action": "fly"}, "fly"),
])
def test_out_of_range_inputs_are_422_with_a_reason(client, body, field):
    login(client)
    tid = new_trial(client)["id"]
    response = act(client, tid, **body)
    assert response.status_code == 422
    assert field in json.dumps(response.json()["detail"])


def test_impossible_requests_for_this_trial_are_refused_with_reasons(client):
    login(client)
    tid = new_trial(client)["id"]
    response = act(client, tid, action="train", network={"arch": "convnet", "width": 8, "depth": 2})
    assert response.status_code == 422 and "vectors" in response.json()["detail"]
    assert act(client, tid, action="grow", how="deeper", layer=0).status_code == 409   # nothing trained yet
    assert act(client, tid, action="stop").status_code == 409
    train(client, tid, network={"arch": "mlp", "width": 300, "depth": 1})
    assert act(client, tid, action="train", network={"arch": "mlp", "width": 8, "depth": 1}).status_code == 422
    response = act(client, tid, action="grow", how="wider", layer=3, factor=2)
    assert response.status_code == 422 and "0..0" in response.json()["detail"]
    response = act(client, tid, action="grow", how="wider", layer=0, factor=4)          # 1200 > the 1024 cap
    assert response.status_code == 422 and "cap" in response.json()["detail"]
    response = act(client, tid, action="revert", epoch=7)
    assert response.status_code == 422 and "epoch 7" in response.json()["detail"]
    assert client.post(f"/api/trials/{tid}/actions", content="action=stop",
                       headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 415
    export = client.app.state.game.export("actions")
    assert sum(row["status"] == "rejected" for row in export) == 7                       # refusals are logged too


def test_another_players_trial_is_404_on_every_endpoint(client):
    login(client, "ann", "Ann")
    tid = new_trial(client)["id"]
    train(client, tid)
    other = TestClient(client.app)                    # its own cookie jar; the app is already running
    login(other, "bob", "Bob")
    assert other.get(f"/api/trials/{tid}").status_code == 404
    for body in ({"action": "train"}, {"action": "grow", "how": "deeper", "layer": 0},
                 {"action": "revert", "epoch": 1}, {"action": "stop"}):
        assert act(other, tid, **body).status_code == 404
    assert other.get("/api/trials").json() == []
    assert client.get(f"/api/trials/{tid}").json()["state"] == "ready"                  # untouched
    anonymous = TestClient(client.app)
    assert anonymous.get(f"/api/trials/{tid}").status_code == 401
    anonymous.cookies.set("hyperquest_session", "forged.value.here")
    assert anonymous.get(f"/api/trials/{tid}").status_code == 401
    # Someone else's player ID cannot be taken over with another name.
    assert anonymous.post("/api/login", json={"player_id": "ann", "name": "Mallory"}).status_code == 403


def test_admin_export_needs_the_token(client, settings):
    login(client)
    assert client.get("/admin/export").status_code == 403
    admin = {"Authorization": f"Bearer {settings.admin_token}"}
    assert client.get("/admin/export", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.get("/admin/export", params={"format": "csv"}, headers=admin).status_code == 422
    answer = client.get("/admin/export", params={"table": "players"}, headers=admin)
    assert answer.status_code == 200 and answer.json()["players"][0]["handle"] == "ann"


def test_a_diverged_epoch_is_shown_and_revert_still_works(client, monkeypatch):
    real_epoch = training_module.train_one_epoch

    def poisoned(trainer):                            # the weights blow up: every later loss is NaN
        with torch.no_grad():
            trainer.model.network.classifier.weight.fill_(float("inf"))
        return real_epoch(trainer)

    login(client)
    tid = new_trial(client)["id"]
    train(client, tid)
    monkeypatch.setattr(training_module, "train_one_epoch", poisoned)
    trial = train(client, tid, hparams={"lr": 5.0})
    assert trial["state"] == "diverged" and trial["history"][-1]["diverged"]
    assert trial["history"][-1]["train_loss"] is None            # NaN is stored as "no number"
    refused = act(client, tid, action="train")
    assert refused.status_code == 409 and "revert" in refused.json()["detail"]
    monkeypatch.setattr(training_module, "train_one_epoch", real_epoch)
    trial = act(client, tid, action="revert", epoch=1).json()
    assert trial["state"] == "ready" and len(trial["history"]) == 1
    trial = train(client, tid, hparams={"lr": 0.01})
    assert trial["state"] == "ready" and not trial["history"][-1]["diverged"] and trial["epoch"] == 2


def test_actions_wait_while_an_epoch_runs(client, monkeypatch):
    release = threading.Event()
    real_job = jobs_module.epoch_job

    def slow_job(*args):
        release.wait(30)
        return real_job(*args)

    monkeypatch.setattr(jobs_module, "epoch_job", slow_job)
    login(client)
    tid = new_trial(client)["id"]
    assert act(client, tid, action="train").json()["state"] in ("queued", "running")
    for body in ({"action": "train"}, {"action": "revert", "epoch": 1}, {"action": "stop"}):
        response = act(client, tid, **body)
        assert response.status_code == 409 and "wait" in response.json()["detail"]
    release.set()
    assert wait_idle(client, tid)["epoch"] == 1


def test_image_trials_train_an_mlp_or_a_convnet(tmp_path):
    with TestClient(create_app(make_settings(tmp_path, pool_seed=IMAGE_POOL, dataset_pool=1))) as client:
        login(client)
        trial = new_trial(client)
        assert trial["dataset"]["summary"]["input_shape"] == [3, 32, 32]
        trial = train(client, trial["id"], network={"arch": "convnet", "width": 4, "depth": 2})
        assert [layer["kind"] for layer in trial["layers"]] == ["conv", "conv", "classifier"]
        trial = act(client, trial["id"], action="grow", how="wider", layer=1, factor=1.5).json()
        assert trial["layers"][1]["width"] == 12 and trial["state"] == "ready"


def test_the_command_explains_a_bad_database_in_one_line(cli, tmp_path):
    for url, reason in (("nosuchdb://x", "not a usable database URL"),
                        ("postgresql://someone:hunter2@127.0.0.1:1/nothing", "cannot connect")):
        result = cli("hyperquest", "--db", url, "--data-dir", tmp_path / "data")
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0] and "hunter2" not in lines[0]
