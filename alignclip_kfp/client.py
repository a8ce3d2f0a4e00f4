"""The KFP client: compile a family's pipeline, submit it to a cluster (and follow the run), run it in kfp's local
runner, or print what a run would do (dry run). `alignclip pipeline compile|submit|run` parses its options and
calls these. kfp (the optional extra ``alignclip[kfp]``) is imported only inside the functions that use it, so the
settings checks and the dry run work without it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from alignclip.config import COMPOSITES, ConfigError, cell_dir, check_family
from alignclip.log import get_logger
from alignclip_kfp.arguments import pipeline_arguments, resolve_pipeline

log = get_logger(__name__)
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def _pipelines():
    try:
        from alignclip_kfp.pipelines import alignclip_pipeline
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "kfp":
            raise ConfigError("the pipeline commands need kfp: pip install 'alignclip[kfp]'") from None
        raise
    return alignclip_pipeline


def cluster_settings(gpu_type=None, gpus=None, node_selector=None, tolerations=None, retries=None, cpu=None,
                     memory=None, image=None, max_parallelism=None):
    """ClusterSettings from command-line values, each checked (a bad one is one error line, before compiling)."""
    module = _pipelines()
    settings = module.ClusterSettings()
    settings.image = image or os.environ.get("ALIGNCLIP_IMAGE") or module.PLACEHOLDER_IMAGE
    if gpu_type:
        settings.gpu_type = gpu_type
    if gpus is not None:
        if gpus < 0:
            raise ConfigError(f"--gpus {gpus}: expected 0 or more accelerators per task")
        settings.gpus = gpus
        if gpus == 0:
            # No accelerator: the default GPU node selector and toleration would keep the tasks Pending on a cluster
            # without GPU nodes. Explicit --node-selector/--toleration still apply (below).
            settings.node_selector, settings.tolerations = {}, []
    if node_selector:
        pairs = {}
        for item in node_selector:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--node-selector {item!r}: expected LABEL=VALUE")
            pairs[key] = value
        settings.node_selector = pairs
    if tolerations:
        parsed = []
        for item in tolerations:  # key[=value][:Effect]
            spec, _, effect = item.partition(":")
            key, _, value = spec.partition("=")
            effect = effect or "NoSchedule"
            if not key or effect not in EFFECTS:
                raise ConfigError(f"--toleration {item!r}: expected KEY[=VALUE][:EFFECT] with EFFECT one of {', '.join(EFFECTS)}")
            parsed.append({"key": key, "operator": "Equal" if value else "Exists", **({"value": value} if value else {}), "effect": effect})
        settings.tolerations = parsed
    for flag, value, attribute in (("--cpu", cpu, "cpu"), ("--memory", memory, "memory")):
        if value is not None:
            if not QUANTITY.match(str(value)):
                raise ConfigError(f"{flag} {value!r}: expected a Kubernetes quantity such as 8, 500m, 32G or 64Gi")
            setattr(settings, attribute, str(value))
    if retries is not None:
        if retries < 0:
            raise ConfigError(f"--retries {retries}: expected 0 or more")
        settings.retries = retries
    if max_parallelism is not None:
        if max_parallelism < 1:
            raise ConfigError(f"--max-parallelism {max_parallelism}: expected at least 1 grid cell at a time")
        settings.max_parallelism = max_parallelism
    return settings


def is_placeholder_image(cluster) -> bool:
    return cluster.image == _pipelines().PLACEHOLDER_IMAGE


def _build(family: str, cluster, values: dict):
    module = _pipelines()
    if family in COMPOSITES:
        return module.build_composite(family, cluster, values.get("mlflow_tracking_uri", ""), values.get("data_root"))
    return module.build_pipeline(family, cluster, values)


def compile_pipeline(family: str, output: str | Path, cluster=None, values: dict | None = None) -> Path:
    """The family's YAML package; its parameter defaults are ``values`` (resolved settings)."""
    from kfp import compiler

    values = values if values is not None else resolve_pipeline(family)
    compiler.Compiler().compile(_build(family, cluster, values), str(output))
    return Path(output)


