"""The one place that talks to MLflow. Without MLflow configured every call is a no-op, so the library runs alone.

Tracking is on when ``MLFLOW_TRACKING_URI`` is set (a server, or ``sqlite:///mlflow.db``) or a URI is passed.
A parent run id (``ALIGNCLIP_PARENT_RUN_ID`` or an argument) makes the run a nested child of a pipeline run.
"""

from __future__ import annotations

import os
import subprocess
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
    """A thin run handle: no-op when disabled, MLflow when enabled."""

    def __init__(self, enabled: bool, flush_every: int = 200):
        self.enabled = enabled
        self.run_id: str | None = None
        self.flush_every = flush_every
        self._pending: list = []

    def log_params(self, params: dict) -> None:
        if self.enabled:
            import mlflow

            flat = {k: ("none" if v is None else v) for k, v in _flatten(params).items()}
            mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Buffered: per-step metrics go to the store in batches (one request per ``flush_every`` values)."""
        if self.enabled:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._pending.extend(Metric(k, float(v), now, step or 0) for k, v in metrics.items())
            if len(self._pending) >= self.flush_every:
                self.flush()

    def flush(self) -> None:
        if self.enabled and self._pending:
            from mlflow.tracking import MlflowClient

            for start in range(0, len(self._pending), 1000):  # the store's batch limit
                MlflowClient().log_batch(self.run_id, metrics=self._pending[start : start + 1000])
            self._pending = []

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            import mlflow

            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_model(self, module, name: str, registered_name: str | None, example) -> None:
        """Log (and register) a torch module; the pt2 format needs an input example."""
        if self.enabled:
            import mlflow.pytorch

            # pt2 (torch.export) is the safe format; it needs the input example, which also records the signature.
            mlflow.pytorch.log_model(
                module,
                name=name,
                registered_model_name=registered_name,
                input_example=example,
                serialization_format="pt2",
            )


def tracking_uri(uri: str | None = None) -> str | None:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


@contextmanager
def start_run(
    experiment: str,
    run_name: str,
    uri: str | None = None,
    parent_run_id: str | None = None,
    tags: dict | None = None,
):
    """Yield a Tracker inside an MLflow run (nested under ``parent_run_id`` if given); a no-op without MLflow."""
    uri = tracking_uri(uri)
    if not uri:
        yield Tracker(False)
        return
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    parent_run_id = parent_run_id or os.environ.get("ALIGNCLIP_PARENT_RUN_ID") or None
    all_tags = {**provenance_tags(), **(tags or {})}
    with mlflow.start_run(run_name=run_name, parent_run_id=parent_run_id, tags=all_tags) as run:
        tracker = Tracker(True)
        tracker.run_id = run.info.run_id
        try:
            yield tracker
        finally:
            tracker.flush()
