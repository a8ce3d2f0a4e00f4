"""How tracking records travel to MLflow, so that tracking never costs a result (``alignclip.tracking.tracker``
decides what is logged; this module only sends it).

* Short timeouts and few retries for MLflow's HTTP client (``MLFLOW_HTTP_REQUEST_*``; the user's settings win),
  and a 3-second probe of the server before a run starts: an unreachable tracking URI costs seconds, not minutes.
* Records (params, metrics, tags, artifacts, the run's end) go through a queue to one background thread: the
  training loop never waits on the network.
* When the server is unreachable at start, or stops answering mid-run, the run goes on: a warning says so, and
  every record that could not be sent is appended to a spool file (JSON lines) under ``ALIGNCLIP_TRACKING_SPOOL``
  (default ``~/.cache/alignclip/tracking-spool``). The thread probes the server again every
  ``ALIGNCLIP_TRACKING_RETRY_S`` seconds (default 30) and replays the spool when it is back; what is still
  spooled at exit is replayed by ``alignclip tracking sync`` or by the next stage that reaches the server.
* A ``sqlite:///`` store is initialised under a file lock: two processes creating a fresh store at once would
  otherwise race in MLflow's schema migration.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

from alignclip.log import get_logger
from alignclip.tracking.client import _client

log = get_logger(__name__)

# MLflow's defaults are 120 s per request and 7 retries with back-off factor 2: minutes per call on a dead host.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
PROBE_TIMEOUT_S = 3.0
METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit


def configure_http() -> None:
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def spool_dir() -> Path:
    return Path(os.environ.get("ALIGNCLIP_TRACKING_SPOOL") or Path.home() / ".cache" / "alignclip" / "tracking-spool")


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether the tracking store answers, and if not why. Local stores (sqlite, files) always answer."""
    if not is_remote(uri):
        return True, ""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return True, ""
    except urllib.error.HTTPError as err:  # it answered: authentication and the like are MLflow's to report
        return err.code < 500, f"HTTP {err.code}"
    except (OSError, ValueError) as err:
        return False, str(getattr(err, "reason", err))


@contextmanager
def store_lock(uri: str):
    """Serialise the first use of a sqlite store between processes (schema creation and migration).

    The lock is taken on the store's folder, not on a lock file beside the store: such a file outlives the run, and
    in a checkout (`make demo`'s store is the repository's mlflow.db) it is an untracked file."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri[len("sqlite:///") :])
    database.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(database.parent, os.O_RDONLY)  # flock works on a folder's descriptor (Linux, macOS)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(folder, fcntl.LOCK_UN)
    finally:
        os.close(folder)


# ------------------------------------------------------------------------------------------------ applying


def apply_record(client, run_id: str, record: dict) -> None:
    """Send one record to a run (the same code path live and in replay)."""
    from mlflow.entities import Metric, Param, RunTag

    op = record["op"]
    if op == "params":
        params = [Param(k, str(v)[:6000]) for k, v in record["params"].items()]
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start : start + 100])
    elif op == "metrics":
        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in record["metrics"]]
        for start in range(0, len(metrics), METRICS_PER_REQUEST):
            client.log_batch(run_id, metrics=metrics[start : start + METRICS_PER_REQUEST])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in record["tags"].items()])
    elif op == "artifact":
        path = Path(record["path"])
        if not path.exists():
            log.warning("artifact %s no longer exists: not uploaded", path)
        elif path.is_dir():
            client.log_artifacts(run_id, str(path), record.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), record.get("artifact_path"))
    elif op == "end":
        client.set_terminated(run_id, record["status"])
    else:
        raise ValueError(f"unknown tracking record {op!r}")


def experiment_id_of(client, name: str) -> str:
    """The id of the experiment called ``name``, created if there is none."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - another stage created it meanwhile
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def create_run(client, header: dict) -> str:
    """Create the run a spool header describes (the server was down when the stage started)."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    experiment_id = experiment_id_of(client, header["experiment"])
    tags = dict(header.get("tags") or {})
    if header.get("parent_run_id"):
        tags[MLFLOW_PARENT_RUN_ID] = header["parent_run_id"]
    tags[MLFLOW_RUN_NAME] = header["run_name"]
    run = client.create_run(experiment_id, start_time=header.get("start_ms"), tags=tags, run_name=header["run_name"])
    return run.info.run_id


# ------------------------------------------------------------------------------------------------ the spool


class Spool:
    """One run's unsent records: a JSON-lines file whose first line (the header) names the store and the run.
    The writing process holds an exclusive lock on it, so a replay elsewhere never takes a live run's file."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = None

    @classmethod
    def create(cls, header: dict) -> "Spool":
        folder = spool_dir()
        folder.mkdir(parents=True, exist_ok=True)
        spool = cls(folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl")
        spool._handle = open(spool.path, "a")
        fcntl.flock(spool._handle, fcntl.LOCK_EX)
        spool.append({"op": "run", **header})
        return spool

    def append(self, record: dict) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def replay(path: Path, uri: str | None = None, held: bool = False) -> tuple[str, int]:
    """Send a spool file's records to its store; delete the file when all went through.

    Returns (run id, records sent). Raises on failure, after rewriting the file with what is left (nothing is
    sent twice). ``held``: the caller already holds the file's lock (the live process replaying its own spool).
    """
    with open(path, "r+") as handle:
        if not held:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"{path}: in use by a running stage") from None
        lines = [json.loads(line) for line in handle.read().splitlines() if line.strip()]
        if not lines or lines[0].get("op") != "run":
            raise ValueError(f"{path}: not a tracking spool file (no header line)")
        header, records = lines[0], lines[1:]
        uri = uri or header["uri"]
        sent = 0
        try:
            with store_lock(uri):
                client = _client(uri)
                if not header.get("run_id"):
                    header["run_id"] = create_run(client, header)
            for record in records:
                apply_record(client, header["run_id"], record)
                sent += 1
        except BaseException:
            handle.seek(0)
            handle.truncate()
            handle.write("".join(json.dumps(r) + "\n" for r in [header, *records[sent:]]))
            handle.flush()
            raise
    path.unlink()
    return header["run_id"], sent