def check_kfp_host(host: str, timeout: float = 5.0) -> str:
    """The host's URL once its API answers at all. kfp.Client gives a urllib3 traceback for a host it cannot reach,
    retries for half a minute, and waits without end on one that never answers; this probe fails in seconds, in
    one line. Any other HTTP answer (401 or 404, e.g. from a sign-in proxy kfp has a token for) is left to kfp."""
    import http.client
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    url = host.rstrip("/") if host.startswith("http") else f"https://{host}"  # as kfp.Client reads a host
    hint = ("check the address and that the KFP API is up and reachable from here, e.g. "
            "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`, then --host http://localhost:8080")
    try:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ValueError(url)
        with urllib.request.urlopen(f"{url}/apis/v2beta1/healthz", timeout=timeout):
            return url
    except urllib.error.HTTPError as err:
        if err.code < 500:
            return url
        # 502/503 from a port-forward or proxy: the API behind it is down (kfp would retry, then fail the same way)
        raise ConfigError(f"--host {host}: the KFP API at {url} answered HTTP {err.code} {err.reason}; {hint}") from None
    except (ValueError, http.client.InvalidURL):  # e.g. a port that is not a number
        raise ConfigError(f"--host {host}: not a URL; expected the KFP API endpoint, e.g. http://localhost:8080") from None
    except (OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        if isinstance(reason, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        raise ConfigError(f"--host {host}: the KFP API at {url} is not reachable ({reason}); {hint}") from None


def submit(family: str, host: str, experiment: str | None, run_name: str | None, values: dict, cluster=None,
           wait: bool = False, echo=print, poll_s: float = 15.0) -> int:
    """Create a run on a KFP cluster with every parameter explicit (what `--dry-run` prints); print its URL and its
    MLflow views' URLs; with ``wait``, follow it to its end (``follow_run``). Returns the exit code."""
    import kfp

    url = check_kfp_host(host)
    client = kfp.Client(host=host)
    arguments = pipeline_arguments(family, values)
    default_experiment = values.get("mlflow_experiment") or (
        COMPOSITES[family].experiment if family in COMPOSITES else check_family(family).experiment)
    result = client.create_run_from_pipeline_func(
        _build(family, cluster, values), arguments=arguments, experiment_name=experiment or default_experiment, run_name=run_name
    )
    echo(f"{url}/#/runs/details/{result.run_id}")
    for line in mlflow_view_lines(family, values, result.run_id):
        echo(line)
    return follow_run(client, result.run_id, echo, poll_s) if wait else 0


def mlflow_view_lines(family: str, values: dict, kfp_run_id: str) -> list[str]:
    """The comparison view of each pipeline of a KFP run (its start_run task stores it under the KFP run's id). The
    experiment's id is looked up when the server answers from here; else the line says which experiment it is."""
    uri = values.get("mlflow_tracking_uri") or ""
    if not uri:
        return []
    from alignclip import tracking
    from alignclip.tracking import runs

    members = ([(name, member) for name, _, member in _composite(family, values)] if family in COMPOSITES
               else [(family, values)])
    lines, ids = [], {}
    reachable = tracking._answers(uri)
    for name, member in members:
        key = "cells-" + runs.kfp_view_key(kfp_run_id, member["data_dataset"], member["data_protocol"])
        experiment = member.get("mlflow_experiment") or check_family(name).experiment
        if reachable and experiment not in ids:
            try:
                ids[experiment] = tracking.use_experiment(experiment, uri=uri).experiment_id  # created now if new: same id later
            except Exception as err:  # noqa: BLE001 - a link is a convenience
                log.warning("could not look up MLflow experiment %r (%s)", experiment, str(err).splitlines()[0][:200])
                reachable = False
        label = f" {name}/{member['data_dataset']}" if family in COMPOSITES else ""
        if experiment in ids:
            lines.append(f"MLflow{label}: {runs.view_url(uri, ids[experiment], key)}")
        else:
            lines.append(f"MLflow{label}: {runs.ui_base(uri)}/#/experiments/<id of experiment {experiment!r}>/runs?"
                         f"viewStateShareKey={key}&workflowType=machine_learning")
    return lines


def _composite(family: str, values: dict):
    from alignclip.config import composite_members

    return [(name, dataset, {**member, "mlflow_tracking_uri": values.get("mlflow_tracking_uri", "")})
            for name, dataset, member in composite_members(family, values.get("data_root"))]


FINAL_STATES = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED")


def follow_run(client, run_id: str, echo=print, poll_s: float = 15.0, sleep=None, attempts: int = 5) -> int:
    """Poll a KFP run until it ends, printing each task's state when it changes (``<task>: <STATE>``) and the run's
    own; 0 when it SUCCEEDED, 1 when it ended otherwise, 2 when the API stopped answering (``attempts`` polls)."""
    import time

    sleep = sleep or time.sleep
    seen: dict[str, str] = {}
    failures = 0
    while True:
        try:
            run = client.get_run(run_id)
            failures = 0
        except Exception as err:  # noqa: BLE001 - a dropped port-forward: try again, then say so
            failures += 1
            if failures >= attempts:
                echo(f"run {run_id}: the KFP API stopped answering ({str(err).splitlines()[0][:200]}); the run goes on")
                return 2
            sleep(poll_s)
            continue
        details = getattr(run, "run_details", None)
        for task in sorted(getattr(details, "task_details", None) or [], key=lambda t: str(t.create_time or "")):
            state = str(task.state or "PENDING")
            if seen.get(task.task_id) != state:
                seen[task.task_id] = state
                echo(f"  {task.display_name or task.task_id}: {state}")
        state = str(run.state or "PENDING")
        if state in FINAL_STATES:
            echo(f"run {run_id}: {state}")
            return 0 if state == "SUCCEEDED" else 1
        sleep(poll_s)


def run_local(family: str, pipeline_root: str | Path, values: dict):
    from kfp import local

    module = _pipelines()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    # Locally a failure is a bug to see at once: no retries with minute-long back-offs.
    func = module.build_pipeline(family, module.ClusterSettings(retries=0), values)
    return func(**pipeline_arguments(family, values))


def dry_run(family: str, values: dict) -> str:
    """The effective parameters of every task of the run, one line each: the pipeline's arguments and the exact
    `alignclip` command each task runs (artifact paths shown as <placeholders>), built from the arguments the run
    gets (``pipeline_arguments``) by the same functions the components call."""
    from alignclip.artifacts import MODEL, SIMILARITY_MATRIX
    from alignclip.commands import evaluate_args, prepare_args, report_args, similarity_args, train_args

    if family in COMPOSITES:
        return f"{family}: " + json.dumps(values) + "\n" + "\n".join(dry_run(name, member) for name, _, member in _composite(family, values))
    p = pipeline_arguments(family, values)
    lines = [f"{family}: {json.dumps({k: v for k, v in values.items()}, ensure_ascii=False)}"]
    # the first task and the last, as components/stages.py runs them (start_run opens the parent, report ends it)
    uri = p["mlflow_tracking_uri"] or ""
    lines.append(f"mlflow parent: open run 'kfp {family}: {p['data_dataset']} ({p['data_protocol']})' in "
                 f"experiment {p['mlflow_experiment']!r} at {uri} (the cells' parent; the report ends it)"
                 if uri else "mlflow parent: none (mlflow_tracking_uri is empty: no tracking)")
    root = p["data_root"]
    if root == "embedded":  # the prepare task builds RotatedDigits into its own artifact first (components/stages.py)
        root = "<prepared>/images"
        lines.append(f"prepare: alignclip data digits {root}")
    lines.append("prepare: alignclip " + " ".join(prepare_args(
        p["data_dataset"], root, "<prepared>", p["data_protocol"], p["data_holdout_fraction"], p["data_trial_seed"],
        p["data_shots"], p["train_seeds"], p["data_templates"], p["data_class_names"], p["data_listing"])))
    lines.append("similarity: alignclip " + " ".join(similarity_args("<prepared>", "<matrix>", p["model_name"], p["model_pretrained"])))
    for cell in p["train_grid"]:
        label = cell_dir(cell)  # the cell's folder name: its varied settings, held-out domain and seed (none: zero-shot)
        lines.append(f"train {label}: alignclip " + " ".join(_quote(x) for x in train_args(
            "<prepared>", "<model>", cell, p["train_formulation"], p["train_recipe"], p["train_steps"], p["train_epochs"],
            p["train_batch_size"], p["train_lr"], p["train_hflip"], p["model_name"], p["model_pretrained"],
            f"<matrix>/{SIMILARITY_MATRIX}")))
        lines.append(f"evaluate {label}: alignclip " + " ".join(_quote(x) for x in evaluate_args(
            "<prepared>", f"<model>/{MODEL}", "<results>", p["data_test_split"])))
    lines.append("report: alignclip " + " ".join(report_args("<collected results>", "<report>", "<prepared>", "<matrix>")))
    return "\n".join(lines)


def local_data_root(values: dict) -> str | None:
    """The data root when a cluster's pods cannot have it: a local path (the demo's `data/rotated_digits`) rather
    than `s3://...` or `embedded`; an absolute path may be a mounted volume, so only a relative one is named."""
    root = str(values.get("data_root") or "")
    if root == "embedded" or "://" in root or root.startswith("/"):
        return None
    return root


def _quote(arg: str) -> str:
    import shlex

    return arg if arg.startswith("<") else shlex.quote(arg)
