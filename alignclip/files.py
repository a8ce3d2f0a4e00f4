"""Reading and writing the project's files safely: torch files without code execution, atomic writes, and stage
outputs published as a whole.

* ``load_torch`` is the one way the project reads a ``.pt`` file: ``torch.load(weights_only=True)``, which
  refuses any pickle that would build objects other than tensors and plain containers (a checkpoint shared by
  someone else cannot run code here). A file that is not a valid checkpoint is one clear ``ValueError``.
* ``atomic_write_bytes`` / ``save_torch`` write to a temporary file in the same folder, fsync it and rename it
  over the target: a reader (or a run killed mid-write) sees the old file or the new one, never half of one.
* ``stage_output`` makes a stage's outputs a transaction: the stage writes into a staging folder beside its
  output folder; on success the staging folder replaces the outputs (old files that the new run did not write
  are gone: no stale metrics beside a new model); on failure the previous outputs are untouched.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch

from alignclip.log import get_logger

log = get_logger(__name__)


def load_torch(source, what: str = "checkpoint"):
    """``torch.load`` with ``weights_only=True`` on CPU; a bad or unsafe file is one ``ValueError`` naming it.

    ``source`` is a path or a binary file object (bytes read from object storage).
    """
    name = source if isinstance(source, (str, Path)) else getattr(source, "name", "<bytes>")
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise FileNotFoundError(f"{what} not found: {source}")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names a refused global (e.g. "unsupported GLOBAL posix.system"); other unpickling errors mean
        # the bytes are not a pickle at all.
        refused = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), None)
        if refused:
            raise ValueError(
                f"{name}: refused to load this {what}: it holds Python objects other than tensors and plain data, "
                f"which could run code ({refused})"
            ) from None
        raise ValueError(f"{name}: not a valid {what} (not a torch file)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, AttributeError, IndexError) as err:
        raise ValueError(f"{name}: not a valid {what} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'empty or truncated file'})") from None


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_torch(obj, path: str | Path) -> Path:
    """``torch.save`` made atomic (temporary file + rename)."""
    return atomic_write_bytes(path, torch_bytes(obj))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ stage outputs

def staging_dir(out_dir: str | Path, stage: str) -> Path:
    """The stage's work folder beside its outputs: ``<parent>/.<name>.<stage>.partial``. Its name is fixed (not
    random) so that a re-run after a crash finds what the crashed run left, e.g. a training checkpoint to resume."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.{stage}.partial"


def _check_replaceable(out: Path, allowed: Iterable[str] | None) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: expected an output folder")
    if allowed is None or not out.is_dir():
        return
    allowed = set(allowed)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in allowed)
    if foreign:
        raise FileExistsError(
            f"{out} holds files that are not outputs of this stage ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}): choose an empty or new output folder"
        )


@contextmanager
def stage_output(
    out_dir: str | Path, stage: str, owns: Iterable[str] | None = None, allowed: Iterable[str] | None = (),
    keep_staging_on_error: bool = False,
) -> Iterator[Path]:
    """Yield a staging folder to write a stage's outputs into; publish them when the block succeeds.

    ``owns=None``: the stage owns ``out_dir`` whole; on success the staging folder replaces it (a rerun leaves
    nothing of the previous run). ``allowed`` guards the user's files: a folder holding names outside it is
    refused before any work (the default: only an empty folder; ``None`` allows anything, for a folder whose
    contents are all the stage's own, as the report checks itself).

    ``owns=[names]``: ``out_dir`` is shared with other stages (``evaluate`` writes beside ``train``'s model);
    each owned name is replaced by the new file or removed if the new run did not write it.

    On an exception the previous outputs are untouched and the staging folder is removed, unless
    ``keep_staging_on_error`` (training keeps its resumable checkpoint there).
    """
    out = Path(out_dir)
    old = out.parent / f".{out.name}.old"
    if not out.exists() and old.is_dir():  # a publish crashed between its two renames: restore the old outputs
        os.replace(old, out)
    if owns is None:
        _check_replaceable(out, allowed)
    elif out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: expected an output folder")
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out, stage)
    staging.mkdir(exist_ok=True)
    try:
        yield staging
    except BaseException:
        if not keep_staging_on_error or not any(staging.iterdir()):
            shutil.rmtree(staging, ignore_errors=True)
            for folder in created:  # innermost first: leave no empty folders behind
                try:
                    folder.rmdir()
                except OSError:
                    break
        raise
    if owns is None:
        _replace_folder(staging, out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name in owns:
            new = staging / name
            if new.exists():
                os.replace(new, out / name)
            elif (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        _fsync_dir(out)


def _replace_folder(new: Path, out: Path) -> None:
    """Swap ``new`` in as ``out``. Two renames: the old folder moves aside, the new one takes its name, then the
    old one is deleted. A crash between the renames leaves ``.<name>.old`` holding the previous outputs, which
    the next publish of this folder removes."""
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    _fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
