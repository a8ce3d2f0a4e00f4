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
    assert set(tasks) == {"start-run", "prepare", "similarity", "for-loop-1", "report"}
    assert "prepare" in tasks["similarity"]["dependentTasks"]
    loop = tasks["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("train_grid")
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"train", "evaluate"}
    train_inputs = inner["train"]["inputs"]["artifacts"]
    assert train_inputs["matrix"]["componentInputArtifact"].endswith("similarity-matrix")
    assert inner["evaluate"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "train"
    # fan-in: the report collects every evaluation of the loop
    report = tasks["report"]["inputs"]
    assert report["artifacts"]["results"]["taskOutputArtifact"]["producerTask"] == "for-loop-1"
    assert report["artifacts"]["models"]["taskOutputArtifact"]["producerTask"] == "for-loop-1"
    assert report["parameters"]["accuracies"]["taskOutputParameter"]["producerTask"] == "for-loop-1"


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
    loop = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
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


def test_every_family_compiles(tmp_path):
    for family in ("domain_shift", "imagenet", "base2new", "wild", "all"):
        path = compile_pipeline(family, tmp_path / f"{family}.yaml")
        assert "pipelineInfo" in path.read_text()


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
    import numpy as np
    import pandas as pd
    from mlflow import MlflowClient

    from alignclip.runs import manifest_digest

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("demo-domain-shift")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    # one pipeline run, ended by the report after every cell, with its status
    parents = [r for r in runs if r.data.tags.get("run_type") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs if r is not parent)
    cells = [r for r in runs if r.data.tags.get("run_type") == "cell"]
    assert len(cells) == len(runs) - 1 == 10  # the similarity matrix and the report are the parent's artifacts
    assert parent.info.start_time <= min(r.info.start_time for r in cells)
    assert parent.info.end_time >= max(r.info.end_time for r in cells)
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report", "similarity"} <= parent_files
    assert "report/index.html" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    # one cell run per (variant, held-out domain, seed), training and evaluation together
    grid = sorted((r.data.tags["variant"], r.data.tags["held_out_domain"], r.data.tags["seed"]) for r in cells)
    assert grid == sorted((v, d, "0") for v in ("zeroshot", "erm", "clipood", "alignclip", "alignclip+release") for d in ("rotated_0", "rotated_75"))
    prepared = next((tmp_path / "kfp").rglob("prepare/prepared/manifest.parquet"))
    digest = manifest_digest(pd.read_parquet(prepared))
    metrics = {}
    for path in (tmp_path / "kfp").rglob("evaluate/results/metrics.json"):
        m = json.loads(path.read_text())
        metrics[(m["variant"], m["test_domain"])] = (m, path.parent)
    for cell in cells:
        tags = cell.data.tags
        assert cell.info.run_name == f"{tags['variant']} | {tags['held_out_domain']} | seed 0"
        assert tags["dataset"] == "rotated_digits" and tags["protocol"] == "domainbed" and tags["test_split"] == "holdout"
        assert tags["formulation"] == ("release" if tags["variant"] == "alignclip+release" else "paper")
        assert tags["method"] == tags["variant"].split("+")[0]
        assert cell.data.params["train.test_domain"] == tags["held_out_domain"]
        # accuracies in percent: the held-out accuracy is 100 * correct / total of the evaluation's own counts
        m, _ = metrics[(tags["variant"], tags["held_out_domain"])]
        assert cell.data.metrics["test_acc_pct"] == pytest.approx(100.0 * m["views"]["test"]["correct"] / m["views"]["test"]["total"])
        assert cell.data.metrics["test_images"] == m["views"]["test"]["total"]
        # the data came from the embedded build inside the prepare artifact, not from data.dvc: the tag says so
        assert tags["data_version"] == f"manifest:{digest}" and tags["data_source"].endswith("/images")
        assert [i.dataset.digest for i in cell.inputs.dataset_inputs] == [digest]
    alignclip = next(r for r in cells if r.data.tags["variant"] == "alignclip" and r.data.tags["held_out_domain"] == "rotated_0")
    release = next(r for r in cells if r.data.tags["variant"] == "alignclip+release")
    assert release.data.params["method.kl_direction"] == "reverse"
    assert alignclip.data.params["method.aal"] == "True"
    assert [m.step for m in client.get_metric_history(alignclip.info.run_id, "loss")] == [1, 2, 3, 4]
    # train accuracy in percent: batches of 16 images from each of 5 training domains, so multiples of 100/80
    train_acc = [m.value for m in client.get_metric_history(alignclip.info.run_id, "train_acc_pct")]
    assert all(0.0 <= v <= 100.0 and abs(v / 1.25 - round(v / 1.25)) < 1e-4 for v in train_acc) and max(train_acc) > 1.0
    assert {"train_log.csv", "train.json", "metrics.json", "predictions.parquet"} <= {
        a.path for a in client.list_artifacts(alignclip.info.run_id)}
    assert alignclip.data.tags["git_commit"] == subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    # the pipeline run's summary: mean (and std over the one seed) per method and held-out domain
    for cell in cells:
        key = f"test_acc_pct/{cell.data.tags['variant'].replace('+', '-')}/{cell.data.tags['held_out_domain']}"
        assert parent.data.metrics[f"{key}/mean"] == pytest.approx(cell.data.metrics["test_acc_pct"])
        assert parent.data.metrics[f"{key}/std"] == 0.0
    # registered models: only the trained methods, tagged, described, the best version aliased
    models = {m.name: m for m in client.search_registered_models()}
    assert set(models) == {f"alignclip-rotated_digits-{v}" for v in ("erm", "clipood", "alignclip", "alignclip-release")}
    for model in models.values():
        assert model.tags["dataset"] == "rotated_digits" and model.tags["variant"] in model.name.replace("-release", "+release")
        versions = client.search_model_versions(f"name = '{model.name}'")
        assert sorted(v.tags["held_out_domain"] for v in versions) == ["rotated_0", "rotated_75"]
        for version in versions:
            run = client.get_run(version.run_id)
            assert run.data.tags["run_type"] == "cell" and float(version.tags["test_acc_pct"]) == pytest.approx(run.data.metrics["test_acc_pct"], abs=0.01)
            assert f"{run.data.metrics['test_acc_pct']:.1f}%" in version.description
            assert version.tags["formulation"] == run.data.tags["formulation"]
        for domain in ("rotated_0", "rotated_75"):
            best = client.get_model_version_by_alias(model.name, f"best-{domain}-holdout")
            assert float(best.tags["test_acc_pct"]) == max(float(v.tags["test_acc_pct"]) for v in versions if v.tags["held_out_domain"] == domain)
    # the registered model returns class probabilities over its label space: the evaluation's own top-5
    from alignclip.data.images import ManifestImages, eval_transform

    version = client.get_model_version_by_alias("alignclip-rotated_digits-alignclip", "best-rotated_0-holdout")
    model = mlflow.pyfunc.load_model("models:/alignclip-rotated_digits-alignclip@best-rotated_0-holdout")
    classes = model.metadata.metadata["classes"]
    assert model.metadata.get_output_schema().inputs[0].shape == (-1, len(classes))
    m, folder = metrics[("alignclip", "rotated_0")]
    predictions = pd.read_parquet(folder / "predictions.parquet").query("view == 'test'").head(6)
    meta = json.loads((prepared.parent / "meta.json").read_text())
    import open_clip

    size = model.metadata.get_input_schema().inputs[0].shape[-1]  # the model's own signature: [-1, 3, H, W]
    transform = eval_transform(size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    images = ManifestImages(meta, predictions["path"].tolist(), predictions["label"].tolist(), list(range(len(classes))), transform)
    batch = np.stack([images[i][0].numpy() for i in range(len(images))])
    probabilities = np.asarray(model.predict(batch))
    assert probabilities.shape == (6, len(classes)) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    for row, (_, expected) in zip(probabilities, predictions.iterrows()):
        top = np.argsort(-row)[:5]
        assert ",".join(map(str, top)) == expected["top5"]
        assert np.allclose(row[top], [float(p) for p in expected["top5_prob"].split(",")], atol=1e-3)
    assert version.tags["classes"] == ",".join(classes)
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
