"""Publishing outputs: what the project writes is seen whole or not at all, by one writer per output.

* ``atomic_write_bytes`` / ``save_torch`` write to a temporary file in the same folder, fsync it and rename it
  over the target: a reader (or a run killed mid-write) sees the old file or the new one, never half of one.
  ``save_checkpoint`` writes ``model.pt`` this way.
* ``output_lock`` / ``hold_output_lock``: one writer per output (an exclusive ``flock`` beside it).
* ``stage_output`` makes a stage's outputs a transaction: the stage writes into a staging folder beside its
  output folder; on success the staging folder replaces the outputs (old files that the new run did not write
  are gone: no stale metrics beside a new model); on failure the previous outputs are untouched.
  ``publish_files`` moves finished files into place (a stage sharing its folder, the pre-trained weights cache).

Reading lives elsewhere: ``artifacts.load_torch`` (beside ``load_checkpoint``, the schema it checks) is the one
way a ``.pt`` file is read. Reading takes no lock and no staging folder, and the CLI reads artefact names before
any stage runs; the module that defines what a file holds is the one that reads it back. Local and ``s3://``
bytes that are not stage outputs (the resume checkpoint, caches) go through ``alignclip.storage``.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import glob
import io
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from alignclip.log import get_logger
from alignclip.paths import DiskFull

log = get_logger(__name__)

if TYPE_CHECKING:
    from alignclip.artifacts import Checkpoint


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
    except OSError as err:
        Path(temporary).unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(target, len(data)) from None
        raise
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def leftover_temporaries(path: str | Path) -> list[Path]:
    """The temporary files of ``atomic_write_bytes(path)`` that a process killed mid-write left behind."""
    target = Path(path)
    return sorted(target.parent.glob(f".{glob.escape(target.name)}.*.tmp"))


def torch_bytes(obj) -> bytes:
    """``torch.save`` into memory. The bytes do not depend on a file name (torch names its zip records after the
    file it saves to), and a full disk is then one ``DiskFull`` of the atomic write, naming the size."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_torch(obj, path: str | Path) -> Path:
    """``torch.save`` made atomic (temporary file + rename)."""
    return atomic_write_bytes(path, torch_bytes(obj))


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """``model.pt`` (schema: ``artifacts.Checkpoint``) written to a temporary file and renamed: a killed process
    never leaves a half-written checkpoint, and a full disk is one DiskFull line naming the file and its size."""
    return save_torch(asdict(checkpoint), Path(path))


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


# ------------------------------------------------------------------------------------------ one writer per output

class OutputLocked(RuntimeError):
    """Another live process is writing this output; this one stops before writing anything."""


_HELD: dict[str, list] = {}  # lock path -> [descriptor, depth]: re-entrant within the process
_HOST = socket.gethostname()


def lock_path(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    return out.parent / f".{out.name}.lock"


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 512).decode("utf-8", "replace").strip()
    return text or "another process (it has not written its name yet)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _acquire(path: Path, out: Path) -> int | None:
    """An exclusive ``flock`` on ``path``, which then names this process ("pid N host H since T"). The kernel
    drops the lock of a process that dies, however it dies: a lock file left by a dead process is taken over (a
    log line names it). The inode check makes the unlink at release safe: a waiter that opened the old file
    retries on the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputLocked(
                f"{out} is being written by {holder} (lock file {path}): one writer per output; wait for it or "
                "write elsewhere"
            ) from None
        except OSError as err:  # a file system without locks: go on unguarded rather than not at all
            os.close(fd)
            log.warning("%s: file locks unsupported here (%s): a second writer would not be stopped", path, err.strerror)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # released and unlinked between our open and our lock: lock the new file instead
            os.close(fd)
            continue
        previous = _holder(fd) if os.fstat(fd).st_size else ""
        if previous:
            fields = previous.split()
            pid = int(fields[1]) if len(fields) > 3 and fields[1].isdigit() else None
            if fields[3:4] == [_HOST] and pid is not None and not _pid_alive(pid):
                log.warning("%s: taking over the stale lock of %s (that process is gone)", path, previous)
            else:
                log.warning("%s: taking over a lock no live process holds (%s)", path, previous)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} host {_HOST} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
        return fd


@contextmanager
def output_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold the output's lock (``.<name>.lock`` beside it) for the block: a second writer of the same output,
    in this process's lifetime elsewhere, stops at once with ``OutputLocked`` naming the holder. Re-entrant."""
    hold_output_lock(out_dir)
    try:
        yield
    finally:
        release_output_lock(out_dir)


