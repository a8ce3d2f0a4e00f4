"""The MLflow model of a pipeline run: what is logged where, under which names and tags.

* One **parent run** per pipeline (a KFP run, or a ``dvc repro``) spans it: opened before the first tracked stage,
  closed by the report stage with the pipeline's status and the summary metrics (mean and std over seeds per
  method and held-out domain). Pipeline-level outputs (similarity matrix, results page) are its artifacts.
* One **cell run** per grid cell (method, held-out domain, seed), a child of the parent: ``train`` opens it
  (params, training curves, checkpoint model) and ``evaluate`` resumes it (accuracies, predictions), so a cell's
  params, metrics and artifacts sit together in one row of the UI.
* Every accuracy is a percentage (0-100); metric names say so with ``_pct``.

Under KFP the parent's id travels as an artifact (``ALIGNCLIP_PARENT_RUN_ID`` in each task). Under DVC there is
no orchestrator: each tracked stage looks up the open parent of *this* pipeline configuration (tag
``alignclip.pipeline_key`` = hash of the repository path and params.yaml), creates it if there is none, and the report
stage closes it. No stage depends on the parent (no file, no param), so DVC's caching is untouched: a stage that
DVC skips logs nothing, and a re-run after a failure resumes the same parent.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from alignclip.log import get_logger
from alignclip.tracking.client import _client
from alignclip.tracking.provenance import provenance_tags
from alignclip.tracking.registry import set_best_aliases
from alignclip.tracking.transport import experiment_id_of

log = get_logger(__name__)

KEY_TAG = "alignclip.pipeline_key"
VIEW_KEY_TAG = "alignclip.view_key"  # on a pipeline run: the key of its comparison view (below)
# MLflow 3.17's UI: the Share button stores the runs page's state as this experiment tag (+ a key), and
# `?viewStateShareKey=<key>` in the experiment page's URL opens it (mlflow/server/js: useSharedExperimentViewState)
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
LOCAL_UI = "http://127.0.0.1:5000"  # `mlflow ui`'s default address, for a store that is a file
PERCENT_NOTE = "Accuracies (metrics ending in `_pct`) are top-1 percentages, 0-100."


# ------------------------------------------------------------------------------------------------ names and tags


def metric_key(*parts: str) -> str:
    """An MLflow metric key from free text (MLflow allows letters, digits, ``_ - . / :`` and space)."""
    return "/".join(re.sub(r"[^\w\-. :]", "-", str(p)) for p in parts)


def cell_run_name(variant: str, test_domain: str | None, seed) -> str:
    return f"{variant} | {test_domain or 'all'} | seed {seed}"


def cell_tags(dataset: str, protocol: str, method: str, variant: str, formulation: str, test_domain, seed,
              hparams: dict | None = None) -> dict:
    """A grid cell's tags; ``setting`` names the selection grid's values of the cell (``lr=0.001``, ``-``), so the
    cells of one method that differ only there are told apart in the runs table."""
    from alignclip.selection import describe, hparams_key  # here: selection loads pandas, tracking nothing heavy

    return {
        "run_type": "cell",
        "dataset": dataset,
        "protocol": protocol,
        "method": method,
        "variant": variant,
        "formulation": formulation,
        "held_out_domain": test_domain or "-",
        "seed": str(seed),
        "setting": describe(hparams_key(hparams)),
    }


# ------------------------------------------------------------------------------------------------ the view


def display_metrics(metrics: dict) -> dict[str, float]:
    """Accuracies rounded to one decimal for the runs table (``<name>_1dp``); the full-precision ones stay."""
    return {f"{name}_1dp": round(float(value), 1) for name, value in metrics.items() if name.endswith("_pct")}


def headline_columns(protocol: str | None) -> list[str]:
    """The display metrics a protocol's cells are compared by, headline first (known before any evaluation)."""
    from alignclip import protocols

    try:
        spec = protocols.get_protocol(protocol or "domainbed")
    except (KeyError, ValueError):
        return []
    name = spec.headline_metric
    return [f"{name}_pct_1dp"] + (["base_acc_pct_1dp", "new_acc_pct_1dp"] if name == "H" else [])


