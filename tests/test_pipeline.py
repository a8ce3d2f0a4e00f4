"""The compiled KFP package, and the whole DAG run by kfp's local runner with the MLflow store checked after."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from alignclip.pipeline_cli import cluster_settings, compile_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    cluster = cluster_settings("nvidia.com/gpu", 1, ["cloud.google.com/gke-accelerator=nvidia-h100-80gb"], ["nvidia.com/gpu:NoSchedule"], 3)
    compile_pipeline("demo", path, cluster)
    spec, platform = list(yaml.safe_load_all(path.read_text()))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"], path.read_text()


def test_tasks_and_edges(compiled):
    spec, _, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    # the loop's task name is kfp's to choose: find it by what it is, the one task iterating over a parameter
    (loop_name,) = [name for name, task in tasks.items() if "parameterIterator" in task]
    assert set(tasks) == {"start-run", "prepare", "similarity", loop_name, "report"}
    assert "prepare" in tasks["similarity"]["dependentTasks"]
    loop = tasks[loop_name]
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("train_grid")
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"train", "evaluate"}
    train_inputs = inner["train"]["inputs"]["artifacts"]
    assert train_inputs["matrix"]["componentInputArtifact"].endswith("similarity-matrix")
    assert inner["evaluate"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "train"
    # fan-in: the report collects every evaluation of the loop
    report = tasks["report"]["inputs"]
    assert report["artifacts"]["results"]["taskOutputArtifact"]["producerTask"] == loop_name
    assert report["artifacts"]["models"]["taskOutputArtifact"]["producerTask"] == loop_name
    assert report["parameters"]["accuracies"]["taskOutputParameter"]["producerTask"] == loop_name


def test_parameters_mirror_params_yaml(compiled):
    from alignclip.config import load_params

    spec, _, _ = compiled
    names = set(spec["root"]["inputDefinitions"]["parameters"])
    params = load_params(os.path.join(ROOT, "params.yaml"))
    expected = {f"{s}_{k}" for s, keys in params.items() for k in keys} - {"train_methods", "train_test_domains"}
    assert expected <= names
    assert "train_grid" in names  # methods x test_domains x seeds


def test_gpu_requests_retries_and_scheduling(compiled):
    spec, executors, _ = compiled
    for name in ("exec-train", "exec-evaluate"):
        resources = spec["deploymentSpec"]["executors"][name]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert resources["accelerator"]["resourceCount"] == "1"
        assert resources["resourceCpuRequest"] == "8" and resources["resourceMemoryRequest"] == "32G"
        platform = executors[name]
        assert platform["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
        assert platform["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert platform["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
        assert platform["emptyDirMounts"][0]["medium"] == "Memory"
    (loop_task,) = [t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
    loop = spec["components"][loop_task["componentRef"]["name"]]["dag"]["tasks"]
    assert loop["train"]["retryPolicy"]["maxRetryCount"] == 3
    assert "retryPolicy" not in loop["evaluate"]
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-prepare"]["container"].get("resources", {})


def test_secrets_come_from_kubernetes_secrets(compiled):
    _, executors, text = compiled
    for name in ("exec-train", "exec-evaluate", "exec-prepare", "exec-report"):
        secrets = {s["secretName"]: [k["envVar"] for k in s["keyToEnv"]] for s in executors[name]["secretAsEnv"]}
        assert secrets["alignclip-s3"] == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
        assert "MLFLOW_TRACKING_PASSWORD" in secrets["alignclip-mlflow"]
    assert "testing" not in text and "password:" not in text.lower()


def test_every_family_compiles_with_its_protocol(tmp_path):
    from alignclip.protocols import PROTOCOLS

    expected = {"domain_shift": "domainbed", "imagenet": "imagenet", "base2new": "base2new", "wild": "wild"}
    for family, protocol in expected.items():
        spec = yaml.safe_load_all(compile_pipeline(family, tmp_path / f"{family}.yaml").read_text()).__next__()
        assert spec["pipelineInfo"]["name"] == f"alignclip-{family.replace('_', '-')}"
        defaults = spec["root"]["inputDefinitions"]["parameters"]
        assert defaults["data_protocol"]["defaultValue"] == protocol and protocol in PROTOCOLS
        assert {"prepare", "similarity", "report"} <= set(spec["root"]["dag"]["tasks"])
    spec = yaml.safe_load_all(compile_pipeline("all", tmp_path / "all.yaml").read_text()).__next__()
    assert len(spec["root"]["dag"]["tasks"]) == len(expected)  # one sub-pipeline per family


def test_local_runner_runs_the_whole_dag_and_mlflow_holds_the_runs(tmp_path):
    """The embedded default (four methods and AlignCLIP's released formulation x two held-out domains)."""
    db = tmp_path / "mlflow.db"
    env = dict(os.environ, ALIGNCLIP_LOG_LEVEL="WARNING", HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "alignclip", "pipeline", "run", "demo", "--pipeline-root", str(tmp_path / "kfp"),
           "--params-file", os.path.join(ROOT, "params.yaml"),
           "--param", "data_root=embedded", "--param", "train_steps=4", "--param", f"mlflow_tracking_uri=sqlite:///{db}"]
    # cwd: a sqlite tracking store keeps artifacts in ./mlruns of the working directory
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("demo-domain-shift")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    stages = sorted(r.data.tags["stage"] for r in children)
    assert stages.count("train") == 10 and stages.count("evaluate") == 10 and stages.count("report") == 1
    train = next(r for r in children if r.data.tags["stage"] == "train" and r.data.tags["method"] == "alignclip")
    release = next(r for r in children if r.data.tags["stage"] == "train" and r.data.tags["method"] == "alignclip+release")
    assert release.data.params["method.kl_direction"] == "reverse"
    history = client.get_metric_history(train.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert train.data.params["method.aal"] == "True"
    # provenance: the checkout's commit and the DVC hash of data.dvc, although the task ran outside the repo
    assert train.data.tags["git_commit"] == subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert train.data.tags["data_version"] == yaml.safe_load(open(os.path.join(ROOT, "data.dvc")))["outs"][0]["md5"]
    evaluation = next(r for r in children if r.data.tags["stage"] == "evaluate")
    assert 0.0 <= evaluation.data.metrics["test_acc"] <= 100.0
    report = next(r for r in children if r.data.tags["stage"] == "report")
    files = [a.path for a in client.list_artifacts(report.info.run_id, "report")]
    assert "report/index.html" in files and "report/domain_shift_rotated_digits.csv" in files
    names = {m.name for m in client.search_registered_models()}
    assert {"alignclip-rotated_digits-erm", "alignclip-rotated_digits-alignclip"} <= names
    # the KFP report artifact holds the same table
    tables = list((tmp_path / "kfp").rglob("domain_shift_rotated_digits.csv"))
    assert tables and "alignclip" in tables[0].read_text()
    # the attention-map figure found the collected checkpoints; no checkpoint is stored twice
    assert list((tmp_path / "kfp").rglob("report/attention_maps.png"))
    assert len(list((tmp_path / "kfp").rglob("model.pt"))) == 10
    metrics = [json.loads(p.read_text()) for p in (tmp_path / "kfp").rglob("evaluate/results/metrics.json")]
    assert len(metrics) == 10
    assert sorted((m["method"], m["formulation"], m["test_domain"]) for m in metrics) == sorted(
        [(m, "paper", d) for m in ("zeroshot", "erm", "clipood", "alignclip") for d in ("rotated_0", "rotated_75")]
        + [("alignclip", "release", d) for d in ("rotated_0", "rotated_75")]
    )
