"""The one place that talks to MLflow. Without MLflow configured every call is a no-op, so the library runs alone.

Tracking is on when ``MLFLOW_TRACKING_URI`` is set (a server, or ``sqlite:///mlflow.db``) or a URI is passed.
A parent run id (``ALIGNCLIP_PARENT_RUN_ID`` or an argument) makes the run a nested child of a pipeline run.
"""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from alignclip.log import get_logger

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


def provenance_tags() -> dict[str, str]:
    """git commit, dataset version (DVC hash of data.dvc) and image tag, so every number leads back to its inputs."""
    tags = {}
    # The code's own checkout, not the working directory: stages may run anywhere (a KFP task's cwd, a temp dir).
    project = Path(__file__).resolve().parent.parent
    commit = os.environ.get("ALIGNCLIP_GIT_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "-C", str(project), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = None
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git_commit"] = commit
    data_version = os.environ.get("ALIGNCLIP_DATA_VERSION")
    dvc_file = next((p for p in (Path("data.dvc"), project / "data.dvc") if p.is_file()), None)
    if not data_version and dvc_file is not None:
        import yaml

        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [{}])
        data_version = outs[0].get("md5") if outs else None
    if data_version:
        tags["data_version"] = str(data_version)
    if os.environ.get("ALIGNCLIP_IMAGE"):
        tags["image"] = os.environ["ALIGNCLIP_IMAGE"]
    return tags


class Tracker:
    """A thin run handle: no-op when disabled, MLflow when enabled. It decides what is logged; the transport
    (``alignclip.tracking_transport``) sends it in the background and keeps on disk what the server missed."""

    def __init__(self, enabled: bool, flush_every: int = 200, transport=None):
        self.enabled = enabled
        self.run_id: str | None = None
        self.flush_every = flush_every
        self._pending: list = []
        self._transport = transport

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

    def log_model(self, module, name: str, registered_name: str | None, example) -> None:
        """Log (and register) a torch module; the pt2 format needs an input example. Synchronous (after what is
        queued); skipped with a warning when the server is unreachable: the model stays on disk."""
        if not self.enabled:
            return
        self.flush()
        self._transport.drain()
        if not self._transport.online:
            log.warning("MLflow is unreachable: the model was not logged or registered (it is on disk)")
            return
        try:
            import mlflow
            import mlflow.pytorch

            mlflow.set_tracking_uri(self._transport.uri)
            with mlflow.start_run(run_id=self.run_id):
                # pt2 (torch.export) is the safe format; it needs the input example, which also records the signature.
                mlflow.pytorch.log_model(
                    module,
                    name=name,
                    registered_model_name=registered_name,
                    input_example=example,
                    serialization_format="pt2",
                )
        except Exception as err:  # noqa: BLE001 - the result is on disk; tracking must not cost it
            log.warning("could not log the model to MLflow (%s): it stays on disk", str(err).splitlines()[0][:200])


def tracking_uri(uri: str | None = None) -> str | None:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


@contextmanager
def start_run(
    experiment: str,
    run_name: str,
    uri: str | None = None,
    parent_run_id: str | None = None,
    tags: dict | None = None,
    resume_run_id: str | None = None,
):
    """Yield a Tracker inside an MLflow run (nested under ``parent_run_id`` if given); a no-op without MLflow.

    ``resume_run_id`` continues an existing run (a resumed training). The run ends FINISHED, FAILED (an
    exception) or KILLED (interrupted, preempted). An unreachable server costs a few seconds and a warning: the
    stage runs, and the records wait on disk (see ``alignclip.tracking_transport``).
    """
    from alignclip import tracking_transport as transport

    uri = tracking_uri(uri)
    if not uri:
        yield Tracker(False)
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    transport.configure_http()
    parent_run_id = parent_run_id or os.environ.get("ALIGNCLIP_PARENT_RUN_ID") or None
    all_tags = {**provenance_tags(), **(tags or {})}
    header = {"experiment": experiment, "run_name": run_name, "parent_run_id": parent_run_id, "tags": all_tags,
              "start_ms": int(time.time() * 1000)}
    run_id = _open_run(uri, header, resume_run_id)
    sender = transport.AsyncSender(uri, run_id, {**header, "run_id": resume_run_id})
    tracker = Tracker(True, transport=sender)
    tracker.run_id = run_id
    status = "FINISHED"
    try:
        yield tracker
    except KeyboardInterrupt:  # Ctrl-C: the stage was stopped, it did not fail
        status = "KILLED"
        raise
    except BaseException as err:  # a preempted stage (resume.Preempted) says so itself
        status = getattr(err, "stage_status", "FAILED")
        raise
    finally:
        tracker.flush()
        sender.close(status)


def _open_run(uri: str, header: dict, resume_run_id: str | None) -> str | None:
    """Create (or re-open) the run; None when the store cannot be reached (the stage then runs offline)."""
    from alignclip import tracking_transport as transport

    ok, why = transport.reachable(uri)
    if not ok:
        log.warning("MLflow at %s is unreachable (%s): the stage runs without it; its records are kept on disk", uri, why)
        return None
    try:
        transport.sync(uri, quiet=True)  # what earlier stages could not send
        with transport.store_lock(uri):
            client = transport._client(uri)  # the client creates (and migrates) a sqlite store: under the lock
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
