"""MLflow against a real server (PostgreSQL backend store, S3 artifacts), DVC's S3 remote, `dvc repro` and the
Dockerfiles: each against the real tool, on 127.0.0.1 only. The infra manifests (schema, secrets) are tests/test_infra.py's."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.servers import S3_ENV, make_bucket, mlflow_server, postgres_server, s3_server

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def cli(*args, env=None, cwd=None):
    done = subprocess.run([sys.executable, "-m", "alignclip", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_mlflow_server_with_postgres_and_s3_artifacts(digits_prepared, tmp_path):
    import boto3
    import mlflow
    from mlflow import MlflowClient

    with s3_server() as endpoint, postgres_server() as backend:
        make_bucket(endpoint, "mlflow")
        with mlflow_server(backend, endpoint, "mlflow") as url:
            env = dict(os.environ, MLFLOW_TRACKING_URI=url, ALIGNCLIP_EXPERIMENT="server-test", ALIGNCLIP_LOG_LEVEL="WARNING")
            cli("train", str(digits_prepared), str(tmp_path / "run"), "--method", "alignclip", "--steps", "3",
                "--test-domain", "rotated_0", "--no-progress", env=env)
            cli("evaluate", str(digits_prepared), str(tmp_path / "run" / "model.pt"), str(tmp_path / "run"),
                "--test-domain", "rotated_0", env=env)
            mlflow.set_tracking_uri(url)
            client = MlflowClient()
            experiment = client.get_experiment_by_name("server-test")
            # by hand, without a pipeline: train and evaluate of the cell still share one run
            (cell,) = client.search_runs([experiment.experiment_id])
            assert cell.data.tags["run_type"] == "cell" and "mlflow.parentRunId" not in cell.data.tags
            assert [m.step for m in client.get_metric_history(cell.info.run_id, "aal")] == [1, 2, 3]
            assert cell.data.params["train.steps"] == "3"
            import pandas as pd

            test = pd.read_parquet(tmp_path / "run" / "predictions.parquet").query("view == 'test'")
            assert cell.data.metrics["test_acc_pct"] == pytest.approx(100.0 * (test["pred"] == test["label"]).mean())
            artifacts = {a.path for a in client.list_artifacts(cell.info.run_id)}
            assert {"train_log.csv", "metrics.json"} <= artifacts
            local = client.download_artifacts(cell.info.run_id, "train_log.csv", str(tmp_path / "dl"))
            assert Path(local).read_text() == (tmp_path / "run" / "train_log.csv").read_text()
            versions = client.search_model_versions("name='alignclip-rotated_digits-alignclip'")
            assert len(versions) == 1
        # the artifacts really went to the S3 store behind the server
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
        assert any(k.endswith("train_log.csv") for k in keys)


@pytest.mark.slow
def test_dvc_push_pull_round_trip_through_s3(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    dvc = [str(BIN / "dvc")]
    env = dict(os.environ, **S3_ENV)
    run = lambda *a: subprocess.run(dvc + list(a), cwd=project, env=env, check=True, capture_output=True, text=True)  # noqa: E731
    with s3_server() as endpoint:
        make_bucket(endpoint, "dvc-remote")
        run("init", "--no-scm")
        run("remote", "add", "-d", "storage", "s3://dvc-remote/store")
        run("remote", "modify", "storage", "endpointurl", endpoint)
        cli("data", "digits", str(project / "data" / "rotated_digits"))
        run("add", "data")
        original = {p.relative_to(project): p.read_bytes() for p in (project / "data").rglob("*") if p.is_file()}
        run("push")
        shutil.rmtree(project / "data")
        shutil.rmtree(project / ".dvc" / "cache")
        run("pull")
        pulled = {p.relative_to(project): p.read_bytes() for p in (project / "data").rglob("*") if p.is_file()}
        assert pulled == original and len(pulled) == 1798


@pytest.mark.slow
def test_the_committed_data_dvc_matches_the_digits_build(tmp_path):
    """data.dvc tracks data/ = RotatedDigits; a fresh build hashes to the committed md5."""
    out = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    project = tmp_path / "p"
    project.mkdir()
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm"], cwd=project, check=True, capture_output=True)
    cli("data", "digits", str(project / "data" / "rotated_digits"))
    subprocess.run([str(BIN / "dvc"), "add", "data"], cwd=project, check=True, capture_output=True)
    assert yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"] == out["md5"]


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline(tmp_path):
    project = tmp_path / "repo"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml", "data.dvc", ".dvcignore"):
        shutil.copy(ROOT / name, project / name)
    # the source files stages depend on (the pretrain stage's code), as in a clone
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for dep in stage.get("deps", []):
            if (ROOT / dep).is_file():
                (project / dep).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / dep, project / dep)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(methods=["zeroshot", "alignclip+release"], test_domains=["rotated_15"], steps=3, grid={}, seeds=[0])
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    uri = f"sqlite:///{project / 'mlflow.db'}"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", ALIGNCLIP_LOG_LEVEL="WARNING",
               MLFLOW_TRACKING_URI=uri, ALIGNCLIP_EXPERIMENT="dvc-test")
    dvc = lambda *a: subprocess.run([str(BIN / "dvc"), *a], cwd=project, env=env, capture_output=True, text=True)  # noqa: E731
    assert dvc("init", "--no-scm").returncode == 0
    cli("data", "digits", str(project / "data" / "rotated_digits"))
    done = dvc("repro")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (project / "outputs" / "report" / "index.html").exists()
    # `dvc metrics show` of a (domain, seed) group: one narrow row, the held-out accuracy in percent
    # (the report's scores, means and intervals per method and column, are a second, wide metrics file)
    shown = dvc("metrics", "show", "outputs/scores/rotated_15-s0.json")
    rows = [line for line in shown.stdout.splitlines() if line.strip()]
    assert max(len(line) for line in rows) < 160, shown.stdout  # a file, its cells, two accuracies
    assert "test_acc_pct" in rows[0] and any("alignclip+release-rotated_15-s0" in line for line in rows)
    # `dvc plots show`: the overlaid training curves as an image, no Vega from a CDN (renders offline)
    assert dvc("plots", "show", "-o", "plots").returncode == 0
    page = (project / "plots" / "index.html").read_text()
    assert "<script" not in page and "training_curves.png" in page

    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("dvc-test")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags["run_type"] == "pipeline"]
    assert parent.info.status == "FINISHED" and parent.data.tags["orchestrator"] == "dvc"
    cells = [r for r in runs if r.data.tags["run_type"] == "cell"]
    assert len(runs) == 3 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in cells)
    assert sorted(r.data.tags["variant"] for r in cells) == ["alignclip+release", "zeroshot"]
    scores = json.loads((project / "outputs" / "runs" / "rotated_15" / "s0" / "alignclip+release-rotated_15-s0" / "scores.json").read_text())
    release = next(r for r in cells if r.data.tags["variant"] == "alignclip+release")
    assert release.data.metrics["test_acc_pct"] == scores["test_acc_pct"]
    assert parent.data.metrics["test_acc_pct/alignclip-release/rotated_15/mean"] == scores["test_acc_pct"]
    assert release.data.params["train.steps"] == "3" and release.data.tags["test_split"] == "full"
    # the data is data/ as data.dvc tracks it
    assert release.data.tags["data_version"] == "dvc:" + yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]["md5"]
    assert [m.name for m in client.search_registered_models()] == ["alignclip-rotated_digits-alignclip-release"]
    # nothing changed, so no stage would run (each stage's deps and outs as dvc.lock has them), hence no stage
    # could open a pipeline run either. `dvc status` decides this exactly as `dvc repro` does, without a repro.
    unchanged = dvc("status", "--json")
    assert unchanged.returncode == 0 and json.loads(unchanged.stdout) == {}, unchanged.stdout + unchanged.stderr
    # a new seed adds its grid cells and re-runs nothing else: each stage lists only the settings it reads, and
    # the prepared data of a domain-shift protocol does not depend on the seeds (prepare does not re-run).
    # `repro --dry` names the stages a repro would start (the report follows from their new outputs); that
    # another configuration is another pipeline run is tests/test_runs.py's test_dvc_parent_is_reused_...
    params["train"]["seeds"] = [0, 1]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    grown = dvc("repro", "--dry")
    assert grown.returncode == 0, grown.stdout[-3000:] + grown.stderr[-3000:]
    ran = set(re.findall(r"Running stage '([^']+)'", grown.stdout))
    # one stage trains and evaluates the new seed's cells; zero-shot runs once per domain, so it does not re-run
    assert ran == {"train@rotated_15-1"}, grown.stdout
    assert len(client.search_runs([experiment.experiment_id])) == 3  # a dry run logs nothing


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "infra/mlflow/Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile):
    done = subprocess.run([str(BIN / "hadolint"), str(ROOT / dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
