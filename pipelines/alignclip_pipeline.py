"""The AlignCLIP DAGs: prepare -> similarity -> ParallelFor(method x held-out domain x seed)[train -> evaluate]
-> dsl.Collected -> report, inside a parent MLflow run.

One factory builds every benchmark family. Its parameters are the resolved settings of alignclip/config.py
(``section_key``), so a compiled package's defaults are exactly what a run of it gets; the families and their
defaults are data in that module. Kubernetes settings (accelerator, node selector, tolerations, resources, image,
parallelism, secrets) are compile-time options (``ClusterSettings``): kfp applies them on a cluster and ignores
them in the local runner.
"""



import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import List

from kfp import dsl, kubernetes

from alignclip import __version__
from alignclip.config import COMPOSITES, FAMILIES, check_family, composite_members, resolve
from alignclip_kfp.arguments import PARAMETER_HELP, pipeline_arguments
from alignclip_kfp.components.stages import build_components

# The default image tag follows the package version; the registry is a placeholder until an image is pushed.
PLACEHOLDER_IMAGE = f"ghcr.io/alignclip/alignclip:{__version__}"


@dataclass
class ClusterSettings:
    """How tasks run on Kubernetes (ignored by the local runner)."""

    gpu_type: str = "nvidia.com/gpu"
    gpus: int = 1
    # None by default: requesting the GPU resource already places a pod on a node that has it, while a label such as
    # nvidia.com/gpu.present exists only where NVIDIA's GPU operator runs (not on a managed GKE or EKS GPU pool)
    node_selector: dict = field(default_factory=dict)
    tolerations: list = field(default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    cpu: str = "16"  # request = limit: the cgroup quota sizes the DataLoader workers (--num-workers auto: cpu - 1)
    memory: str = "32G"
    image: str = PLACEHOLDER_IMAGE
    max_parallelism: int = 8  # GPU pods (grid cells) at once: of the pipeline, or of a composite as a whole
    env_config_map: str = "alignclip-pipeline-env"  # key: AWS_ENDPOINT_URL_S3 (infra/README.md)
    retries: int = 2  # of the train and evaluate tasks (a preempted GPU pod is retried, not the run failed)
    s3_secret: str = "alignclip-s3"  # keys: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    mlflow_secret: str = "alignclip-mlflow"  # keys: MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD
    shm: str = ""  # the memory-backed /dev/shm of train/evaluate; empty: half of `memory` (it counts against it)
    # Bounds of every task pod (infra hardening): train/evaluate are limited to their requests; the other tasks get
    # these requests and limits (without a request Kubernetes would reserve the whole limit); each pod is stopped
    # after its deadline (activeDeadlineSeconds), a retry starts a new one.
    task_cpu: str = "1"
    task_memory: str = "4G"
    task_cpu_limit: str = "4"
    task_memory_limit: str = "16G"
    gpu_task_timeout: int = 48 * 3600
    task_timeout: int = 6 * 3600


@contextmanager
def caller_names_from_frames():
    """kfp 2.17 checks, in every task setting (set_cpu_request, set_env_variable, set_retry, ...), that the task has
    a container, and takes ``inspect.stack()`` to name the calling method in the error it would raise: the source
    lines and module of every frame on the stack, each module found by a scan of ``sys.modules``. A family's
    tasks make about 30 such calls, `all` about 650: most of its compile time (5 s of the CLI's 7, and half a
    minute in a process that has torch and mlflow loaded, such as a test's). While our tasks are configured, the
    same check names the caller from its frame; the compiled package is the same bytes (tests/test_pipeline.py)."""
    from kfp.dsl import pipeline_task

    original = pipeline_task.PipelineTask.__dict__.get("_ensure_container_spec_exists")
    if original is None:  # another kfp: nothing to replace
        yield
        return

    def ensure_container_spec_exists(self) -> None:
        if self.container_spec is None:
            raise ValueError(f"{sys._getframe(1).f_code.co_name} can only be used on single-step components, not "
                             "pipelines used as components, or special components like importers.")

    pipeline_task.PipelineTask._ensure_container_spec_exists = ensure_container_spec_exists
    try:
        yield
    finally:
        pipeline_task.PipelineTask._ensure_container_spec_exists = original


def _on_gpu(task, cluster: ClusterSettings, retries: int = 0):
    if cluster.gpus:
        task.set_accelerator_type(cluster.gpu_type).set_accelerator_limit(cluster.gpus)
    task.set_cpu_request(cluster.cpu).set_cpu_limit(cluster.cpu).set_memory_request(cluster.memory)
    task.set_memory_limit(cluster.memory)
    kubernetes.set_timeout(task, cluster.gpu_task_timeout)
    for key, value in cluster.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in cluster.tolerations:
        kubernetes.add_toleration(task, **toleration)
    # DataLoader workers share tensors through /dev/shm; the container default (64 MiB) is too small. A memory-backed
    # emptyDir counts against the pod's memory limit, so it takes a share of `memory`, not memory of its own.
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=shm_size(cluster))
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0)
    return task


