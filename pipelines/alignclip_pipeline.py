"""The AlignCLIP DAGs: prepare -> similarity -> ParallelFor(method x held-out domain x seed)[train -> evaluate]
-> dsl.Collected -> report, inside a parent MLflow run.

One factory builds every benchmark family; the families differ in their default parameters (dataset,
protocol, domains, recipe), which mirror params.yaml 1:1 (``section_key``). Kubernetes settings (GPU type,
node selector, tolerations, resources, secrets) are compile-time options of the factory: kfp applies them
on a cluster and ignores them in the local runner.
"""



from dataclasses import dataclass, field
from typing import List

from kfp import dsl, kubernetes

from components import stages

FAMILIES = {
    # family: (experiment, defaults overriding params.yaml)
    "demo": ("demo-domain-shift", {}),
    "domain_shift": ("domain-shift", {"data_dataset": "office_home", "data_root": "s3://alignclip-data/office_home",
                                      "data_protocol": "domainbed", "train_test_domains": ["Art", "Clipart", "Product", "Real World"],
                                      "train_recipe": "domain_shift/office_home", "model_name": "vit-b-16", "train_seeds": [0, 1, 2]}),
    "imagenet": ("imagenet-variants", {"data_dataset": "imagenet", "data_root": "s3://alignclip-data/imagenet",
                                       "data_protocol": "imagenet", "train_test_domains": [""], "train_recipe": "imagenet",
                                       "model_name": "vit-b-16", "train_seeds": [1, 2, 3]}),
    "base2new": ("base-to-new", {"data_dataset": "oxford_pets", "data_root": "s3://alignclip-data/oxford_pets",
                                 "data_protocol": "base2new", "train_test_domains": [""], "train_recipe": "base2new/oxford_pets",
                                 "model_name": "vit-b-16", "train_seeds": [0, 1, 2]}),
    "wild": ("in-the-wild", {"data_dataset": "office_home", "data_root": "s3://alignclip-data/office_home",
                             "data_protocol": "wild", "train_test_domains": ["Art", "Clipart", "Product", "Real World"],
                             "train_recipe": "wild/office_home", "model_name": "vit-b-16", "train_seeds": [0, 1, 2]}),
}


@dataclass
class ClusterSettings:
    """How train/evaluate tasks run on Kubernetes (ignored by the local runner)."""

    gpu_type: str = "nvidia.com/gpu"
    gpus: int = 1
    node_selector: dict = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list = field(default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    cpu: str = "8"
    memory: str = "32G"
    train_retries: int = 2
    s3_secret: str = "alignclip-s3"  # keys: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    mlflow_secret: str = "alignclip-mlflow"  # keys: MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD
    shm: str = "16Gi"


def _on_gpu(task, cluster: ClusterSettings, retries: int = 0):
    task.set_accelerator_type(cluster.gpu_type).set_accelerator_limit(cluster.gpus)
    task.set_cpu_request(cluster.cpu).set_memory_request(cluster.memory)
    for key, value in cluster.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in cluster.tolerations:
        kubernetes.add_toleration(task, **toleration)
    # DataLoader workers share tensors through /dev/shm; the container default (64 MiB) is too small.
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=cluster.shm)
    if retries:
        task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0)
    return task


def _secrets(task, cluster: ClusterSettings):
    task.set_env_variable("ALIGNCLIP_IMAGE", stages.IMAGE)  # the image tag, as a provenance tag of MLflow runs
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
    return task


def make_grid(methods, test_domains, seeds) -> list[dict]:
    """The (method, held-out domain, seed) cells the ParallelFor fans out over (``train_grid``).

    A pipeline parameter rather than a task output: kfp 2.17's local runner resolves parameter outputs of
    other tasks inside a loop over a task output to the loop item.
    """
    return [{"method": m, "test_domain": d, "seed": int(s)} for d in test_domains for m in methods for s in seeds]


