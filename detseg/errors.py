"""User-facing errors.

Anything a user can get wrong (a file, a field, a value, a flag) raises a :class:`DetsegError` whose message is one
line naming what is wrong and where. The CLI prints that line and exits with status 2; the Python API lets it
propagate. Programming errors stay ordinary exceptions with tracebacks.
"""
from __future__ import annotations


class DetsegError(Exception):
    """An error caused by the user's input; ``str(err)`` is one line fit to print."""


class ConfigError(DetsegError):
    """A bad model name, override key or value, flag or run directory."""


class DataError(DetsegError):
    """Malformed data: names the file and, where known, the image/annotation id, the field and the bad value."""

    def __init__(self, file, message: str, *, ann_id=None, image_id=None, field: str | None = None,
                 value=None):
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
        super().__init__(text)
        self.file, self.ann_id, self.image_id, self.field, self.value = file, ann_id, image_id, field, value