def shm_size(cluster: ClusterSettings) -> str:
    """/dev/shm of a GPU task: ``cluster.shm``, or half of ``cluster.memory`` (a Kubernetes quantity)."""
    if cluster.shm:
        return cluster.shm
    number, unit = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)", cluster.memory).groups()
    half = float(number) / 2
    if half == int(half) and unit not in ("", "m"):
        return f"{int(half)}{unit}"
    factor = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}[unit]
    return f"{max(1, int(half * factor // 2**20))}Mi"


def _bounded(task, cluster: ClusterSettings):
    """Every task: the label infra/'s NetworkPolicies admit to MLflow and the S3 store, the image's non-root user,
    and requests, limits and a deadline unless _on_gpu set them."""
    kubernetes.add_pod_label(task, "alignclip.io/pipeline-task", "true")
    kubernetes.set_security_context(task, run_as_user=1000, run_as_group=1000, run_as_non_root=True)
    resources = task.container_spec.resources
    if resources is None or resources.cpu_limit is None:
        task.set_cpu_request(cluster.task_cpu).set_memory_request(cluster.task_memory)
        task.set_cpu_limit(cluster.task_cpu_limit).set_memory_limit(cluster.task_memory_limit)
        kubernetes.set_timeout(task, cluster.task_timeout)
    return task