def hold_output_lock(out_dir: str | Path) -> None:
    """Take the output's lock (re-entrant; ``release_output_lock`` undoes one take; process exit releases all).
    The CLI takes it before anything else of the stage (an MLflow run included), so a refused second writer
    leaves no trace in the winner's run."""
    out = Path(out_dir)
    path = lock_path(out)
    key = str(path.absolute())
    if key in _HELD:
        _HELD[key][1] += 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _HELD[key] = [_acquire(path, out), 1]


def release_output_lock(out_dir: str | Path) -> None:
    path = lock_path(out_dir)
    key = str(path.absolute())
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[key]
    if held[0] is not None:
        path.unlink(missing_ok=True)  # while still locked: a waiter that opened it sees the inode change
        os.close(held[0])


@atexit.register
def _release_all() -> None:
    for key, (fd, _) in list(_HELD.items()):
        if fd is not None:
            Path(key).unlink(missing_ok=True)
            os.close(fd)
    _HELD.clear()


# ------------------------------------------------------------------------------------------ stage outputs

def staging_dir(out_dir: str | Path, stage: str) -> Path:
    """The stage's work folder beside its outputs, unique to this process:
    ``<parent>/.<name>.<stage>.<host>-<pid>.partial``. Two processes never share one, so a writer that lost the
    race (or ran without locks) cannot write into the winner's files. What must survive a crash (training's resume
    checkpoint) lives elsewhere (``alignclip.resume.default_location``)."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.{stage}.{_HOST}-{os.getpid()}.partial"


def live_staging(out_dir: str | Path, stage: str) -> list[Path]:
    """The staging folders of ``stage`` for this output that exist now, of any process (one while it runs)."""
    out = Path(out_dir)
    return sorted(out.parent.glob(f".{glob.escape(out.name)}.{stage}.*.partial"))


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
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    hold_output_lock(out)  # one writer per output: a second one stops here, before it writes anything
    try:
        with _staged(out, stage, owns, allowed, keep_staging_on_error) as staging:
            yield staging
    except OSError as err:
        release_output_lock(out)
        _remove_created(created)
        if err.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(err, DiskFull):  # a write of a library
            raise DiskFull(err.filename or staging_dir(out, stage)) from None
        raise
    except BaseException:
        release_output_lock(out)
        _remove_created(created)
        raise
    release_output_lock(out)


def _remove_created(created: list[Path]) -> None:
    for folder in created:  # innermost first: leave no empty folders behind
        try:
            folder.rmdir()
        except OSError:
            break


@contextmanager
def _staged(out: Path, stage: str, owns, allowed, keep_staging_on_error: bool) -> Iterator[Path]:
    old = out.parent / f".{out.name}.old"
    if not out.exists() and old.is_dir():  # a publish crashed between its two renames: restore the old outputs
        os.replace(old, out)
    if owns is None:
        _check_replaceable(out, allowed)
    elif out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: expected an output folder")
    for stale in live_staging(out, stage):  # we hold the lock: these are of writers that died (kill -9, power)
        shutil.rmtree(stale, ignore_errors=True)
    staging = staging_dir(out, stage)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        if not keep_staging_on_error or not any(staging.iterdir()):
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if owns is None:
        replace_folder(staging, out)
    else:
        publish_files(staging, out, owns)
        shutil.rmtree(staging, ignore_errors=True)


def publish_files(staging: str | Path, out: str | Path, names: Iterable[str]) -> None:
    """Move each of ``names`` from ``staging`` into ``out`` (same file system), in the given order, each by one
    atomic rename; a name the staging folder lacks is removed from ``out`` (no stale file beside new ones)."""
    staging, out = Path(staging), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        new = staging / name
        if new.exists():
            os.replace(new, out / name)
        elif (out / name).is_dir():
            shutil.rmtree(out / name)
        else:
            (out / name).unlink(missing_ok=True)
    _fsync_dir(out)


def replace_folder(new: Path, out: Path) -> None:
    """Swap the finished folder ``new`` in as ``out`` (same file system). Two renames: the old folder moves aside, the new one takes its name, then the
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