def build_pipeline(family: str = "demo", cluster: ClusterSettings | None = None, defaults: dict | None = None):
    """The pipeline function of one benchmark family; parameter defaults come from params.yaml + the family."""
    from alignclip.config import pipeline_defaults

    if family not in FAMILIES:
        raise ValueError(f"unknown pipeline family {family!r}: expected one of {', '.join(FAMILIES)}")
    cluster = cluster or ClusterSettings()
    experiment, family_defaults = FAMILIES[family]
    p = {**pipeline_defaults(), **family_defaults, **(defaults or {})}

    @dsl.pipeline(name=f"alignclip-{family.replace('_', '-')}", description=f"AlignCLIP {family}: prepare, similarity, train x evaluate, report")
    def alignclip_pipeline(
        data_dataset: str = p["data_dataset"],
        data_root: str = p["data_root"],
        data_protocol: str = p["data_protocol"],
        data_holdout_fraction: float = p["data_holdout_fraction"],
        data_trial_seed: int = p["data_trial_seed"],
        data_shots: int = p["data_shots"],
        data_test_split: str = p["data_test_split"],
        model_name: str = p["model_name"],
        model_pretrained: str = p["model_pretrained"],
        train_recipe: str = p["train_recipe"],
        train_formulation: str = p["train_formulation"],
        train_grid: List[dict] = make_grid(p["train_methods"], p["train_test_domains"], p["train_seeds"]),
        train_seeds: List[int] = p["train_seeds"],
        train_steps: int = p["train_steps"],
        train_batch_size: int = p["train_batch_size"],
        train_lr: float = p["train_lr"],
        train_hflip: bool = p["train_hflip"],
        mlflow_tracking_uri: str = p.get("mlflow_tracking_uri", ""),
        mlflow_experiment: str = experiment,
    ):
        parent = stages.start_run(
            experiment=mlflow_experiment, tracking_uri=mlflow_tracking_uri, run_name=f"pipeline-{family}",
            params_json=f'{{"dataset": "{data_dataset}", "protocol": "{data_protocol}", "model": "{model_name}", "formulation": "{train_formulation}"}}',
        ).set_display_name("mlflow parent run")
        _secrets(parent, cluster)
        prepared = stages.prepare(
            dataset=data_dataset, root=data_root, protocol=data_protocol, holdout_fraction=data_holdout_fraction,
            trial_seed=data_trial_seed, shots=data_shots, seeds=train_seeds,
        ).set_display_name("prepare")
        _secrets(prepared, cluster)
        matrix = stages.similarity(
            prepared=prepared.outputs["prepared"], model_name=model_name, pretrained=model_pretrained,
            experiment=mlflow_experiment, tracking_uri=mlflow_tracking_uri, parent_run=parent.outputs["run"],
        )
        _secrets(matrix.set_display_name("similarity matrix"), cluster)
        with dsl.ParallelFor(items=train_grid, name="method-domain-seed") as cell:
            trained = stages.train(
                prepared=prepared.outputs["prepared"], matrix=matrix.outputs["matrix"], cell=cell,
                formulation=train_formulation, recipe=train_recipe, steps=train_steps, batch_size=train_batch_size,
                lr=train_lr, hflip=train_hflip, model_name=model_name, pretrained=model_pretrained,
                experiment=mlflow_experiment, tracking_uri=mlflow_tracking_uri, parent_run=parent.outputs["run"],
            ).set_display_name("train")
            _secrets(_on_gpu(trained, cluster, retries=cluster.train_retries), cluster)
            scored = stages.evaluate(
                prepared=prepared.outputs["prepared"], model=trained.outputs["model"], test_split=data_test_split,
                experiment=mlflow_experiment, tracking_uri=mlflow_tracking_uri, parent_run=parent.outputs["run"],
            ).set_display_name("evaluate")
            _secrets(_on_gpu(scored, cluster), cluster)
        final = stages.report(
            results=dsl.Collected(scored.outputs["results"]), models=dsl.Collected(trained.outputs["model"]),
            accuracies=dsl.Collected(scored.outputs["Output"]),
            prepared=prepared.outputs["prepared"], matrix=matrix.outputs["matrix"], experiment=mlflow_experiment,
            tracking_uri=mlflow_tracking_uri, parent_run=parent.outputs["run"],
        ).set_display_name("report")
        _secrets(final, cluster)

    return alignclip_pipeline


def build_all(cluster: ClusterSettings | None = None):
    """One pipeline that runs every benchmark family with its defaults, as sub-pipelines."""
    subs = {name: build_pipeline(name, cluster) for name in ("domain_shift", "imagenet", "base2new", "wild")}

    @dsl.pipeline(name="alignclip-all", description="Every benchmark family of the paper")
    def alignclip_all():
        for name, sub in subs.items():
            sub().set_display_name(name)

    return alignclip_all
