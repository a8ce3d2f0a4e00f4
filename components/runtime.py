"""What a KFP task's process does around its stage: the environment of a nested MLflow run, and the `alignclip`
CLI as a subprocess that hears the pod's SIGTERM.

KFP lightweight components are serialised as their function source, so the code they share lives in a module of
the installed package (``alignclip_kfp.components.runtime``) that the image and the local runner's interpreter
already have. No kfp here: a task imports this next to the executor, and tests call it directly.
"""

from __future__ import annotations

import os
import signal
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
    run_forwarding_sigterm([sys.executable, "-m", "alignclip", *map(str, args)], env)


def run_forwarding_sigterm(command: list[str], env: dict | None = None) -> None:
    """Run ``command`` to its end; a failure raises CalledProcessError.

    SIGTERM (Kubernetes stopping the pod) is passed on to the stage, which then writes its resume checkpoint;
    otherwise only this wrapper would hear it and the stage would be killed at the end of the grace period."""
    process = subprocess.Popen(command, env=env)
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signal.SIGTERM))
    except ValueError:  # not the main thread: no handler to install
        previous = None
    try:
        code = process.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code:
        raise subprocess.CalledProcessError(code, command)