def comparison_view(parent_run_id: str, metrics: list[str]) -> dict:
    """The runs page as the UI's Share button stores it: the pipeline's cells only (its children), one flat row each
    (the UI nests children under their parent only when runs are sorted by start time, so they are sorted by name),
    with the display accuracies, method, formulation, held-out domain and seed as columns, then the variant (an
    ablation's switches) and the grid setting, which tell apart the cells of one method."""
    columns = [f"metrics.`{name}`" for name in metrics] + [
        f"tags.`{tag}`" for tag in ("method", "formulation", "held_out_domain", "seed", "variant", "setting")]
    return {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "orderByKey": "tags.`mlflow.runName`",
        "orderByAsc": True,
        "selectedColumns": columns,
        "columnOrder": [],
        "columnWidths": {},  # the UI applies widths only with a column order of its own grid ids
        "runListHidden": False,
        "viewMaximized": False,
    }


def save_comparison_view(experiment_id: str, parent_run_id: str, key: str, metrics: list[str], uri: str | None = None) -> None:
    """Store the comparison view of a pipeline run (when it opens: the columns are its protocol's headline)."""
    import json

    _client(uri).set_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + key, json.dumps(comparison_view(parent_run_id, metrics)))


def ui_base(uri: str | None) -> str:
    """Where the UI of a tracking store is: the server itself, or `mlflow ui`'s default address for a file store."""
    uri = uri or ""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def view_url(uri: str | None, experiment_id: str, key: str | None = None, run_id: str | None = None) -> str:
    """The model-training runs page of the experiment opened on a stored view, or one run's page."""
    base = f"{ui_base(uri)}/#/experiments/{experiment_id}"
    if run_id:
        return f"{base}/runs/{run_id}"
    return f"{base}/runs?viewStateShareKey={key}&workflowType=machine_learning"


def view_hint(uri: str | None, experiment_id: str, key: str | None = None, run_id: str | None = None) -> str:
    """The line a stage prints: the URL, and for a file store the command that serves the UI there."""
    line = f"MLflow: {view_url(uri, experiment_id, key, run_id)}"
    if uri and not uri.startswith(("http://", "https://")):
        line += f"  (serve it: mlflow ui --backend-store-uri {uri})"
    return line


def pipeline_view(parent_run_id: str, uri: str | None = None) -> tuple[str, str] | None:
    """(experiment id, view key) of a pipeline run; None when the run has no view (a run of an older version)."""
    run = _client(uri).get_run(parent_run_id)
    key = run.data.tags.get(VIEW_KEY_TAG)
    return (run.info.experiment_id, key) if key else None


# ------------------------------------------------------------------------------------------------ the parent run


def use_experiment(name: str, uri: str | None = None):
    """The experiment called ``name`` (created if new), tagged as model training (``mlflow.experimentKind``), for
    the MLflow UIs that choose the experiment's view by that tag; a user's choice stays. MLflow 3.17's UI follows
    its "Model training" toggle (or ``?workflowType=machine_learning`` in the URL) instead: see the README."""
    client = _client(uri)
    experiment = client.get_experiment(experiment_id_of(client, name))
    if experiment.lifecycle_stage == "deleted":  # as mlflow.set_experiment: its runs could not be created
        raise RuntimeError(f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore) or "
                           "name another")
    if "mlflow.experimentKind" not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, "mlflow.experimentKind", "custom_model_development")
    return experiment


def kfp_view_key(kfp_run_id: str, dataset: str, protocol: str) -> str:
    """The view key of a KFP run's pipeline (one per sub-pipeline of a composite), known to `submit` beforehand."""
    return re.sub(r"[^\w\-.]", "-", f"{kfp_run_id}-{dataset}-{protocol}")