def _secrets(task, cluster: ClusterSettings):
    """Credentials from Secrets and the S3 endpoint from a ConfigMap (infra/README.md)."""
    _bounded(task, cluster)
    task.set_env_variable("ALIGNCLIP_IMAGE", cluster.image)  # the image tag, as a provenance tag of MLflow runs
    kubernetes.use_secret_as_env(
        task, secret_name=cluster.s3_secret,
        secret_key_to_env={"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
        optional=True,
    )
    kubernetes.use_secret_as_env(
        task, secret_name=cluster.mlflow_secret,
        secret_key_to_env={"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"},
        optional=True,
    )
    # boto3 (and so every s3:// read and write of the CLI) takes its endpoint from AWS_ENDPOINT_URL_S3; without the
    # ConfigMap (AWS S3 itself) the variable stays unset. ALIGNCLIP_CHECKPOINT_ROOT puts resume checkpoints where a
    # retried task (a new pod) finds them.
    kubernetes.use_config_map_as_env(
        task, config_map_name=cluster.env_config_map,
        config_map_key_to_env={"AWS_ENDPOINT_URL_S3": "AWS_ENDPOINT_URL_S3", "ALIGNCLIP_CHECKPOINT_ROOT": "ALIGNCLIP_CHECKPOINT_ROOT"},
        optional=True,
    )
    return task


def build_pipeline(family: str = "demo", cluster: ClusterSettings | None = None, values: dict | None = None,
                   name: str | None = None):
    """The pipeline function of one benchmark family; ``values``: resolved settings (default: the family's);
    ``name``: the pipeline's name (default ``alignclip-<family>``)."""
    check_family(family)
    cluster = cluster or ClusterSettings()
    stages = build_components(cluster.image)
    p = pipeline_arguments(family, values if values is not None else resolve(family))

    def alignclip_pipeline(
        data_dataset: str = p["data_dataset"],
        data_root: str = p["data_root"],
        data_protocol: str = p["data_protocol"],
        data_holdout_fraction: float = p["data_holdout_fraction"],
        data_trial_seed: int = p["data_trial_seed"],
        data_shots: int = p["data_shots"],
        data_templates: str = p["data_templates"],
        data_class_names: str = p["data_class_names"],
        data_listing: str = p["data_listing"],
        data_test_split: str = p["data_test_split"],
        model_name: str = p["model_name"],
        model_pretrained: str = p["model_pretrained"],
        train_recipe: str = p["train_recipe"],
        train_formulation: str = p["train_formulation"],
        train_grid: List[dict] = p["train_grid"],
        train_seeds: List[int] = p["train_seeds"],
        train_steps: int = p["train_steps"],
        train_epochs: int = p["train_epochs"],
        train_batch_size: int = p["train_batch_size"],
        train_lr: float = p["train_lr"],
        train_hflip: bool = p["train_hflip"],
        mlflow_tracking_uri: str = p["mlflow_tracking_uri"],
        mlflow_experiment: str = p["mlflow_experiment"],
    ):
        # kfp calls this once, at compile time, with one channel per parameter; the tasks read them by name
        given = dict(locals())
        with caller_names_from_frames():
            _add_tasks(stages, cluster, family, SimpleNamespace(**{key: given[key] for key in p}))

    # the docstring's Args become the parameters' descriptions in the compiled package
    alignclip_pipeline.__doc__ = f"AlignCLIP {family}: {FAMILIES[family].description}.\n\nArgs:\n" + "\n".join(
        f"    {name}: {PARAMETER_HELP[name]}" for name in p
    )
    return dsl.pipeline(name=name or f"alignclip-{family.replace('_', '-')}", description=f"AlignCLIP {family}: prepare, similarity, train x evaluate, report")(alignclip_pipeline)


def _add_tasks(stages: SimpleNamespace, cluster: ClusterSettings, family: str, a: SimpleNamespace) -> None:
    """The DAG of one family, ``a``: the pipeline's parameters (channels). Caching: on for the pure tasks (prepare,
    similarity), off where a task has side effects (the MLflow parent run, training and evaluation runs, the
    report): a cached parent would hand a resubmission an old run id."""
    tracking = dict(experiment=a.mlflow_experiment, tracking_uri=a.mlflow_tracking_uri)
    parent = stages.start_run(
        **tracking, run_name=f"kfp {family}: {a.data_dataset} ({a.data_protocol})",
        params_json=f'{{"dataset": "{a.data_dataset}", "protocol": "{a.data_protocol}", "model": "{a.model_name}", "formulation": "{a.train_formulation}", "test_split": "{a.data_test_split}", "steps": "{a.train_steps}"}}',
        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_display_name("mlflow parent run")
    _secrets(parent.set_caching_options(False), cluster)
    tracking["parent_run"] = parent.outputs["run"]
    prepared = stages.prepare(
        dataset=a.data_dataset, root=a.data_root, protocol=a.data_protocol, holdout_fraction=a.data_holdout_fraction,
        trial_seed=a.data_trial_seed, shots=a.data_shots, seeds=a.train_seeds, templates=a.data_templates,
        class_names=a.data_class_names, listing=a.data_listing,
    ).set_display_name("prepare")
    _secrets(prepared.set_caching_options(True), cluster)
    matrix = stages.similarity(prepared=prepared.outputs["prepared"], model_name=a.model_name,
                               pretrained=a.model_pretrained, **tracking)
    _secrets(matrix.set_display_name("similarity matrix").set_caching_options(True), cluster)
    trained, scored = _add_cells(stages, cluster, a, prepared, matrix, tracking)
    final = stages.report(
        results=dsl.Collected(scored.outputs["results"]), models=dsl.Collected(trained.outputs["model"]),
        accuracies=dsl.Collected(scored.outputs["Output"]),
        prepared=prepared.outputs["prepared"], matrix=matrix.outputs["matrix"], **tracking,
    ).set_display_name("report")
    _secrets(final.set_caching_options(False), cluster)


def _add_cells(stages: SimpleNamespace, cluster: ClusterSettings, a: SimpleNamespace, prepared, matrix, tracking: dict):
    """train -> evaluate of each grid cell (method x held-out domain x seed), at most ``cluster.max_parallelism``
    at once, each on a GPU; returns the two tasks, whose outputs the report collects."""
    with dsl.ParallelFor(items=a.train_grid, name="method-domain-seed", parallelism=cluster.max_parallelism) as cell:
        trained = stages.train(
            prepared=prepared.outputs["prepared"], matrix=matrix.outputs["matrix"], cell=cell,
            formulation=a.train_formulation, recipe=a.train_recipe, steps=a.train_steps, epochs=a.train_epochs,
            batch_size=a.train_batch_size, lr=a.train_lr, hflip=a.train_hflip, model_name=a.model_name,
            pretrained=a.model_pretrained, **tracking,
        ).set_display_name("train")
        _secrets(_on_gpu(trained.set_caching_options(False), cluster, retries=cluster.retries), cluster)
        scored = stages.evaluate(prepared=prepared.outputs["prepared"], model=trained.outputs["model"],
                                 test_split=a.data_test_split, **tracking).set_display_name("evaluate")
        _secrets(_on_gpu(scored.set_caching_options(False), cluster, retries=cluster.retries), cluster)
    return trained, scored


PAPER_FAMILIES = COMPOSITES["all"].families


def budget_chains(members: int, budget: int) -> list[int]:
    """How a composite shares one GPU budget: ``min(members, budget)`` chains of sub-pipelines that run one after
    another, the budget split between the chains (the first ones get the remainder). Sub-pipelines of different
    chains run at once, each with its chain's share as its parallelism, so the pods at once never exceed the budget."""
    chains = max(1, min(members, budget))
    return [budget // chains + (1 if index < budget % chains else 0) for index in range(chains)]


def build_composite(name: str, cluster: ClusterSettings | None = None, tracking_uri: str = "", data_root: str | None = None):
    """One pipeline that runs several benchmarks (``alignclip.config.COMPOSITES``: ``all``, ``backbones``) with their
    defaults, as sub-pipelines (one per family and dataset), within one GPU budget (``cluster.max_parallelism``,
    ``budget_chains``); ``data_root``: one prefix, each dataset under it. Its parameter turns tracking on for all."""
    cluster = cluster or ClusterSettings()
    members = composite_members(name, data_root)
    shares = budget_chains(len(members), cluster.max_parallelism)
    subs = []
    for index, (family, dataset, values) in enumerate(members):
        chain = index % len(shares)
        label = f"{family}-{dataset}".replace("_", "-")
        sub = build_pipeline(family, replace(cluster, max_parallelism=shares[chain]), values, name=f"alignclip-{label}")
        subs.append((chain, label, sub, pipeline_arguments(family, values)))

    def composite_pipeline(mlflow_tracking_uri: str = tracking_uri):
        last = {}
        for chain, label, sub, arguments in subs:
            # every argument explicit (kfp's ignore_upstream_failure needs them), the data prefix compiled in
            task = sub(**{**arguments, "mlflow_tracking_uri": mlflow_tracking_uri}).set_display_name(label)
            if chain in last:  # after the previous one of its chain, whether that succeeded or not
                task.after(last[chain]).ignore_upstream_failure()
            last[chain] = task

    composite_pipeline.__doc__ = f"AlignCLIP {name}: {COMPOSITES[name].description}."
    description = COMPOSITES[name].description
    return dsl.pipeline(name=f"alignclip-{name.replace('_', '-')}", description=description[:1].upper() + description[1:])(composite_pipeline)


def build_all(cluster: ClusterSettings | None = None, tracking_uri: str = "", data_root: str | None = None):
    """Every benchmark of the paper, as sub-pipelines."""
    return build_composite("all", cluster, tracking_uri, data_root)
