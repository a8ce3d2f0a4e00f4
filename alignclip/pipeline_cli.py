"""`alignclip pipeline compile|submit|run`: the KFP side of the CLI (kfp is imported only here)."""

from __future__ import annotations

import sys
from pathlib import Path


def _import_pipelines():
    # pipelines/ and components/ sit at the project root, beside the package (and in the image's /app).
    root = Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from pipelines import alignclip_pipeline

    return alignclip_pipeline


def cluster_settings(gpu_type=None, gpus=None, node_selector=None, tolerations=None, retries=None):
    module = _import_pipelines()
    settings = module.ClusterSettings()
    if gpu_type:
        settings.gpu_type = gpu_type
    if gpus is not None:
        settings.gpus = gpus
    if node_selector:
        settings.node_selector = dict(item.split("=", 1) for item in node_selector)
    if tolerations:
        parsed = []
        for item in tolerations:  # key[=value]:Effect
            spec, _, effect = item.partition(":")
            key, _, value = spec.partition("=")
            parsed.append({"key": key, "operator": "Equal" if value else "Exists", **({"value": value} if value else {}), "effect": effect or "NoSchedule"})
        settings.tolerations = parsed
    if retries is not None:
        settings.train_retries = retries
    return settings


def grid_arguments(arguments: dict) -> dict:
    """params.yaml's methods / test_domains / seeds become the pipeline's ``train_grid``."""
    arguments = dict(arguments)
    parts = [arguments.pop(k, None) for k in ("train_methods", "train_test_domains")]
    if any(p is not None for p in parts):
        from alignclip.config import pipeline_defaults

        defaults = pipeline_defaults()
        methods = parts[0] if parts[0] is not None else defaults["train_methods"]
        domains = parts[1] if parts[1] is not None else defaults["train_test_domains"]
        seeds = arguments.get("train_seeds", defaults["train_seeds"])
        arguments["train_grid"] = _import_pipelines().make_grid(methods, domains, seeds)
    return arguments


def compile_pipeline(family: str, output: str | Path, cluster=None, params: dict | None = None) -> Path:
    from kfp import compiler

    module = _import_pipelines()
    func = module.build_all(cluster) if family == "all" else module.build_pipeline(family, cluster, params)
    compiler.Compiler().compile(func, str(output))
    return Path(output)


def submit(family: str, host: str, experiment: str | None, run_name: str | None, arguments: dict, cluster=None) -> str:
    import kfp

    module = _import_pipelines()
    func = module.build_all(cluster) if family == "all" else module.build_pipeline(family, cluster)
    client = kfp.Client(host=host)
    result = client.create_run_from_pipeline_func(
        func, arguments=grid_arguments(arguments), experiment_name=experiment or module.FAMILIES.get(family, ("alignclip",))[0], run_name=run_name
    )
    return f"{host.rstrip('/')}/#/runs/details/{result.run_id}"


def run_local(family: str, pipeline_root: str | Path, arguments: dict):
    from kfp import local

    module = _import_pipelines()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    # Locally a failure is a bug to see at once: no retries with minute-long back-offs.
    func = module.build_pipeline(family, module.ClusterSettings(train_retries=0))
    return func(**grid_arguments(arguments))
