"""Resumable training: a checkpoint of everything the loop's future depends on, written atomically where it
survives the process (and, on a cluster, the pod), and read back on the next run of the same command.

What a resume checkpoint holds (``FORMAT``): the step reached, the image encoder's weights, the optimiser state,
the Beta Moving Average, the data loader's position (``data.loader.BalancedLoader.state_dict``), the RNG states,
the training log so far, and the MLflow run id (the resumed run continues it). With the batches and their
augmentations a pure function of (seed, step, slot) (see ``alignclip/data/loader.py``), a run killed at any
point and resumed produces the same ``model.pt``, byte for byte, as an uninterrupted run on the CPU.

Where: ``--checkpoint-dir`` (a local folder or an ``s3://`` prefix), else ``ALIGNCLIP_CHECKPOINT_ROOT`` keyed by
the task's output path and grid cell (``keyed_location``: a KFP retry in a new pod finds it), else the training
stage's resume folder beside its outputs (``.<out>.train.resume``), which a re-run of the same command finds.

Two files: ``resume.pt`` (the state, read with ``weights_only=True``) and ``resume.json`` (step and MLflow run
id: small, so the CLI can continue the run before loading any weights). Both are written whole or not at all.
"""

from __future__ import annotations

import io
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from alignclip import storage
from alignclip.artifacts import load_torch
from alignclip.publish import torch_bytes
from alignclip.storage import StorageError
from alignclip.log import get_logger

log = get_logger(__name__)

FORMAT = "alignclip-resume/1"
STATE_FILE = "resume.pt"
INFO_FILE = "resume.json"


class Preempted(BaseException):
    """The stage was asked to stop (SIGTERM: preemption, KFP or Kubernetes ending the pod) after writing a resume
    checkpoint. Tracking ends the run KILLED rather than FAILED (``stage_status``). A BaseException, so that
    ``except Exception`` blocks do not swallow it and the CLI framework does not turn it into "Aborted!"."""

    stage_status = "KILLED"


@dataclass
class ResumeOptions:
    """Where and how often a training run writes its resume checkpoint."""

    location: str | None = None  # folder or s3:// prefix; None: default_location, beside the outputs
    every_steps: int = 0  # 0: by time only
    every_seconds: float = 600.0  # also at least this often (0: by steps only)
    enabled: bool = True  # False: never read or write one (a fresh run every time)


class CheckpointStore:
    """``resume.pt`` + ``resume.json`` in a local folder or under an ``s3://`` prefix."""

    def __init__(self, location: str | Path):
        self.location = str(location)

    def _key(self, name: str) -> str:
        return f"{self.location.rstrip('/')}/{name}"

    def _write(self, name: str, data: bytes) -> None:
        storage.write_bytes(self._key(name), data)  # whole or not at all; failures are one StorageError line

    def _read(self, name: str) -> bytes | None:
        return storage.read_if_exists(self._key(name))

    def info(self) -> dict | None:
        data = self._read(INFO_FILE)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            log.warning("%s: unreadable, ignored", self._key(INFO_FILE))
            return None

    def load(self) -> dict | None:
        data = self._read(STATE_FILE)
        if data is None:
            return None
        stream = io.BytesIO(data)
        stream.name = self._key(STATE_FILE)
        state = load_torch(stream, "resume checkpoint")
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{self._key(STATE_FILE)}: not a resume checkpoint of this version ({FORMAT})")
        return state

    def save(self, state: dict, info: dict) -> None:
        # state first, then the small file that points at it: a crash in between leaves the older info, whose
        # step is behind the state's; resume trusts the state file.
        self._write(STATE_FILE, torch_bytes({"format": FORMAT, **state}))
        self._write(INFO_FILE, (json.dumps(info) + "\n").encode())

    def clear(self) -> None:
        for name in (STATE_FILE, INFO_FILE):
            # locally with the temporary files of a process killed while writing (.resume.pt.XXXX.tmp)
            storage.delete(self._key(name))

    def __str__(self) -> str:
        return self._key(STATE_FILE)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Schedule:
    """When to write the next checkpoint: every N steps and/or every T seconds."""

    def __init__(self, options: ResumeOptions):
        self.options = options
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        by_steps = self.options.every_steps > 0 and step % self.options.every_steps == 0
        by_time = self.options.every_seconds > 0 and time.monotonic() - self.last >= self.options.every_seconds
        return by_steps or by_time

    def done(self) -> None:
        self.last = time.monotonic()


class StopRequest:
    """Turns SIGTERM into a flag the loop checks after each step (it then checkpoints and raises Preempted).
    Installed for the loop only; the previous handler comes back afterwards."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler (the loop still runs)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM: writing a resume checkpoint after this step, then stopping")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def default_location(out_dir: str | Path) -> Path:
    """``<parent>/.<name>.train.resume``: beside the outputs, a fixed name that a re-run finds (the staging
    folder is unique to each process), written only by the holder of the output's lock."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.train.resume"


def store_for(out_dir: str | Path, options: ResumeOptions | None) -> CheckpointStore | None:
    if options is None or not options.enabled:
        return None
    return CheckpointStore(options.location or default_location(out_dir))


