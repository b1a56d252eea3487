"""The CLI contract: commands work end to end; bad input is one line on stderr and exit status 2."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from .conftest import ROOT, set_at


def _one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def convnet_run(tmp_path_factory):
    from .conftest import invoke_cli

    out = tmp_path_factory.mktemp("run") / "convnet"
    result = invoke_cli("train", "cls/convnet", "--epochs", "1", "--out", out, "--quiet", "train_size=256",
                     "val_size=64", "width=8")
    assert result.returncode == 0, result.stderr
    return out


def test_models_lists_the_registry(cli):
    result = cli("models")
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"cls/mlp", "cls/convnet"} <= set(names)


def test_config_lists_keys(cli):
    result = cli("config", "cls/convnet")
    assert result.returncode == 0 and "dropout=0.0" in result.stdout and "lr=0.003" in result.stdout


@pytest.mark.parametrize("args, fragments", [
    (["train", "det/nonexistent"], ["unknown model 'det/nonexistent'", "cls/mlp"]),
    (["train", "cls/mlp", "colour=blue"], ["unknown config key 'colour'", "dropout"]),
    (["train", "cls/mlp", "dropout=1.5"], ["dropout=1.5", "<= 0.99"]),
    (["train", "cls/mlp", "width=wide"], ["width=wide", "integer"]),
    (["train", "cls/mlp", "--epochs", "-3"], ["epochs=-3", ">= 0"]),
    (["train", "cls/mlp", "--data", "imagenet"], ["--data imagenet"]),
    (["train", "cls/convnet", "--data", "spirals", "--epochs", "0", "train_size=20", "val_size=10"],
     ["cls/convnet needs image data"]),
    (["train", "cls/mlp", "--resume"], ["--resume needs --out"]),
    (["eval", "missing/best.pt"], ["missing/best.pt", "checkpoint not found"]),
    (["predict", "missing.pt", "x.png"], ["missing.pt", "checkpoint not found"]),
    (["bench", "nonsense"], ["unknown study 'nonsense'"]),
])
def test_bad_input_is_one_line_and_exit_2(cli, args, fragments):
    _one_line_error(cli(*args), *fragments)


def test_not_a_checkpoint(cli, tmp_path):
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"this is not a checkpoint")
    _one_line_error(cli("eval", fake), str(fake), "not a readable detseg checkpoint")


def test_predict_any_image_and_reject_non_images(cli, convnet_run, tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 170), dtype=np.uint8)).save(gray)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.full((40, 50, 4), 128, dtype=np.uint8)).save(rgba)
    out = tmp_path / "pred"
    result = cli("predict", convnet_run / "best.pt", gray, rgba, "--out", out)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(answers) == 2 and all(0 <= a["score"] <= 1 for a in answers)
    assert (out / "gray_pred.png").is_file() and (out / "rgba_pred.png").is_file()
    assert len(json.loads((out / "predictions.json").read_text())) == 2

    text = tmp_path / "notes.png"
    text.write_text("hello, not an image")
    _one_line_error(cli("predict", convnet_run / "best.pt", text), str(text))
    _one_line_error(cli("predict", convnet_run / "best.pt", tmp_path / "absent.png"), "absent.png")


def test_eval_reproduces_the_run_metrics(cli, convnet_run):
    result = cli("eval", convnet_run)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    saved = json.loads((convnet_run / "metrics.json").read_text())
    assert metrics["top1"] == saved["top1"]


def test_run_directory_pictures(convnet_run):
    for name in ("curves.png", "val_predictions.png"):
        with Image.open(convnet_run / name) as picture:
            assert picture.size[0] > 100 and picture.size[1] > 100


# --- data sets through the CLI ------------------------------------------------------------------------------------

def _coco(tmp_path, mutate=None):
    """A valid two-image COCO file, optionally broken by ``mutate(data)``."""
    for index in (1, 2):
        Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(tmp_path / f"{index}.png")
    data = {
        "images": [{"id": 1, "file_name": "1.png", "width": 60, "height": 40},
                   {"id": 2, "file_name": "2.png", "width": 60, "height": 40}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 10], "area": 200,
                         "iscrowd": 0},
                        {"id": 11, "image_id": 2, "category_id": 2, "bbox": [0, 0, 60, 40], "area": 2400,
                         "iscrowd": 1}],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
    }
    if mutate:
        mutate(data)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("mutate, fragments", [
    (set_at(["annotations", 0, "bbox"], [5, 5, -20, 10]), ["annotation id 10", "bbox", "-20"]),
    (set_at(["annotations", 0, "bbox"], [50, 5, 20, 10]), ["annotation id 10", "bbox"]),
    (set_at(["annotations", 0, "category_id"], 9), ["annotation id 10", "category_id", "9"]),
    (set_at(["annotations", 0, "image_id"], 77), ["annotation id 10", "image_id", "77"]),
    (set_at(["images", 1, "file_name"], "gone.png"), ["image id 2", "gone.png"]),
    (set_at(["images", 0, "width"], -60), ["image id 1", "width", "-60"]),
])
def test_malformed_coco_is_one_line_and_exit_2(cli, tmp_path, mutate, fragments):
    path = _coco(tmp_path, mutate)
    _one_line_error(cli("data", "check", path), str(path), *fragments)


def test_truncated_json_and_corrupt_image(cli, tmp_path):
    path = _coco(tmp_path)
    path.write_text(path.read_text()[:-40])
    _one_line_error(cli("data", "check", path), str(path))
    path = _coco(tmp_path)
    (tmp_path / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _one_line_error(cli("data", "check", path), "2.png")


def test_scenes_written_then_checked(cli, tmp_path):
    out = tmp_path / "scenes"
    result = cli("data", "scenes", "--out", out, "--train", "6", "--val", "3", "--size", "64", "--seed", "4")
    assert result.returncode == 0, result.stderr
    check = cli("data", "check", out / "train.json")
    assert check.returncode == 0, check.stderr
    summary = json.loads(check.stdout)
    assert summary["images"] == 6 and summary["annotations"] >= 6 and summary["with_captions"] == summary[
        "annotations"]


# --- HyperQuest's web stack is an optional extra -----------------------------------------------------------------

WEB_STACK = ("fastapi", "uvicorn", "sqlalchemy", "plotly", "itsdangerous")


@pytest.mark.parametrize("module", WEB_STACK)
def test_hyperquest_without_the_extra_is_one_line_and_exit_2(cli, monkeypatch, tmp_path, module):
    monkeypatch.setitem(sys.modules, module, None)                 # ``import module`` now raises ImportError
    # Were the check missing, importing the server must fail here rather than start one.
    monkeypatch.setitem(sys.modules, "detseg.hyperquest.app", None)
    line = _one_line_error(cli("hyperquest", "--data-dir", tmp_path / "hq"), "pip install 'detseg[hyperquest]'",
                           module)
    assert line.startswith("error: ")
    assert not (tmp_path / "hq").exists()                           # nothing was set up


def test_bench_hyperquest_without_the_extra_is_one_line_and_exit_2(cli, monkeypatch, tmp_path):
    import detseg.bench.hyperquest as bench

    def must_not_run(*args, **kwargs):
        raise AssertionError("the benchmark started without the web extra")

    monkeypatch.setattr(bench, "epoch_timing", must_not_run)
    monkeypatch.setattr(bench, "load_run", must_not_run)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    _one_line_error(cli("bench", "hyperquest", "--out", tmp_path / "bench"), "pip install 'detseg[hyperquest]'",
                    "fastapi")


def test_core_modules_do_not_import_the_web_stack():
    code = ("import detseg.cli, detseg.api, detseg.registry; import sys; "
            f"assert not any(m.split('.')[0] in {WEB_STACK!r} for m in sys.modules), "
            f"sorted(m for m in sys.modules if m.split('.')[0] in {WEB_STACK!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_commands_work_with_the_web_stack_unimportable():
    """A fresh interpreter where importing any web module fails still lists models and their config."""
    code = "\n".join([
        "import sys",
        f"for name in {WEB_STACK!r}: sys.modules[name] = None",
        "from click.testing import CliRunner",
        "import detseg.api, detseg.registry",
        "from detseg.cli import main",
        "for args in (['models'], ['config', 'cls/mlp']):",
        "    result = CliRunner().invoke(main, args, catch_exceptions=False)",
        "    assert result.exit_code == 0, (args, result.output)",
        "    assert result.stdout.strip(), args",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
