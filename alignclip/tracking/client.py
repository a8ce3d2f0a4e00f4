"""Which tracking store a stage talks to, and the one MLflow client for it.

The store is resolved here and only here: an explicit URI, else ``MLFLOW_TRACKING_URI``. The client is always made
for that resolved URI, never from MLflow's process-global one (``mlflow.set_tracking_uri``), which anything that ran
earlier in the same process may have set: a test, a notebook, ``log_model``'s fluent calls.
"""

from __future__ import annotations

import os
from contextlib import contextmanager


def tracking_uri(uri: str | None = None) -> str | None:
    """The tracking store: ``uri`` if given, else ``MLFLOW_TRACKING_URI``; None when tracking is off."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def _client(uri: str | None = None):
    """An ``MlflowClient`` of the resolved store (its model registry is that store too, unless
    ``MLFLOW_REGISTRY_URI`` says otherwise)."""
    resolved = tracking_uri(uri)
    if not resolved:
        # MlflowClient() would fall back to the process-global URI or ./mlruns: never a store the user named
        raise RuntimeError("MLflow tracking is off: no tracking URI given and MLFLOW_TRACKING_URI is not set")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=resolved)


@contextmanager
def fluent_uri(uri: str):
    """MLflow's fluent API (``mlflow.start_run``, ``mlflow.pytorch.log_model``) reads the process-global URI only:
    set it for the block, then put back the global URI and ``MLFLOW_TRACKING_URI`` as they were (setting the global
    also exports the variable, which would redirect every later resolution in this process)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    global_before, env_before = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(global_before)
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before
