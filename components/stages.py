"""KFP v2 components, one per pipeline stage. Each is a thin shell around the `alignclip` CLI.

They are lightweight components on the project's image with ``install_kfp_package=False``: the same definition
runs in kfp's local SubprocessRunner (tests, `alignclip pipeline run --local`) and on a cluster, where the image
(built from the Dockerfile) already holds alignclip and kfp. The image is a compile-time choice:
``build_components(image)`` makes the set for one image. Each task's command line comes from alignclip.commands,
which `alignclip pipeline ... --dry-run` prints too; how the task runs it, from ``runtime`` beside this module. Artifacts are typed (Dataset, Model, Metrics,
HTML, Markdown); nothing passes paths in strings. (No `from __future__ import annotations`: kfp reads the
annotations as types.)
"""



from types import SimpleNamespace
from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def start_run(experiment: str, tracking_uri: str, run_name: str, params_json: str, run: Output[Artifact], kfp_run_id: str = ""):
    """Open the pipeline's parent MLflow run, left RUNNING: cells log nested runs under it, the report ends it.

    The run id travels as a small artifact (a text file): kfp 2.17's local runner resolves *parameter*
    outputs of upstream tasks inside a ParallelFor to the loop item, while artifacts resolve correctly.
    """
    import json
    import os

    run_id = ""
    if tracking_uri:
        from alignclip.tracking import open_pipeline_run

        # the library's tracking layer reads the URI from the environment, as in every other stage (no mlflow here)
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        from alignclip.tracking import kfp_view_key

        params = json.loads(params_json)
        # the comparison view's key is the KFP run's id (with the dataset): `pipeline submit` prints its URL
        key = kfp_view_key(kfp_run_id, params["dataset"], params["protocol"]) if kfp_run_id else ""
        run_id = open_pipeline_run(experiment, run_name, params, tags={"orchestrator": "kfp", "kfp_run_id": kfp_run_id}, view_key=key)
    with open(run.path, "w") as handle:
        handle.write(run_id)
    run.metadata["run_id"] = run_id


def prepare(
    dataset: str,
    root: str,
    protocol: str,
    holdout_fraction: float,
    trial_seed: int,
    shots: int,
    seeds: List[int],
    templates: str,
    class_names: str,
    listing: str,
    prepared: Output[Dataset],
):
    """List and split the dataset; `root: embedded` builds RotatedDigits into the artifact itself."""
    from alignclip.commands import prepare_args
    from alignclip_kfp.components.runtime import run_cli

    if root == "embedded":
        root = prepared.path + "/images"
        run_cli("data", "digits", root)
    run_cli(*prepare_args(dataset, root, prepared.path, protocol, holdout_fraction, trial_seed, shots, seeds, templates,
                          class_names, listing))
    prepared.metadata["dataset"] = dataset


def similarity(
    prepared: Input[Dataset],
    model_name: str,
    pretrained: str,
    experiment: str,
    tracking_uri: str,
    parent_run: Input[Artifact],
    matrix: Output[Artifact],
    heatmap: Output[Markdown],
):
    """Class similarity matrix of the class prompts and its heatmap."""
    from alignclip import artifacts
    from alignclip.commands import similarity_args
    from alignclip_kfp.components.runtime import run_cli, task_env
    import base64
    import os

    env = task_env(parent_run.path, experiment, tracking_uri)
    run_cli(*similarity_args(prepared.path, matrix.path, model_name, pretrained), env=env)
    image = base64.b64encode(open(os.path.join(matrix.path, artifacts.SIMILARITY_HEATMAP), "rb").read()).decode()
    with open(heatmap.path, "w") as handle:
        handle.write(f"# Class similarity\n\n![similarity](data:image/png;base64,{image})\n")


def train(
    prepared: Input[Dataset],
    matrix: Input[Artifact],
    cell: dict,
    formulation: str,
    recipe: str,
    steps: int,
    epochs: int,
    batch_size: int,
    lr: float,
    hflip: bool,
    model_name: str,
    pretrained: str,
    experiment: str,
    tracking_uri: str,
    parent_run: Input[Artifact],
    model: Output[Model],
):
    """Fine-tune one (method, held-out domain, seed); a nested MLflow run under the pipeline's run."""
    from alignclip import artifacts
    from alignclip.commands import train_args
    from alignclip_kfp.components.runtime import run_cli, task_env
    import os

    env = task_env(parent_run.path, experiment, tracking_uri)
    cmd = train_args(prepared.path, model.path, cell, formulation, recipe, steps, epochs, batch_size, lr, hflip,
                     model_name, pretrained, os.path.join(matrix.path, artifacts.SIMILARITY_MATRIX))
    run_cli(*cmd, env=env)
    model.metadata.update({k: str(v) for k, v in cell.items()})