def keyed_location(root: str, out_dir: str | Path, cell: str) -> str:
    """A checkpoint location under ``root`` (``ALIGNCLIP_CHECKPOINT_ROOT``, e.g. the cluster's s3:// prefix) keyed
    by the task's output path and its grid cell. A KFP task's output path names the pipeline run and the task
    (loop iteration included) and is the same when KFP retries the task in a new pod, so the retry finds the
    checkpoint; another run or cell never does."""
    import hashlib

    digest = hashlib.sha256(str(Path(out_dir).resolve()).encode()).hexdigest()[:16]
    return f"{str(root).rstrip('/')}/{digest}-{cell}"


def pending_run_id(out_dir: str | Path, options: ResumeOptions | None) -> str | None:
    """The MLflow run a resumable checkpoint belongs to (so the CLI continues it); None if nothing to resume."""
    store = store_for(out_dir, options)
    info = store.info() if store is not None else None
    return (info or {}).get("mlflow_run_id") or None



# ------------------------------------------------------------------------------------------------ the loop's control


def one_line(err: Exception) -> str:
    """The message of an error, also when a DataLoader worker re-raised it with the worker's traceback."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return text


class RunControl:
    """Everything of a training loop that is not the algorithm: resume, preemption and storage errors.

    Made before the loop, it continues the resume checkpoint in ``store`` whose ``fingerprint`` matches (weights,
    optimiser, BMA, loader position, RNG states; the training log so far is ``log_prefix``); one of other settings
    is ignored and replaced. ``watching(window)`` is the loop's context: SIGTERM becomes a flag, and
    ``after_step`` writes a checkpoint when the schedule (or SIGTERM) says, then raises ``Preempted`` at SIGTERM.
    A StorageError past the store's retries leaves the context as one line, after a checkpoint of the whole steps
    done (the failed batch was not counted: ``loader.step``), so a re-run resumes exactly.

    ``run`` is the loop's ``train.TrainingRun`` (visual, optimizer, bma, loader, steps); ``window`` its
    ``train.LogWindow`` (the checkpoint keeps the log written so far). Without a store nothing is read or written;
    SIGTERM still stops the loop (Preempted)."""

    def __init__(self, run, store: CheckpointStore | None, options: ResumeOptions | None, fingerprint: str, tracker=None):
        self.run, self.store, self.fingerprint, self.tracker = run, store, fingerprint, tracker
        self.schedule = Schedule(options) if store is not None else None
        self.stop = StopRequest()
        self.window = None
        self.log_prefix, self.seconds_before = "", 0.0
        self._restore()
        self.start = run.loader.step  # 0, or the resumed checkpoint's step
        self.started = time.perf_counter()

    def _restore(self) -> None:
        state = self.store.load() if self.store is not None else None
        if state is not None and state["fingerprint"] != self.fingerprint:
            log.warning("%s belongs to a run with other settings: starting from step 0 (it will be replaced)", self.store)
            state = None
        if state is None:
            return
        run = self.run
        run.visual.load_state_dict(state["visual"])
        run.optimizer.load_state_dict(state["optimizer"])
        if run.bma is not None:
            run.bma.load_state_dict(state["bma"])
        run.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.log_prefix, self.seconds_before = state["log"], float(state["seconds"])
        log.info("resuming from step %d of %d (%s)", run.loader.step, run.steps, self.store)

    def watching(self, window) -> RunControl:
        self.window = window
        return self

    def __enter__(self) -> RunControl:
        self.stop.__enter__()
        self.started = time.perf_counter()
        return self

    def __exit__(self, kind, err, traceback) -> bool:
        try:
            if isinstance(err, StorageError):
                self._stop_on_storage_error(err)
        finally:
            self.stop.__exit__(kind, err, traceback)
        return False

    def after_step(self, step: int) -> None:
        """After optimiser step ``step`` (steps done): a checkpoint when due or asked; Preempted at SIGTERM."""
        steps = self.run.steps
        if self.store is not None and step < steps and (self.stop.requested or self.schedule.due(step)):
            try:
                self.checkpoint()
            except (StorageError, OSError) as err:  # insurance: failing to write one stops nothing
                log.warning("could not write the resume checkpoint at step %d (%s): training goes on", step, err)
            self.schedule.done()
        if self.stop.requested and step < steps:
            raise Preempted(f"stopped at step {step}/{steps}; re-run the same command to resume from {self.store}")

    def _stop_on_storage_error(self, err: Exception) -> None:
        done, steps = self.run.loader.step, self.run.steps
        if self.store is not None and done > self.start:
            self.checkpoint()
            raise StorageError(f"{one_line(err)}; training stopped at step {done}/{steps}, re-run the "
                                        f"same command to resume from {self.store}") from None
        raise StorageError(one_line(err)) from None

    @property
    def seconds(self) -> float:
        """Training time so far, a resumed run's earlier processes included."""
        return self.seconds_before + time.perf_counter() - self.started

    def checkpoint(self) -> None:
        """A resume checkpoint at the steps done so far (the open log window is written first)."""
        if self.window.rows:
            self.window.write()
        tic, run, step = time.perf_counter(), self.run, self.run.loader.step
        state = {
            "step": step,
            "visual": run.visual.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "bma": run.bma.state_dict() if run.bma is not None else None,
            "loader": run.loader.state_dict(),
            "rng": rng_state(),
            "log": self.window.text(),
            "seconds": self.seconds,
            "fingerprint": self.fingerprint,
        }
        run_id = getattr(self.tracker, "run_id", None)
        self.store.save(state, {"step": step, "steps": run.steps, "mlflow_run_id": run_id, "written": time.time()})
        log.debug("resume checkpoint at step %d -> %s (%.2fs)", step, self.store, time.perf_counter() - tic)