def pending_spools(uri: str | None = None) -> list[Path]:
    folder = spool_dir()
    found = []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        try:
            with open(path) as handle:
                header = json.loads(handle.readline() or "{}")
        except (OSError, ValueError):
            continue
        if uri is None or header.get("uri") == uri:
            found.append(path)
    return found


def sync(uri: str | None = None, quiet: bool = False) -> list[tuple[Path, str, int]]:
    """Replay every spool file (of one store, or all); files in use by a running stage are left alone.
    ``quiet``: a store that still does not answer is not an error (a stage tries this at its start)."""
    configure_http()
    done = []
    for path in pending_spools(uri):
        try:
            run_id, sent = replay(path)
        except RuntimeError as err:
            if not quiet:
                log.info("%s", err)
            continue
        except Exception as err:  # noqa: BLE001 - unreachable store, rejected record
            if quiet:
                log.debug("replay of %s failed: %s", path, err)
                continue
            raise RuntimeError(f"{path}: replay failed ({str(err).splitlines()[0][:200]}); it is kept for a later sync") from None
        done.append((path, run_id, sent))
        log.info("replayed %d tracking record(s) of run %s from %s", sent, run_id, path.name)
    return done


# ------------------------------------------------------------------------------------------------ the sender


class AsyncSender:
    """A background thread that sends records in order; on failure it spools them and probes again later."""

    _STOP = object()

    def __init__(self, uri: str, run_id: str | None, header: dict):
        self.uri = uri
        self.run_id = run_id
        self.header = header
        self.online = run_id is not None
        self.spool: Spool | None = None
        self.retry_s = float(os.environ.get("ALIGNCLIP_TRACKING_RETRY_S", "30"))
        self._next_probe = time.monotonic() + self.retry_s
        self._queue: queue.Queue = queue.Queue()
        self._mlflow_client = None  # made on first use: a stage that starts offline never imports mlflow
        if not self.online:
            self._open_spool()
        self._thread = threading.Thread(target=self._loop, name="alignclip-tracking", daemon=True)
        self._thread.start()

    @property
    def _client(self):
        if self._mlflow_client is None:
            self._mlflow_client = _client(self.uri)
        return self._mlflow_client

    def send(self, record: dict) -> None:
        self._queue.put(record)

    def drain(self) -> None:
        """Wait until everything queued so far was sent or spooled."""
        self._queue.join()

    def close(self, status: str) -> None:
        """Send the run's end and stop the thread; what could not be sent stays spooled (and is said so)."""
        self.send({"op": "end", "status": status})
        self._queue.put(self._STOP)
        self._thread.join()
        if self.spool is not None:
            if reachable(self.uri)[0]:
                self._replay_own()
            if self.spool is not None:
                self.spool.release()
                log.warning(
                    "MLflow at %s did not receive everything; %s keeps it: replay with `alignclip tracking sync` "
                    "(the next stage that reaches the server does it too)", self.uri, self.spool.path,
                )

    def _open_spool(self) -> None:
        self.spool = Spool.create({**self.header, "uri": self.uri, "run_id": self.run_id or self.header.get("run_id")})

    def _replay_own(self) -> None:
        try:
            self.run_id, _ = replay(self.spool.path, self.uri, held=True)
        except Exception as err:  # noqa: BLE001 - still unreachable: keep spooling
            log.debug("replay failed: %s", err)
            return
        self.spool.release()
        self.spool = None
        self.online = True
        log.warning("MLflow at %s answers again: the spooled records were sent", self.uri)

    def _loop(self) -> None:
        while True:
            record = self._queue.get()
            try:
                if record is self._STOP:
                    return
                if not self.online and time.monotonic() >= self._next_probe:
                    self._next_probe = time.monotonic() + self.retry_s
                    if reachable(self.uri)[0]:
                        self._replay_own()
                if self.online:
                    try:
                        apply_record(self._client, self.run_id, record)
                        continue
                    except Exception as err:  # noqa: BLE001 - any failure of the server must not stop the stage
                        self.online = False
                        self._next_probe = time.monotonic() + self.retry_s
                        log.warning(
                            "MLflow at %s stopped answering (%s): the stage goes on; records are kept on disk",
                            self.uri, str(err).splitlines()[0][:200],
                        )
                        self._open_spool()
                self.spool.append(record)
            finally:
                self._queue.task_done()
