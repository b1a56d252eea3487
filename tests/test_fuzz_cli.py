"""Fuzzing the command line: every key=value knob of every model, the train / data / predict flags, and damaged or
foreign checkpoints. Each case ends in one of two ways: a single ``error: ...`` line on stderr naming the flag, knob,
value or file, with exit status 2 - or, where the input is valid, the command goes on (a run's validation passes and
its model builds; a prediction is written). Never a traceback, never "internal error"."""
from __future__ import annotations

import io
import json
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import event, given, strategies as st
from PIL import Image

from detseg import api, registry
from detseg.cli import main
from detseg.config import resolve
from detseg.engine.checkpoint import load_checkpoint
from detseg.errors import ConfigError, one_line

from .fuzz_support import fuzz_settings

MODELS = registry.names()
# Values a user mistypes, and the edges of every type: empty, blank, NaN and infinities, overflowing exponents,
# huge integers, hex, non-ASCII digits, separators, control and non-ASCII characters.
NASTY = st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "1e309", "-1", "0", "1", "-0", "1e100", "3.5",
                         str(2**64), "0x10", "true", "off", "none", "1,2,3", ",", "8,,16", "-8,16", "١٢", "\x00",
                         "é", "9" * 40, "1e-320", "cpu", "cuda"])
VALUES = st.one_of(NASTY, st.integers(-2**70, 2**70).map(str), st.floats().map(repr),
                   st.text(st.characters(codec="utf-8"), max_size=8))


def _edges(option) -> list[str]:
    """Valid values an option allows at its edges: its default, bounds and choices (so combinations get built)."""
    values = [option.default, option.min, option.max, *(option.choices or ())]
    return [str(value) for value in values if value is not None]


class Reached(BaseException):
    """Raised where a valid run would start making its data: everything before (flags, knobs, the model's build
    on the meta device) passed. A BaseException, so that detseg's catch-all for bugs does not swallow it."""


def invoke(args: list[str], stop_at=None):
    """Run ``detseg ARGS`` in-process; "reached" when ``stop_at`` (module, attribute) was called, else the result."""
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as patch:
        if stop_at is not None:
            patch.setattr(*stop_at, lambda *a, **k: (_ for _ in ()).throw(Reached()))
        patch.setattr(api, "_use_machine_threads", lambda *a, **k: None)   # threads=1000 must not reach torch
        try:
            return runner.invoke(main, [str(arg) for arg in args])
        except Reached:
            event("accepted")
            return "reached"


def assert_one_clear_line(result, *named: str) -> str:
    """Exit 2 and one ``error:`` line that contains one of ``named`` (the knob, flag, value or file)."""
    assert not isinstance(result, str)
    event("refused")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (result.exit_code, lines)
    assert any(name and one_line(name) in lines[0] for name in named), (lines[0], named)
    return lines[0]


@fuzz_settings(max_examples=400)
@given(data=st.data())
@pytest.mark.timeout(120)
def test_every_knob_of_every_model(data, tmp_path_factory):
    model = data.draw(st.sampled_from(MODELS), label="model")
    options = registry.get(model).all_options()
    count = data.draw(st.integers(1, 3), label="knobs")
    keys = data.draw(st.lists(st.sampled_from(sorted(options)) | st.text(min_size=1, max_size=6), min_size=count,
                              max_size=count, unique=True), label="keys")
    # half of the known keys get a valid edge value, so that combinations of valid knobs get built too
    pairs = {key: data.draw(st.sampled_from(_edges(options[key])) if key in options and data.draw(st.booleans())
                            else VALUES, label=key) for key in keys}
    out = tmp_path_factory.mktemp("run")
    result = invoke(["train", model, *(f"{key}={value}" for key, value in pairs.items()), "--out", out, "--quiet"],
                    stop_at=(api, "seed_everything"))
    if result != "reached":
        # the message names the key it rejects, or the model when a combination of knobs is impossible
        # (the command line splits each pair at its first "=" and strips blanks, as the message then shows it)
        shown_keys = [f"{key}={value}".partition("=")[0].strip() for key, value in pairs.items()]
        assert_one_clear_line(result, *shown_keys, *(f"{key}={value}" for key, value in pairs.items()), *(value for value in pairs.values() if len(value) > 1), model)


def _wrong_values(option) -> list[str]:
    """Values ``option`` must refuse, or at least survive: another type, NaN, overflow, each side of its range."""
    values = ["not a value\x01", "nan", "inf", "1e309", ""]
    if option.min is not None:
        values.append(str(option.min - 1 if option.type is int else option.min - 0.5))
    if option.max is not None:
        values.append(str(option.max + 1 if option.type is int else option.max * 2 + 1))
    return values


def test_every_option_of_every_model_refuses_wrong_type_range_and_nan():
    """Not sampled but swept: every option of every model with every value of :func:`_wrong_values` is refused
    with one line naming it, or - for a value the option's type allows, a string knob's text - the model still
    builds (on the meta device) or its builder refuses the value by name."""
    cases = 0
    for model in MODELS:
        entry = registry.get(model)
        options = entry.all_options()
        for key, option in sorted(options.items()):
            for value in _wrong_values(option):
                cases += 1
                try:
                    config = resolve(options, {key: value})
                    api.check_buildable(entry, config, entry.make_task(config).placeholder_info(None))
                except ConfigError as error:
                    assert "\n" not in str(error) and key in str(error), (model, key, value, str(error))
                else:
                    assert option.type is str and option.choices is None, (model, key, value)
    assert cases > 4000


@fuzz_settings(max_examples=60)
@given(flag=st.sampled_from(["--epochs", "--time-budget", "--seed"]), value=VALUES,
       model=st.sampled_from(["cls/mlp", "det/faster_rcnn", "seg/encoder_decoder"]))
