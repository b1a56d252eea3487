"""User-facing errors.

Anything a user can get wrong (a file, a field, a value, a flag) raises a :class:`DetsegError` whose message is one
line naming what is wrong and where. The CLI prints that line and exits with status 2; the Python API lets it
propagate. Programming errors stay ordinary exceptions with tracebacks.
"""
from __future__ import annotations

import unicodedata


class DetsegError(Exception):
    """An error caused by the user's input; ``str(err)`` is one line fit to print."""


class ConfigError(DetsegError):
    """A bad model name, override key or value, flag or run directory."""


class DataError(DetsegError):
    """Malformed data: names the file and, where known, the image/annotation id, the field and the bad value."""

    def __init__(self, file, message: str | None = None, *, ann_id=None, image_id=None, field: str | None = None,
                 value=None):
        if message is None:   # one argument: the whole text, e.g. rebuilt by a DataLoader from a worker's error
            super().__init__(_last_line_of_traceback(str(file)))
            self.file, self.ann_id, self.image_id, self.field, self.value = None, None, None, None, None
            return
        where = [str(file)]
        if image_id is not None:
            where.append(f"image id {image_id}")
        if ann_id is not None:
            where.append(f"annotation id {ann_id}")
        if field is not None:
            where.append(f"field '{field}'")
        text = ": ".join(where) + f": {message}"
        if value is not None:
            shown = repr(value)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            text += f" (got {shown})"
        super().__init__(one_line(text))   # file names and category names in the text are the user's too
        self.file, self.ann_id, self.image_id, self.field, self.value = file, ann_id, image_id, field, value


class WriteError(DetsegError):
    """A file could not be written (a full disk, a read-only or missing directory, no permission). The write was
    atomic, so the file that was there before is intact; the message names the file and the system's reason."""

    def __init__(self, path, error: OSError):
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(f"{path}: cannot write ({reason}); any previous version of the file is intact")
        self.path, self.errno = path, error.errno


def error_reason(error: BaseException, limit: int | None = None) -> str:
    """The first line of ``error``'s message (its type's name when it has none), cut to ``limit`` characters if
    given: the reason a library gave, quoted inside one of our one-line messages."""
    text = str(error)
    return (text.splitlines()[0] if text.strip() else type(error).__name__)[:limit]


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\r``, ``\\x00``): a message that quotes
    a user's value stays one line on a terminal, whatever the value held."""
    return "".join(repr(char)[1:-1] if unicodedata.category(char).startswith("C") else char for char in text)


def _last_line_of_traceback(text: str) -> str:
    """A DataLoader re-raises a worker's exception with the worker's whole traceback as its message; the user's
    one line is the traceback's last, after the exception's name."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        last = lines[-1]
        return last.split("Error: ", 1)[1] if "Error: " in last else last
    return text
