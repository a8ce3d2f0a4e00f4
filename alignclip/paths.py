"""Every path the project builds from data it did not write itself stays inside its root.

S3 object keys (staged into the local cache), manifest rows (images below the dataset root), the
``--pretrained s3://`` cache and ``meta.json`` roots are data: a shared bucket or a prepared folder from someone
else may hold ``../`` segments, absolute paths or symlinks that point elsewhere. ``confined`` is the one function
that turns such a name into a local path, and refuses (``PathOutsideRoot``: one line naming the key or row) what
would resolve outside the root.

The rules (docs/security.md):

* a name is relative: no leading ``/``, no ``..`` segment, not empty;
* the path it names, with every symlink resolved (``os.path.realpath``, which resolves the existing part of a
  path not yet written), is the root or below it.

``..`` is refused even where it would stay inside (``a/../b``): two different S3 keys would then share a cache
file, and a dataset's keys never need it.
"""

from __future__ import annotations

import errno
import os
import posixpath
from pathlib import Path


class PathOutsideRoot(ValueError):
    """A key, row or cache entry that would resolve outside its root; refused, never opened or written."""


def lexical_problem(relative: str) -> str | None:
    """Why ``relative`` cannot be a name inside a root, judged on the string alone (no file system access);
    None if it can."""
    if not isinstance(relative, str):
        return f"not a string ({type(relative).__name__})"
    if relative == "":
        return "empty"
    if "\x00" in relative:
        return "holds a NUL byte"
    if relative.startswith("/"):
        return "absolute"
    if ".." in relative.split("/"):
        return "has a '..' segment"
    return None


def is_inside(root: str | Path, path: str | Path) -> bool:
    """``path`` with its symlinks resolved is ``root`` (resolved) or below it."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def confined(root: str | Path, relative: str, what: str) -> Path:
    """``root / relative``, refused with one line naming ``what`` and ``relative`` when it would leave ``root``
    (an absolute name, a ``..`` segment, a symlink pointing outside). ``what`` says what the name is: "S3 key",
    "manifest row", "cache entry"."""
    problem = lexical_problem(relative)
    if problem:
        raise PathOutsideRoot(f"{what} {relative!r} refused: {problem}; it must stay inside {root}")
    path = Path(root) / relative
    if not is_inside(root, path):
        raise PathOutsideRoot(
            f"{what} {relative!r} refused: it resolves to {os.path.realpath(path)}, outside {root} (a symlink leaves it)"
        )
    return path


def confined_key(prefix: str, relative: str, what: str) -> str:
    """``prefix/relative`` for a remote (``s3://``) root, checked as ``confined`` is on the string alone (an object
    store has no symlinks)."""
    problem = lexical_problem(relative)
    if problem:
        raise PathOutsideRoot(f"{what} {relative!r} refused: {problem}; it must stay inside {prefix}")
    return f"{prefix.rstrip('/')}/{relative}"


def relative_root_inside(folder: str | Path, root: str) -> bool:
    """A relative root written in a file of ``folder`` (meta.json's ``root``) stays inside ``folder``, judged on the
    string: ``data`` or ``.`` do, ``../elsewhere`` does not. (A symlink inside the folder is the folder owner's
    choice, as an absolute root is.)"""
    normal = posixpath.normpath(root)
    return not (normal == ".." or normal.startswith("../") or normal.startswith("/"))


class DiskFull(OSError):
    """No space left (or quota exhausted) while a stage wrote a file: one line naming it and the bytes."""

    def __init__(self, path, size: int | None = None):
        what = f"{size} bytes" if size is not None else "its bytes"
        super().__init__(errno.ENOSPC, f"disk full: writing {path} ({what}) failed: no space left on its file system; "
                                       "the stage's partial files were removed, the previous outputs are untouched")
        self.path, self.size = str(path), size

    def __str__(self) -> str:
        return self.strerror
