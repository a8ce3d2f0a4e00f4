"""What a pipeline task needs to run a stage: the CLI command and the environment of a nested MLflow run.

KFP lightweight components are serialised as their function source, so shared code lives here, in the package
that the image (and the local runner's interpreter) already has.
"""

from __future__ import annotations

import os
import subprocess
import sys


def task_env(parent_run_file: str, experiment: str, tracking_uri: str) -> dict:
    """The process environment of a stage: MLflow URI, experiment, and the pipeline's parent run id (read from
    the parent-run artifact)."""
    with open(parent_run_file) as handle:
        parent = handle.read().strip()
    env = dict(os.environ, ALIGNCLIP_PARENT_RUN_ID=parent, ALIGNCLIP_EXPERIMENT=str(experiment))
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def run_cli(*args: str, env: dict | None = None) -> None:
    """`alignclip ARGS...` with this interpreter: the same CLI as the image's entrypoint."""
    subprocess.run([sys.executable, "-m", "alignclip", *map(str, args)], check=True, env=env)
