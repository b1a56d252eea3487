"""File I/O: one atomic write under every writer; YAML read errors name the file; config.py does no file I/O."""
import ast
import json
import math
import os
from pathlib import Path

import pytest

import detseg.config
from detseg import io as detseg_io
from detseg.errors import ConfigError, WriteError
from detseg.io import atomic_write_bytes, load_yaml, save_yaml, write_json, write_text


def test_atomic_write_creates_parents_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a" / "b" / "file.bin"
    atomic_write_bytes(path, b"\x00\x01payload")
    assert path.read_bytes() == b"\x00\x01payload"
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]


@pytest.mark.parametrize("writer, payload", [
    (atomic_write_bytes, b"new bytes"),
    (write_text, "new text"),
    (write_json, {"new": 1}),
    (save_yaml, {"new": 1}),
])
def test_failed_write_keeps_the_old_file_and_no_temporary_file(tmp_path, monkeypatch, writer, payload):
    path = tmp_path / "target.txt"
    path.write_bytes(b"old content")

    def fail(src, dst):
        # the new content is complete in the temporary file; the rename is what fails
        assert Path(src).parent == path.parent and Path(src).name != path.name
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(WriteError, match="target.txt: cannot write .disk on fire"):
        writer(path, payload)
    assert path.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["target.txt"]


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "target.txt"
    path.write_bytes(b"old content")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, b"half")
    assert path.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["target.txt"]


def test_mode_sets_the_permission_bits(tmp_path):
    public, secret = tmp_path / "public.json", tmp_path / "secret.key"
    write_text(public, "{}", mode=0o644)
    write_text(secret, "s3cr3t", mode=0o600)
    assert public.stat().st_mode & 0o777 == 0o644
    assert secret.stat().st_mode & 0o777 == 0o600


def test_write_text_is_utf8(tmp_path):
    path = tmp_path / "report.md"
    write_text(path, "aim ≥ 25 — met")
    assert path.read_bytes() == "aim ≥ 25 — met".encode("utf-8")


def test_write_json_round_trip_and_format(tmp_path):
    path = tmp_path / "metrics.json"
    data = {"top1": 0.5, "nested": {"list": [1, 2, 3]}, "missing": float("nan"), "name": "cls/mlp"}
    write_json(path, data)
    text = path.read_text()
    assert text.endswith("}\n") and '\n  "top1": 0.5,' in text          # indented, one final newline
    back = json.loads(text)
    assert math.isnan(back.pop("missing"))
    assert back == {key: value for key, value in data.items() if key != "missing"}


def test_yaml_round_trip_keeps_key_order(tmp_path):
    path = tmp_path / "run" / "config.yaml"
    data = {"model": "cls/mlp", "data": None, "config": {"lr": 0.1, "epochs": 3, "optimizer": "sgd"}}
    save_yaml(path, data)
    assert load_yaml(path) == data
    assert list(load_yaml(path)) == ["model", "data", "config"]
    assert list(load_yaml(path)["config"]) == ["lr", "epochs", "optimizer"]
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]


def test_load_yaml_missing_file_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "config.yaml"
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(path) in str(err.value) and "not found" in str(err.value)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("text, fragment", [
    ("model: [unclosed\n", "not valid YAML"),
    ("key: value\n  bad indent: here\n", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("", "expected a mapping"),
])
def test_load_yaml_invalid_file_is_a_config_error_naming_it(tmp_path, text, fragment):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(path) in str(err.value) and fragment in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_load_yaml_on_binary_garbage_is_a_config_error(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(ConfigError, match="config.yaml"):
        load_yaml(path)


def test_config_module_does_no_file_io():
    """config.py validates; reading and writing files is detseg.io's job alone."""
    source = Path(detseg.config.__file__).read_text()
    tree = ast.parse(source)
    io_modules = {"os", "io", "tempfile", "yaml", "json", "pathlib", "shutil", "pickle"}
    io_names = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "replace", "unlink", "mkdir",
                "mkstemp", "fdopen", "safe_load", "safe_dump", "dump", "load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {alias.name.split(".")[0] for alias in node.names} & io_modules, ast.dump(node)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in io_modules, ast.dump(node)
            assert node.module != "io" and "atomic_write_bytes" not in {alias.name for alias in node.names}
        elif isinstance(node, ast.Name):
            assert node.id not in io_names, f"config.py line {node.lineno} uses {node.id}"
        elif isinstance(node, ast.Attribute):
            assert node.attr not in io_names, f"config.py line {node.lineno} uses .{node.attr}"
    # and, as plain text, outside docstrings and comments
    code = ast.unparse(tree)
    for fragment in ("open(", "read_text", "write_", "yaml.", "tempfile", "os.replace"):
        assert fragment not in code, fragment
    for name in ("atomic_write_bytes", "save_yaml", "load_yaml"):
        assert not hasattr(detseg.config, name), name


def test_every_writer_goes_through_the_one_atomic_write(tmp_path, monkeypatch):
    calls = []
    real = detseg_io.atomic_write_bytes

    def spy(path, data, mode=None):
        calls.append(Path(path).name)
        real(path, data, mode)

    monkeypatch.setattr(detseg_io, "atomic_write_bytes", spy)
    detseg_io.write_text(tmp_path / "a.md", "x")
    detseg_io.write_json(tmp_path / "b.json", {})
    detseg_io.save_yaml(tmp_path / "c.yaml", {"k": 1})
    assert calls == ["a.md", "b.json", "c.yaml"]


def test_hyperquest_secret_is_written_owner_only_and_kept(tmp_path):
    from detseg.hyperquest.settings import _stored_secret

    path = tmp_path / "hq" / "secret.key"
    first = _stored_secret(path, 48)
    assert path.read_text() == first and len(first) >= 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert _stored_secret(path, 48) == first                     # read back, not remade
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]
