"""File I/O: every file detseg writes goes through :func:`atomic_write_bytes`, the one atomic write.

A write goes to a temporary file in the target's directory, is flushed to disk, then renamed over the target
(``os.replace``, atomic on POSIX and Windows). A reader therefore sees the old file or the new one, never half of
one, and a write that fails part-way (a full disk, an exception, a kill) leaves the old file as it was and no
temporary file behind. The other writers (text, JSON, YAML) only turn their data into bytes.

A write the system refuses (a full disk, a read-only directory) raises :class:`~detseg.errors.WriteError`
naming the file. A kill between the temporary file and the rename can leave a temporary file behind (never a
truncated target): :func:`remove_stale_temporaries` clears those of a directory, as a run does when it starts.

Reading back a YAML file (a run's ``config.yaml``) raises :class:`~detseg.errors.ConfigError` naming the file when
it is missing or is not a YAML mapping.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError, WriteError

__all__ = ["atomic_write_bytes", "remove_stale_temporaries", "check_writable", "write_text", "write_json", "save_yaml", "load_yaml"]


def _temporary_prefix(name: str) -> str:
    return f".{name}."


TEMPORARY_SUFFIX = ".tmp"


def atomic_write_bytes(path: Path | str, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically, creating the parent directories.

    ``mode`` sets the file's permission bits (e.g. ``0o644`` for a data set others read, ``0o600`` for a secret);
    by default the file keeps the owner-only permissions of a fresh temporary file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path.name), suffix=TEMPORARY_SUFFIX)
    except OSError as error:
        raise WriteError(path, error) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise WriteError(path, error) from None
        raise


def remove_stale_temporaries(directory: Path | str) -> list[Path]:
    """Delete the temporary files :func:`atomic_write_bytes` left in ``directory`` when its process was killed
    mid-write (``.NAME.XXXX.tmp``); returns what was removed. Only for a directory one process writes (a run
    directory): another writer's temporary file in progress would be removed too."""
    removed = []
    for candidate in Path(directory).glob(f".*{TEMPORARY_SUFFIX}"):
        if candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def check_writable(directory: Path | str) -> None:
    """Create ``directory`` if needed and prove a file can be written into it (then removed), so that a run into a
    read-only or full place fails at its start with one line rather than after its first epoch."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory}: exists and is not a directory")
    probe = directory / ".write-check"
    atomic_write_bytes(probe, b"detseg")
    probe.unlink(missing_ok=True)


def write_text(path: Path | str, text: str, mode: int | None = None) -> None:
    """Write ``text`` as UTF-8, atomically (reports, logs that are written whole)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def write_json(path: Path | str, data: Any) -> None:
    """Write ``data`` as indented JSON plus a final newline, atomically (NaN and infinity are kept as such)."""
    write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def read_json(path: Path | str) -> Any:
    """A JSON file's content (UTF-8)."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def save_yaml(path: Path | str, data: Mapping[str, Any]) -> None:
    """Write a mapping as YAML in its own key order, atomically."""
    write_text(path, yaml.safe_dump(dict(data), sort_keys=False))


def load_yaml(path: Path | str) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, invalid YAML or a non-mapping is a ConfigError naming ``path``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a YAML file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value")
    return data