def dvc_pipeline_view(experiment: str, dvc_root: str, uri: str | None = None) -> tuple[str, str] | None:
    """(experiment id, view key) of the latest pipeline run of this DVC configuration, or None."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{dvc_pipeline_key(dvc_root)}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return pipeline_view(found[0].info.run_id, uri) if found else None


def open_pipeline_run(experiment: str, run_name: str, params: dict, tags: dict | None = None, view_key: str = "",
                      uri: str | None = None) -> str:
    """Create the parent run and leave it RUNNING: the report stage ends it (``finish_pipeline_run``). Its cells'
    comparison view is stored with it, under ``view_key`` (KFP: the KFP run's id, which `submit` knows) or the
    parent's own id."""
    from mlflow.entities import Param

    exp = use_experiment(experiment, uri)
    all_tags = {
        **provenance_tags(),
        "run_type": "pipeline",
        "mlflow.note.content": f"One pipeline run; its children are the grid cells. {PERCENT_NOTE}",
        **(tags or {}),
    }
    client = _client(uri)
    run = client.create_run(exp.experiment_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    key = f"cells-{view_key or run.info.run_id}"
    try:
        save_comparison_view(exp.experiment_id, run.info.run_id, key,
                             headline_columns(params.get("protocol") or params.get("data.protocol")), uri)
        client.set_tag(run.info.run_id, VIEW_KEY_TAG, key)
    except Exception as err:  # noqa: BLE001 - a view is a convenience; the pipeline runs without it
        log.warning("could not store the MLflow comparison view (%s)", str(err).splitlines()[0][:200])
    log.info("pipeline run %s (%s) opened", run.info.run_id, run_name)
    return run.info.run_id


def dvc_pipeline_key(dvc_root: str) -> str:
    """Stable for one DVC pipeline configuration: the repository's path and its params.yaml."""
    root = Path(dvc_root).resolve()
    params = root / "params.yaml"
    content = params.read_bytes() if params.is_file() else b""
    return hashlib.sha256(str(root).encode() + b"\0" + content).hexdigest()[:16]


def dvc_parent_run(experiment: str, uri: str | None = None) -> str | None:
    """Inside a ``dvc repro`` stage: the open (or failed, being resumed) parent run of this configuration, created
    on first use. None outside DVC."""
    if not os.environ.get("DVC_ROOT") or not os.environ.get("DVC_STAGE"):
        return None
    # The stage's working directory, not DVC_ROOT: a queued `dvc exp run` runs in its own copy of the repository
    # (with its own params.yaml) while DVC_ROOT names the original one.
    dvc_root = os.getcwd()
    key = dvc_pipeline_key(dvc_root)
    exp = use_experiment(experiment, uri)
    client = _client(uri)
    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{KEY_TAG}` = '{key}' and attributes.status != 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        run = found[0]
        if run.info.status != "RUNNING":  # a re-run after a failure continues the same pipeline run
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    import yaml

    # the settings as params.yaml writes them (the stages that read them have checked them)
    params_file = Path(dvc_root) / "params.yaml"
    sections = (yaml.safe_load(params_file.read_text()) or {}) if params_file.is_file() else {}
    params = {f"{s}.{k}": v for s, keys in sections.items() if isinstance(keys, dict) for k, v in keys.items()}
    dataset = params.get("data.dataset", "")
    protocol = params.get("data.protocol", "")
    name = f"dvc repro: {dataset} ({protocol})" if dataset else "dvc repro"
    return open_pipeline_run(experiment, name, params, tags={KEY_TAG: key, "orchestrator": "dvc", "dvc_root": str(Path(dvc_root).resolve())},
                             uri=uri)


def mark_failed(parent_run_id: str, stage: str, uri: str | None = None) -> None:
    """A stage failed: the pipeline run says so (a DVC re-run reopens it; a KFP report that still runs ends it)."""
    try:
        client = _client(uri)
        client.set_tag(parent_run_id, "failed_stage", stage)
        client.set_terminated(parent_run_id, status="FAILED")
    except Exception as err:  # noqa: BLE001 - reporting a failure must not hide the failure itself
        log.warning("could not mark pipeline run %s failed: %s", parent_run_id, err)


def log_pipeline_artifact(parent_run_id: str, path: Path, artifact_path: str, uri: str | None = None) -> None:
    """A pipeline-level output (the similarity matrix, its heatmap) as an artifact of the pipeline run."""
    _client(uri).log_artifact(parent_run_id, str(path), artifact_path)


def summary_metrics(results) -> dict[str, float]:
    """Mean and std (over seeds) of the held-out accuracy per method variant and held-out domain, and per variant
    over domains, from the report's long results table (``alignclip.report.collect``)."""
    metrics: dict[str, float] = {}
    if results.empty:
        return metrics
    frame = results.copy()
    frame["test_domain"] = frame["test_domain"].replace("", "all")
    for (variant, domain, view), part in frame.groupby(["variant", "test_domain", "view"]):
        values = part["accuracy"].astype(float)
        metrics[metric_key(f"{view}_acc_pct", variant, domain, "mean")] = float(values.mean())
        metrics[metric_key(f"{view}_acc_pct", variant, domain, "std")] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        metrics[metric_key(f"{view}_acc_pct", variant, domain, "seeds")] = float(len(values))
    for (variant, view), part in frame.groupby(["variant", "view"]):
        # the average over held-out domains of the per-domain means (tables 1 and 6), then its spread over seeds
        per_seed = part.groupby("seed", dropna=False)["accuracy"].mean()
        metrics[metric_key(f"{view}_acc_pct", variant, "avg", "mean")] = float(part.groupby("test_domain")["accuracy"].mean().mean())
        metrics[metric_key(f"{view}_acc_pct", variant, "avg", "std")] = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0
    return metrics


def report_metrics(report_dir: Path) -> dict[str, float]:
    """The report's scores.json as metrics: ``report/<table>/<method>/<column>/<name>`` with name acc_mean, acc_std,
    seeds, paper, vs_erm, vs_erm_low, vs_erm_high, vs_zeroshot... (the paired bootstrap intervals, in points)."""
    import json

    path = Path(report_dir) / "scores.json"
    if not path.is_file():
        return {}
    metrics = {}
    for table, methods in json.loads(path.read_text()).items():
        for method, columns in methods.items():
            for column, values in columns.items():
                metrics.update({metric_key("report", table, method, column, name): float(v) for name, v in values.items()})
    return metrics


def selection_tags(report_dir: Path) -> dict[str, str]:
    """``selected/<method>/<held-out domain>``: the hyper-parameters model selection chose (report.json), where a
    grid varied them."""
    import json

    path = Path(report_dir) / "report.json"
    chosen = json.loads(path.read_text()).get("selection", []) if path.is_file() else []
    return {metric_key("selected", c["variant"], c["test_domain"] or "all"): json.dumps(c["hparams"], sort_keys=True)
            for c in chosen if c.get("hparams")}


def finish_pipeline_run(parent_run_id: str, results, report_dir: Path, status: str = "FINISHED",
                        uri: str | None = None) -> dict[str, float]:
    """Log the summary metrics and the results page into the parent run, set the best-version aliases, end it."""
    import time

    from mlflow.entities import Metric

    client = _client(uri)
    metrics = {**summary_metrics(results), **report_metrics(report_dir)}
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, 0) for k, v in sorted(metrics.items())]
    for start in range(0, len(items), 1000):
        client.log_batch(parent_run_id, metrics=items[start : start + 1000])
    if report_dir.is_dir():
        client.log_artifacts(parent_run_id, str(report_dir), "report")
    client.set_tag(parent_run_id, "cells", str(results["source"].nunique()) if not results.empty else "0")
    for key, value in selection_tags(report_dir).items():
        client.set_tag(parent_run_id, key, value)
    if not results.empty:
        for dataset in sorted(results["dataset"].unique()):
            set_best_aliases(dataset, uri)
    client.set_terminated(parent_run_id, status=status)
    log.info("pipeline run %s ended (%s) with %d summary metrics", parent_run_id, status, len(metrics))
    return metrics