@pytest.mark.timeout(60)
def test_train_flags(flag, value, model, tmp_path_factory):
    result = invoke(["train", model, flag, value, "--out", tmp_path_factory.mktemp("run"), "--quiet"],
                    stop_at=(api, "seed_everything"))
    if result != "reached":
        knob = flag.lstrip("-").replace("-", "_")
        assert_one_clear_line(result, flag, knob, value)


@fuzz_settings(max_examples=50)
@given(flag=st.sampled_from(["--train", "--val", "--size", "--seed"]), value=VALUES)
@pytest.mark.timeout(60)
def test_data_scenes_flags(flag, value, tmp_path_factory):
    import detseg.data.export

    result = invoke(["data", "scenes", "--out", tmp_path_factory.mktemp("scenes"), flag, value],
                    stop_at=(detseg.data.export, "write_scenes"))
    if result != "reached":
        assert_one_clear_line(result, flag, value)


# ---- checkpoints: a tiny detector, then damaged and foreign copies of it -------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny-yolo")
    api.train("det/yolo", epochs=1, out=run, seed=0, progress=False, verbose=False,
              overrides={"train_size": 4, "val_size": 2, "batch_size": 2, "image_size": 64})
    image = tmp_path_factory.mktemp("images") / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    return run, image


@fuzz_settings(max_examples=45)
@given(flag=st.sampled_from(["--batch-size", "--workers", "--conf", "--max-det", "--device"]), value=VALUES)
@pytest.mark.timeout(120)
def test_predict_flags(flag, value, tiny_run, tmp_path_factory):
    run, image = tiny_run
    out = tmp_path_factory.mktemp("predict")
    result = invoke(["predict", run / "best.pt", image, "--out", out, "--quiet", flag, value])
    if result.exit_code == 0:
        event("accepted")
        assert json.loads((out / "predictions.json").read_text())
    else:
        assert_one_clear_line(result, flag, value)


def _payload_bytes(payload: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


# Ways a checkpoint can be wrong that still unpickle: each takes the payload and a random generator.
def _drop_field(payload, rng):
    del payload[rng.choice(sorted(payload))]


def _retype_field(payload, rng):
    payload[rng.choice(["model_name", "config", "info", "model", "trainer", "format"])] = rng.choice(
        [None, 7, "text", [], [1, 2], {"a": 1}, float("nan")])


def _foreign_model(payload, rng):
    payload["model_name"] = rng.choice([name for name in MODELS if name != payload["model_name"]] + ["det/nope"])


def _bad_knob(payload, rng):
    key = rng.choice(sorted(payload["config"]))
    payload["config"][key] = rng.choice([None, -5, "x", float("inf"), 10**12, [], {}])


def _bad_tensor(payload, rng):
    weights = payload["model"]
    key = rng.choice(sorted(weights))
    weights[key] = rng.choice([None, torch.zeros(1), torch.full(weights[key].shape, float("nan")), "w"])
    if rng.random() < 0.3:
        del weights[rng.choice(sorted(weights))]


def _bad_info(payload, rng):
    info = payload["info"]
    key = rng.choice(sorted(info))
    info[key] = rng.choice([None, -1, 0, "x", [], 10**9])


MUTATIONS = {"drop a field": _drop_field, "retype a field": _retype_field, "another model's name": _foreign_model,
             "a bad knob": _bad_knob, "a bad tensor": _bad_tensor, "bad info": _bad_info}


def damaged_checkpoint(whole: bytes, payload: dict, kind: str, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "truncated":
        return whole[: rng.randrange(len(whole))]
    if kind == "random bytes":
        return rng.randbytes(rng.choice([0, 1, 100, 5000]))
    if kind == "a zip of something else":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("data.pkl", rng.randbytes(64))
        return buffer.getvalue()
    if kind == "flipped bytes":
        damaged = bytearray(whole)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        return bytes(damaged)
    changed = {key: (dict(value) if isinstance(value, dict) else value) for key, value in payload.items()}
    MUTATIONS[kind](changed, rng)
    return _payload_bytes(changed)


KINDS = ["truncated", "random bytes", "a zip of something else", "flipped bytes", *MUTATIONS]


@fuzz_settings(max_examples=90)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1),
       use=st.sampled_from(["predict", "init", "resume", "export"]))
@pytest.mark.timeout(180)
def test_damaged_and_foreign_checkpoints(kind, seed, use, tiny_run, tmp_path_factory):
    run, image = tiny_run
    whole = (run / "last.pt").read_bytes()
    work = tmp_path_factory.mktemp("checkpoint")
    if use == "resume":
        shutil.copytree(run, work / "run")
        target = work / "run" / "last.pt"
    else:
        target = work / "model.pt"
    target.write_bytes(damaged_checkpoint(whole, load_checkpoint(run / "last.pt"), kind, seed))
    import detseg.export

    commands = {
        "predict": (["predict", target, image, "--out", work / "out", "--quiet"], None),
        # a run that would train: stop when its state is loaded and the first epoch would start
        "init": (["train", "det/yolo", "--init", target, "--out", work / "new", "--quiet", "train_size=4",
                  "val_size=2", "image_size=64"], (api, "fit")),
        "resume": (["train", "det/yolo", "--resume", "--out", work / "run", "--quiet"], (api, "fit")),
        # valid files would be exported and checked in onnxruntime, seconds each: stop at the export itself
        "export": (["export", target, "--out", work / "model.onnx"], (detseg.export, "export_onnx")),
    }
    args, stop_at = commands[use]
    result = invoke(args, stop_at=stop_at)
    if result == "reached" or result.exit_code == 0:
        event("accepted")
        return       # a flipped bit in a weight, a knob still in range: a valid checkpoint, used as such
    assert_one_clear_line(result, str(target), target.name)