def evaluate(
    prepared: Input[Dataset],
    model: Input[Model],
    test_split: str,
    experiment: str,
    tracking_uri: str,
    parent_run: Input[Artifact],
    metrics: Output[Metrics],
    results: Output[Artifact],
) -> float:
    """Top-1 accuracy on each view; returns the protocol's headline metric (held-out domain, H, ImageNet...)."""
    from alignclip import artifacts
    from alignclip.commands import evaluate_args
    from alignclip_kfp.components.runtime import run_cli, task_env
    import json
    import os
    import shutil

    env = task_env(parent_run.path, experiment, tracking_uri)
    # the held-out domain is the checkpoint's own: evaluate reads it from there
    run_cli(*evaluate_args(prepared.path, os.path.join(model.path, artifacts.MODEL), results.path, test_split), env=env)
    for name in (artifacts.TRAIN_SUMMARY, artifacts.TRAIN_LOG):  # small files the report reads beside the metrics
        shutil.copy(os.path.join(model.path, name), os.path.join(results.path, name))
    from alignclip.evaluate import flat_metrics

    summary = json.load(open(os.path.join(results.path, artifacts.METRICS)))
    for name, value in flat_metrics(summary).items():  # percentages, named so: test_acc_pct, H_pct, ...
        metrics.log_metric(name, value)
    headline = summary["headline"]  # the protocol's own headline metric; null when its view had no images
    if headline is None:
        return float("nan")
    return float(headline["value"])


def report(
    results: Input[List[Artifact]],
    models: Input[List[Model]],
    accuracies: List[float],
    prepared: Input[Dataset],
    matrix: Input[Artifact],
    experiment: str,
    tracking_uri: str,
    parent_run: Input[Artifact],
    page: Output[HTML],
    tables: Output[Markdown],
    bundle: Output[Artifact],
):
    """Fan-in: tables, figures and the results page over every evaluation."""
    from alignclip import artifacts
    from alignclip.commands import report_args
    from alignclip_kfp.components.runtime import run_cli, task_env
    import base64
    import os
    import re
    import shutil
    import tempfile

    # The report's input tree lives in scratch space, not in an output: checkpoints are linked, never copied,
    # so no artifact holds a second copy of a model. Removed afterwards (the local runner's tasks share /tmp).
    with tempfile.TemporaryDirectory(prefix="alignclip-report-") as collected:
        for index, item in enumerate(results):
            shutil.copytree(item.path, f"{collected}/results/{index:03d}")
        for index, item in enumerate(models):
            target = f"{collected}/models/{index:03d}"
            os.makedirs(target)
            os.symlink(os.path.join(item.path, artifacts.MODEL), os.path.join(target, artifacts.MODEL))
            shutil.copy(os.path.join(item.path, artifacts.TRAIN_SUMMARY), target)
        env = task_env(parent_run.path, experiment, tracking_uri)
        out = bundle.path + "/report"
        run_cli(*report_args(collected, out, prepared.path, matrix.path), env=env)
    text = open(os.path.join(out, artifacts.REPORT_PAGE)).read()
    # inline the figures so the KFP UI shows the page on its own
    for name in re.findall(r"src='([^']+\.png)'", text):
        data = base64.b64encode(open(os.path.join(out, name), "rb").read()).decode()
        text = text.replace(f"src='{name}'", f"src='data:image/png;base64,{data}'")
    open(page.path, "w").write(text)
    shutil.copy(os.path.join(out, artifacts.REPORT_MARKDOWN), tables.path)
    bundle.metadata["mean_accuracy"] = sum(float(a) for a in accuracies) / max(len(accuracies), 1)


FUNCTIONS = (start_run, prepare, similarity, train, evaluate, report)


def build_components(image: str) -> SimpleNamespace:
    """The stage components on one image, by function name (``components.train``...)."""
    return SimpleNamespace(**{f.__name__: dsl.component(base_image=image, install_kfp_package=False)(f) for f in FUNCTIONS})
