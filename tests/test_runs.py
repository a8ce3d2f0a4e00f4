"""The MLflow model of a pipeline run (alignclip.runs) against a real sqlite store: the DVC parent's life cycle,
the summary metrics, the data-version tag. The whole flows (KFP local run, dvc repro) are in test_pipeline.py and
test_services.py."""

import math

import pandas as pd
import pytest
import yaml

from alignclip import runs


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # the sqlite store keeps artifacts in ./mlruns
    mlflow.set_tracking_uri(uri)
    yield uri


def test_dvc_parent_is_reused_until_the_report_ends_it(store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    repo = tmp_path / "repo"
    repo.mkdir()
    defaults = yaml.safe_load((runs.Path(runs.__file__).parent.parent / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(defaults))
    assert runs.dvc_parent_run("exp") is None  # not a DVC stage
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("DVC_STAGE", "train@0")
    monkeypatch.chdir(repo)  # DVC runs a stage in its working directory
    first = runs.dvc_parent_run("exp")
    client = MlflowClient()
    run = client.get_run(first)
    assert run.info.status == "RUNNING" and run.data.tags["run_type"] == "pipeline"
    assert run.data.params["train.steps"] == str(defaults["train"]["steps"])
    assert runs.dvc_parent_run("exp") == first  # the next stage of the same `dvc repro`
    runs.mark_failed(first, "train@0")
    assert client.get_run(first).info.status == "FAILED"
    assert runs.dvc_parent_run("exp") == first  # a re-run after the failure resumes it
    assert client.get_run(first).info.status == "RUNNING"
    runs.finish_pipeline_run(first, pd.DataFrame(), tmp_path / "no-report")
    assert client.get_run(first).info.status == "FINISHED"
    second = runs.dvc_parent_run("exp")  # a later `dvc repro -f`: a new pipeline run
    assert second != first
    defaults["train"]["seeds"] = [0, 1]
    (repo / "params.yaml").write_text(yaml.safe_dump(defaults))
    assert runs.dvc_parent_run("exp") not in (first, second)  # another configuration, another pipeline run


def test_summary_metrics_are_mean_and_std_over_seeds():
    rows = [
        ("alignclip", "rotated_0", 0, 10.0), ("alignclip", "rotated_0", 1, 14.0), ("alignclip", "rotated_0", 2, 15.0),
        ("alignclip", "rotated_75", 0, 20.0), ("alignclip", "rotated_75", 1, 22.0), ("alignclip", "rotated_75", 2, 30.0),
        ("erm", "rotated_0", 0, 50.0),
    ]
    results = pd.DataFrame(
        [{"variant": v, "test_domain": d, "seed": s, "view": "test", "accuracy": a, "source": f"{v}{d}{s}"} for v, d, s, a in rows]
    )
    metrics = runs.summary_metrics(results)
    sample = [10.0, 14.0, 15.0]
    mean = sum(sample) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in sample) / 2)
    assert metrics["test_acc_pct/alignclip/rotated_0/mean"] == pytest.approx(mean)
    assert metrics["test_acc_pct/alignclip/rotated_0/std"] == pytest.approx(std)
    assert metrics["test_acc_pct/alignclip/rotated_0/seeds"] == 3
    # average over held-out domains (table 1's Avg.), its spread over seeds of the per-seed averages
    assert metrics["test_acc_pct/alignclip/avg/mean"] == pytest.approx((mean + 24.0) / 2)
    per_seed = [15.0, 18.0, 22.5]
    seed_mean = sum(per_seed) / 3
    assert metrics["test_acc_pct/alignclip/avg/std"] == pytest.approx(math.sqrt(sum((x - seed_mean) ** 2 for x in per_seed) / 2))
    assert metrics["test_acc_pct/erm/rotated_0/std"] == 0.0
    # '+' is not allowed in MLflow metric names
    assert runs.metric_key("test_acc_pct", "alignclip+release", "Real World") == "test_acc_pct/alignclip-release/Real World"


def test_data_version_names_where_the_data_came_from(tmp_path, monkeypatch):
    monkeypatch.delenv("ALIGNCLIP_DATA_VERSION", raising=False)
    manifest = pd.DataFrame({"path": ["a/1.png", "b/2.png"], "label": [0, 1]})
    (tmp_path / "data" / "rotated_digits").mkdir(parents=True)
    (tmp_path / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": "abc123.dir", "path": "data"}]}))
    monkeypatch.chdir(tmp_path)
    tracked = runs.data_tags({"root": "data/rotated_digits"}, manifest)
    assert tracked["data_version"] == "dvc:abc123.dir" and tracked["data_source"] == "data/rotated_digits"
    (tmp_path / "elsewhere").mkdir()
    other = runs.data_tags({"root": str(tmp_path / "elsewhere")}, manifest)
    assert other["data_version"] == f"manifest:{runs.manifest_digest(manifest)}"
    assert runs.data_tags({"root": "s3://bucket/pacs"}, manifest)["data_version"].startswith("manifest:")
    # the digest follows the manifest's content
    assert runs.manifest_digest(manifest) != runs.manifest_digest(manifest.assign(label=[1, 0]))
