"""The project's own files read back as data: parsed, then checked for type and required keys before use.

A file another stage wrote may be truncated (a full disk, a copy cut short), edited by hand or replaced by
someone else's; ``json.loads`` alone turns that into a traceback far from the file (``AttributeError: 'list'
object has no attribute 'get'``). ``read_json`` / ``check_fields`` make each such case one ``DataFileError``
line naming the file and the key, which the CLI prints as ``error: ...`` with exit code 2.

The shapes (``SCHEMAS``) list only what readers rely on; a file may hold more.
"""

from __future__ import annotations

import json
from pathlib import Path


class DataFileError(ValueError):
    """A file the project reads does not hold what its writer writes: one line naming the file and the key."""


_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "true/false",
          type(None): "null"}


def _expected(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(_NAMES.get(k, k.__name__) for k in kinds)


def _is(value, kinds) -> bool:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # JSON true is not a count
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


def _found(value) -> str:
    return "null" if value is None else _NAMES.get(type(value), type(value).__name__)


# key -> type(s), for the keys every reader of the file uses. (list, str): a list of strings.
META = {"dataset": str, "protocol": str, "root": str, "classes": (list, str), "domains": (list, str), "template": str}
TRAIN_SUMMARY = {"settings": dict, "method": dict}
METRICS = {"method": str, "dataset": str, "protocol": str, "views": dict}


def check_fields(data, source: str | Path, fields: dict, what: str = "file") -> dict:
    """``data`` must be a JSON object with each key of ``fields`` of its type; a ``(list, str)`` entry is a list of
    strings. Returns ``data``; anything else is a DataFileError naming ``source`` and the key."""
    if not isinstance(data, dict):
        raise DataFileError(f"{source}: expected a JSON object ({what}), found {_found(data)}")
    for key, kinds in fields.items():
        if key not in data:
            raise DataFileError(f"{source}: key {key!r} missing ({what})")
        value = data[key]
        if kinds == (list, str):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DataFileError(f"{source}: key {key!r} must be a list of strings, found {_found(value)}")
        elif not _is(value, kinds):
            raise DataFileError(f"{source}: key {key!r} must be {_expected(kinds)}, found {_found(value)}")
    return data


def parse_json(text: str | bytes, source: str | Path):
    """``json.loads`` whose failure names the file (a truncated file says which one, and where it stops)."""
    try:
        return json.loads(text)
    except UnicodeDecodeError:
        raise DataFileError(f"{source}: not UTF-8 text, expected JSON") from None
    except json.JSONDecodeError as err:
        reason = "empty or truncated" if err.pos >= len(err.doc.rstrip()) else "not valid JSON"
        raise DataFileError(f"{source}: {reason} ({err.msg}, line {err.lineno} column {err.colno})") from None


def read_json(path: str | Path, fields: dict | None = None, what: str = "file"):
    """Read ``path`` as JSON; with ``fields``, also check it is an object holding those keys (``check_fields``)."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except IsADirectoryError:
        raise DataFileError(f"{path}: a folder, expected a JSON file ({what})") from None
    data = parse_json(text, path)
    return check_fields(data, path, fields, what) if fields is not None else data
