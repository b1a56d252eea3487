"""Run configs: overrides are parsed by type and checked; errors name the key and list what is valid."""
import pytest

from detseg.config import TRAIN_OPTIONS, Option, parse_overrides, resolve
from detseg.errors import ConfigError


def test_defaults_then_base_then_overrides():
    options = {**TRAIN_OPTIONS, "width": Option(32, "channels", min=1)}
    config = resolve(options, {"width": "64", "lr": "0.5"}, base={"width": 16, "epochs": 7})
    assert config["width"] == 64 and config["lr"] == 0.5 and config["epochs"] == 7
    assert config["optimizer"] == TRAIN_OPTIONS["optimizer"].default


@pytest.mark.parametrize("pairs, fragment", [
    (["nonsense=1"], "unknown config key 'nonsense'; valid keys are:"),
    (["epochs=-1"], "epochs=-1: must be >= 0"),
    (["epochs=2.5"], "epochs=2.5: must be an integer"),
    (["lr=fast"], "lr=fast: must be a number"),
    (["lr=nan"], "lr=nan: must be a finite number"),
    (["optimizer=adam"], "optimizer=adam: must be one of sgd, adamw"),
])
def test_bad_overrides_are_clear(pairs, fragment):
    with pytest.raises(ConfigError) as err:
        resolve(TRAIN_OPTIONS, parse_overrides(pairs))
    assert fragment in str(err.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        resolve(TRAIN_OPTIONS, {"learning_rate": "1"})
    assert "batch_size" in str(err.value) and "weight_decay" in str(err.value)


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["lr"])


def test_bool_and_int_parsing():
    options = {"flag": Option(True, "a flag"), "count": Option(3, "a count")}
    assert resolve(options, {"flag": "off", "count": "4.0"}) == {"flag": False, "count": 4}
    with pytest.raises(ConfigError, match="flag=maybe: must be true or false"):
        resolve(options, {"flag": "maybe"})


# Saving and reading config.yaml is detseg.io's (tests/test_io.py).


def test_no_model_knob_shadows_a_task_knob_of_another_meaning():
    """A model option with a task option's name replaces it silently (seg/sliding_window's patch `crop` once hid
    the augmentation's crop); only per-model data-size defaults may share a name, and a knob that is the task's own
    with another default (the single-shot detectors' scale_jitter: same help, type and bounds)."""
    import dataclasses

    from detseg import registry

    for name in registry.names():
        entry = registry.get(name)
        shared = set(entry.task.options) & set(entry.options)
        same_meaning = {key for key in shared
                        if dataclasses.replace(entry.options[key], default=entry.task.options[key].default)
                        == entry.task.options[key]}
        assert shared - same_meaning <= {"train_size", "val_size"}, (name, sorted(shared - same_meaning))
