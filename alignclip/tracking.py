"""The one place that talks to MLflow. Without MLflow configured every call is a no-op, so the library runs alone.

Tracking is on when ``MLFLOW_TRACKING_URI`` is set (a server, or ``sqlite:///mlflow.db``) or a URI is passed.
A parent run id (an argument, ``ALIGNCLIP_PARENT_RUN_ID``, or the open pipeline run of a ``dvc repro``) makes the
run a nested child of a pipeline run. What is logged where is described in ``alignclip.runs``.
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
    """git commit and image tag, so every number leads back to the code that made it."""
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
    # The data version is not a property of the checkout (data.dvc) but of the data a stage read:
    # alignclip.runs.data_tags, from the prepared dataset's root and manifest.
    if os.environ.get("ALIGNCLIP_IMAGE"):
        tags["image"] = os.environ["ALIGNCLIP_IMAGE"]
    return tags


class Tracker:
    """A thin run handle: no-op when disabled, MLflow when enabled."""

    def __init__(self, enabled: bool, flush_every: int = 200):
        self.enabled = enabled
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
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

    def log_input(self, frame, name: str, source: str, digest: str, context: str) -> None:
        """A dataset as a run input (the UI's dataset column): its rows, where it came from and its digest."""
        if self.enabled:
            import warnings

            import mlflow.data
            from mlflow import MlflowClient
            from mlflow.entities import DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            with warnings.catch_warnings():  # schema-inference hints about integer columns: not actionable here
                warnings.simplefilter("ignore", UserWarning)
                try:
                    dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest)
                except Exception:  # noqa: BLE001 - a root MLflow cannot resolve as a source is still named
                    dataset = mlflow.data.from_pandas(frame, name=name, digest=digest)
                entity = dataset._to_mlflow_entity()  # infers the schema (the hints above come from here too)
            # by run id (not the active run): the input lands in this tracker's run however records are sent
            entry = DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
            MlflowClient().log_inputs(self.run_id, datasets=[entry])

    def log_model(self, module, name: str, registered_name: str | None, example, metadata: dict | None = None):
        """Log (and register) a torch module; the pt2 format needs an input example. Returns the model version."""
        if self.enabled:
            import mlflow
            import mlflow.pytorch
            import torch

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
            )
            return info.registered_model_version
        return None


def tracking_uri(uri: str | None = None) -> str | None:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def pipeline_run_id(experiment: str, uri: str | None = None) -> str | None:
    """The parent run of the pipeline this process is a stage of (KFP: ``ALIGNCLIP_PARENT_RUN_ID``; DVC: the open
    run of this configuration, created on first use), or None (tracking off, or a stage run by hand)."""
    uri = tracking_uri(uri)
    if not uri:
        return None
    import mlflow

    from alignclip import runs

    mlflow.set_tracking_uri(uri)
    return os.environ.get("ALIGNCLIP_PARENT_RUN_ID") or runs.dvc_parent_run(experiment)


@contextmanager
def start_run(
    experiment: str,
    run_name: str,
    uri: str | None = None,
    parent_run_id: str | None = None,
    tags: dict | None = None,
    resume_run_id: str | None = None,
):
    """Yield a Tracker inside an MLflow run (nested under the pipeline's run if there is one); a no-op without MLflow.

    ``resume_run_id`` continues an existing run (evaluate logs into its cell's training run). A failure inside
    marks the run and the pipeline run FAILED.
    """
    uri = tracking_uri(uri)
    if not uri:
        yield Tracker(False)
        return
    import mlflow

    from alignclip import runs

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(uri)
    runs.use_experiment(experiment)
    parent_run_id = parent_run_id or pipeline_run_id(experiment, uri)
    all_tags = {k: str(v) for k, v in {**provenance_tags(), **(tags or {})}.items()}
    if resume_run_id:
        context = mlflow.start_run(run_id=resume_run_id)
    else:
        context = mlflow.start_run(run_name=run_name, parent_run_id=parent_run_id, tags=all_tags)
    with context as run:
        if resume_run_id:
            mlflow.set_tags(all_tags)
        tracker = Tracker(True)
        tracker.run_id = run.info.run_id
        tracker.parent_run_id = parent_run_id
        try:
            yield tracker
        except BaseException:
            if parent_run_id:
                runs.mark_failed(parent_run_id, run_name)
            raise
        finally:
            tracker.flush()


def resumable(run_id: str | None, parent_run_id: str | None) -> bool:
    """Whether ``run_id`` (a cell's training run, from train.json) is in this store under this pipeline run."""
    if not run_id:
        return False
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return run.data.tags.get("mlflow.parentRunId") == parent_run_id
