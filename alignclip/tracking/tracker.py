"""A stage's tracked run: the run handle it logs into (``Tracker``) and the run's life (``start_run``). Without
MLflow configured every call is a no-op, so the library runs alone.

Tracking is on when ``MLFLOW_TRACKING_URI`` is set (a server, or ``sqlite:///mlflow.db``) or a URI is passed.
A parent run id (an argument, ``ALIGNCLIP_PARENT_RUN_ID``, or the open pipeline run of a ``dvc repro``) makes the
run a nested child of a pipeline run. What is logged where is described in ``alignclip.tracking.runs``.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import alignclip.tracking.runs as runs
import alignclip.tracking.transport as transport
from alignclip.log import get_logger
from alignclip.tracking.client import _client, fluent_uri, tracking_uri
from alignclip.tracking.provenance import provenance_tags

log = get_logger(__name__)


def _flatten(params: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class Tracker:
    """A thin run handle: no-op when disabled, MLflow when enabled. It decides what is logged; the transport
    (``alignclip.tracking.transport``) sends it in the background and keeps on disk what the server missed."""

    def __init__(self, enabled: bool, flush_every: int = 200, transport=None):
        self.enabled = enabled
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.flush_every = flush_every
        self._pending: list = []
        self._transport = transport

    @property
    def uri(self) -> str | None:
        """The tracking store of this run (None: tracking is off)."""
        return self._transport.uri if self._transport is not None else None

    @property
    def online(self) -> bool:
        """Whether the server takes records now (False: they are spooled on disk; synchronous calls would hang)."""
        return bool(self.enabled and self._transport is not None and self._transport.online)

    def log_params(self, params: dict) -> None:
        if self.enabled:
            flat = {k: ("none" if v is None else v) for k, v in _flatten(params).items()}
            self._transport.send({"op": "params", "params": {k: str(v)[:6000] for k, v in flat.items()}})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Buffered: per-step metrics go to the store in batches (one request per ``flush_every`` values)."""
        if self.enabled:
            import time

            now = int(time.time() * 1000)
            self._pending.extend([k, float(v), now, step or 0] for k, v in metrics.items())
            if len(self._pending) >= self.flush_every:
                self.flush()

    def flush(self) -> None:
        if self.enabled and self._pending:
            self._transport.send({"op": "metrics", "metrics": self._pending})
            self._pending = []

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self.flush()  # records leave in the order they were made
            self._transport.send({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            self._transport.send({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_input(self, frame, name: str, source: str, digest: str, context: str) -> None:
        """A dataset as a run input (the UI's dataset column): its rows, where it came from and its digest.
        Synchronous, by run id; skipped with a warning when the store cannot take it (tracking never costs a result)."""
        if not self.enabled or not self.run_id:
            return
        try:
            import warnings

            import mlflow.data
            from mlflow.entities import DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            with warnings.catch_warnings():  # schema-inference hints about integer columns: not actionable here
                warnings.simplefilter("ignore", UserWarning)
                try:
                    dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest)
                except Exception:  # noqa: BLE001 - a root MLflow cannot resolve as a source is still named
                    dataset = mlflow.data.from_pandas(frame, name=name, digest=digest)
                entity = dataset._to_mlflow_entity()  # infers the schema (the hints above come from here too)
            entry = DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
            _client(self._transport.uri).log_inputs(self.run_id, datasets=[entry])
        except Exception as err:  # noqa: BLE001 - the result is on disk; tracking must not cost it
            log.warning("could not log the dataset input to MLflow (%s)", str(err).splitlines()[0][:200])

    def log_model(self, module, name: str, registered_name: str | None, example, metadata: dict | None = None):
        """Log (and register) a torch module; the pt2 format needs an input example. Returns the registered
        version, or None. Synchronous (after what is queued); skipped with a warning when the server is
        unreachable: the model stays on disk."""
        if not self.enabled:
            return None
        self.flush()
        self._transport.drain()
        if not self._transport.online:
            log.warning("MLflow is unreachable: the model was not logged or registered (it is on disk)")
            return None
        try:
            import mlflow
            import mlflow.pytorch
            import torch

            with fluent_uri(self._transport.uri), mlflow.start_run(run_id=self.run_id):
                # pt2 (torch.export) is the safe format; it needs the input example, which also records the signature.
                # The requirements are stated: inferring them re-imports the model in a subprocess (a minute on a CPU).
                info = mlflow.pytorch.log_model(
                    module,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
                    name=name,
                    registered_model_name=registered_name,
                    input_example=example,
                    serialization_format="pt2",
                    metadata=metadata,
                    # MLflow would load the pt2 file back and run the example through it: 2 of the 4.4 s a tiny
                    # model's logging takes (measured), per grid cell. The export already ran the module on the
                    # example; tests/test_pipeline.py loads a registered version and predicts with it.
                    validate_serving_input=False,
                )
            return info.registered_model_version
        except Exception as err:  # noqa: BLE001 - the result is on disk; tracking must not cost it
            log.warning("could not log the model to MLflow (%s): it stays on disk", str(err).splitlines()[0][:200])
            return None


def pipeline_run_id(experiment: str, uri: str | None = None) -> str | None:
    """The parent run of the pipeline this process is a stage of (KFP: ``ALIGNCLIP_PARENT_RUN_ID``; DVC: the open
    run of this configuration, created on first use), or None (tracking off, a stage run by hand, or a store that
    cannot answer: then a warning, and the stage runs without a parent)."""
    uri = tracking_uri(uri)
    if not uri:
        return None
    if os.environ.get("ALIGNCLIP_PARENT_RUN_ID"):
        return os.environ["ALIGNCLIP_PARENT_RUN_ID"]
    if not _answers(uri):  # start_run then warns once; without the probe MLflow's own retries take minutes
        return None
    try:
        return runs.dvc_parent_run(experiment, uri)
    except Exception as err:  # noqa: BLE001 - tracking must not cost a result
        log.warning("could not find or open the pipeline's MLflow run (%s)", str(err).splitlines()[0][:200])
        return None


@contextmanager
def start_run(
    experiment: str,
    run_name: str,
    uri: str | None = None,
    parent_run_id: str | None = None,
    tags: dict | None = None,
    resume_run_id: str | None = None,
):
    """Yield a Tracker inside an MLflow run (nested under the pipeline's run if there is one: ``parent_run_id``,
    ``ALIGNCLIP_PARENT_RUN_ID``, or the open run of this ``dvc repro``); a no-op without MLflow.

    ``resume_run_id`` continues an existing run (evaluate logs into its cell's training run, a resumed training).
    The run ends FINISHED, FAILED (an exception; the pipeline run is marked FAILED too) or KILLED (interrupted,
    preempted). An unreachable server costs a few seconds and a warning: the stage runs, and the records wait on
    disk (see ``alignclip.tracking.transport``).
    """
    uri = tracking_uri(uri)
    if not uri:
        yield Tracker(False)
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    transport.configure_http()
    parent_run_id = parent_run_id or pipeline_run_id(experiment, uri)
    all_tags = {**provenance_tags(), **(tags or {})}
    header = {"experiment": experiment, "run_name": run_name, "parent_run_id": parent_run_id, "tags": all_tags,
              "start_ms": int(time.time() * 1000)}
    run_id = _open_run(uri, header, resume_run_id)
    sender = transport.AsyncSender(uri, run_id, {**header, "run_id": resume_run_id})
    tracker = Tracker(True, transport=sender)
    tracker.run_id = run_id
    tracker.parent_run_id = parent_run_id
    status = "FINISHED"
    try:
        yield tracker
    except KeyboardInterrupt:  # Ctrl-C: the stage was stopped, it did not fail
        status = "KILLED"
        _mark_parent(parent_run_id, run_name, uri)
        raise
    except BaseException as err:  # a preempted stage (resume.Preempted) says so itself
        status = getattr(err, "stage_status", "FAILED")
        _mark_parent(parent_run_id, run_name, uri)
        raise
    finally:
        tracker.flush()
        sender.close(status)


def view_line(parent_run_id: str | None = None, run_id: str | None = None, uri: str | None = None) -> str | None:
    """The line a stage prints after its run: ``MLflow: <url>`` of its pipeline's comparison view, or of its own
    run's page when it has no pipeline; None without tracking."""
    uri = tracking_uri(uri)
    if not uri or not (parent_run_id or run_id) or not _answers(uri):
        return None
    try:
        if parent_run_id:
            found = runs.pipeline_view(parent_run_id, uri)
            if found:
                return runs.view_hint(uri, *found)
        if run_id:
            return runs.view_hint(uri, _client(uri).get_run(run_id).info.experiment_id, run_id=run_id)
    except Exception as err:  # noqa: BLE001 - a link is a convenience; tracking must not cost a result
        log.warning("could not find the run's MLflow view (%s)", str(err).splitlines()[0][:200])
    return None


def _open_run(uri: str, header: dict, resume_run_id: str | None) -> str | None:
    """Create (or re-open) the run; None when the store cannot be reached (the stage then runs offline)."""
    ok, why = transport.reachable(uri)
    if not ok:
        log.warning("MLflow at %s is unreachable (%s): the stage runs without it; its records are kept on disk", uri, why)
        return None
    try:
        transport.sync(uri, quiet=True)  # what earlier stages could not send
        with transport.store_lock(uri):
            client = _client(uri)  # the client creates (and migrates) a sqlite store: under the lock
            if resume_run_id:
                try:
                    client.update_run(resume_run_id, status="RUNNING")
                    return resume_run_id
                except Exception as err:  # noqa: BLE001 - e.g. the checkpoint came from another tracking store
                    log.warning("cannot continue MLflow run %s (%s): logging to a new run", resume_run_id,
                                str(err).splitlines()[0][:200])
            from mlflow.tracking.context.registry import resolve_tags

            return transport.create_run(client, {**header, "tags": resolve_tags(header["tags"])})
    except Exception as err:  # noqa: BLE001 - the server answered the probe but not the request
        log.warning("MLflow at %s failed to open the run (%s): the stage runs without it", uri, str(err).splitlines()[0][:200])
        return None


def _mark_parent(parent_run_id: str | None, stage: str, uri: str) -> None:
    if parent_run_id:
        runs.mark_failed(parent_run_id, stage, uri)


def _answers(uri: str) -> bool:
    """The 3 s probe, with MLflow's HTTP retries bounded, before any request a stage makes to the store."""
    transport.configure_http()
    known = _PROBED.get(uri)
    if known is None or time.monotonic() - known[0] > 30:  # one probe serves the stage's first requests
        known = _PROBED[uri] = (time.monotonic(), transport.reachable(uri)[0])
    return known[1]


_PROBED: dict[str, tuple[float, bool]] = {}


def resumable(run_id: str | None, parent_run_id: str | None, uri: str | None = None) -> bool:
    """Whether ``run_id`` (a cell's training run, from train.json) is in this store under this pipeline run."""
    uri = tracking_uri(uri)
    if not run_id or not uri:  # without a store there is no run to continue
        return False
    if not _answers(uri):
        # the server is down: continue the checkpoint's run anyway; the records wait on disk under that run id
        # and `tracking sync` (or the next stage) puts them into it
        return True
    from mlflow.exceptions import MlflowException

    try:
        run = _client(uri).get_run(run_id)
    except (MlflowException, OSError, ValueError):  # not in this store, or the store cannot answer
        return False
    return run.data.tags.get("mlflow.parentRunId") == parent_run_id
