"""The MLflow model of a pipeline run (alignclip.tracking.runs) against a real sqlite store: the DVC parent's life cycle,
the summary metrics, the data-version tag. The whole flows (KFP local run, dvc repro) are in test_pipeline.py and
test_services.py."""

import math
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from alignclip.tracking import provenance, runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # the sqlite store keeps artifacts in ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # as a stage is told its store
    yield uri


def test_dvc_parent_is_reused_until_the_report_ends_it(store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    repo = tmp_path / "repo"
    repo.mkdir()
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(defaults))
    assert runs.dvc_parent_run("exp") is None  # not a DVC stage
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("DVC_STAGE", "train@0")
    monkeypatch.chdir(repo)  # DVC runs a stage in its working directory
    first = runs.dvc_parent_run("exp")
    client = MlflowClient(tracking_uri=store)
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
    tracked = provenance.data_tags({"root": "data/rotated_digits"}, manifest)
    assert tracked["data_version"] == "dvc:abc123.dir" and tracked["data_source"] == "data/rotated_digits"
    (tmp_path / "elsewhere").mkdir()
    other = provenance.data_tags({"root": str(tmp_path / "elsewhere")}, manifest)
    assert other["data_version"] == f"manifest:{provenance.manifest_digest(manifest)}"
    assert provenance.data_tags({"root": "s3://bucket/pacs"}, manifest)["data_version"].startswith("manifest:")
    # the digest follows the manifest's content
    assert provenance.manifest_digest(manifest) != provenance.manifest_digest(manifest.assign(label=[1, 0]))


def test_a_uri_set_earlier_in_the_process_does_not_redirect_tracking(store, tmp_path, monkeypatch):
    """The store is the one the stage resolves (an explicit URI, else MLFLOW_TRACKING_URI), never MLflow's
    process-global URI: a notebook, an earlier test or an earlier stage in the same process may have set that."""
    import mlflow
    from mlflow import MlflowClient

    from alignclip import tracking

    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    mlflow.set_tracking_uri(elsewhere)  # set earlier in this process (it also exports MLFLOW_TRACKING_URI)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # then the stage is told its store
    parent = runs.open_pipeline_run("exp", "pipeline", {"protocol": "domainbed"})
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(parent).info.status == "RUNNING"
    assert runs.pipeline_view(parent)[0] == client.get_experiment_by_name("exp").experiment_id
    # an explicit URI wins over the global one too: the stage's run, the failure mark on its parent and its link
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ValueError), tracking.start_run("exp", "cell", uri=store, parent_run_id=parent) as tracker:
        tracker.log_metrics({"x": 1.0}, step=1)
        raise ValueError("the stage failed")
    assert client.get_run(parent).info.status == "FAILED" and client.get_run(parent).data.tags["failed_stage"] == "cell"
    assert client.get_run(tracker.run_id).data.tags["mlflow.parentRunId"] == parent
    assert tracking.resumable(tracker.run_id, parent, uri=store)
    assert f"--backend-store-uri {store}" in tracking.view_line(parent, uri=store)
    assert MlflowClient(tracking_uri=elsewhere).get_experiment_by_name("exp") is None  # nothing went there


def test_the_fluent_uri_is_put_back_after_the_block(store, tmp_path, monkeypatch):
    """log_model needs MLflow's global URI for its block; afterwards the global URI and MLFLOW_TRACKING_URI are
    as they were, so the next stage in the process resolves its own store."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    from alignclip.tracking.client import fluent_uri

    other = f"sqlite:///{tmp_path / 'other.db'}"
    with fluent_uri(other):
        assert mlflow.get_tracking_uri() == other
    assert utils._tracking_uri is None and mlflow.get_tracking_uri() == store
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with fluent_uri(other):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_the_best_alias_follows_source_validation_not_test_accuracy(store, tmp_path):
    """Issue 19: the registered model's `best-...` alias obeys the declared model-selection rule (training-domain
    validation: best source-validation accuracy, alignclip.selection), never a test accuracy. Versions are tagged
    by the production path (the classifier's registration tags, then evaluate's description)."""
    from mlflow import MlflowClient

    from alignclip import tracking

    client = MlflowClient(tracking_uri=store)
    experiment = client.create_experiment("cells")
    name = tracking.registered_name("rotated_digits", "erm")
    client.create_registered_model(name)
    # seed: (held-out domain, test accuracy, source-validation accuracy or None: a protocol without one)
    cells = {0: ("rotated_0", 90.0, 60.0), 1: ("rotated_0", 70.0, 80.0), 2: ("rotated_0", 95.0, 80.0),
             3: ("rotated_75", 99.0, None)}
    versions = {}
    for seed, (domain, test, validation) in cells.items():
        run_id = client.create_run(experiment).info.run_id
        (tmp_path / f"model{seed}").mkdir()
        versions[seed] = client.create_model_version(name, str(tmp_path / f"model{seed}"), run_id=run_id).version
        tags = tracking.cell_tags("rotated_digits", "domainbed", "erm", "erm", "paper", domain, seed)
        tracking.describe_registered_model(name, versions[seed], tags, ["a", "b"])
        views = {"test": {"accuracy": test, "total": 100}}
        if validation is not None:
            views["source_val"] = {"accuracy": validation, "total": 50}
        summary = {"views": views, "test_split": "holdout", "test_domain": domain, "variant": "erm",
                   "formulation": "paper", "dataset": "rotated_digits", "protocol": "domainbed", "seed": seed}
        tracking.describe_model_version(run_id, summary)
    tracking.set_best_aliases("rotated_digits")
    # seed 1 and seed 2 tie on source validation (80.0): the earlier version; seed 2's better test accuracy and
    # seed 0's and seed 3's are not read, and seed 3 (no source validation) gets no alias at all
    assert client.get_registered_model(name).aliases == {"best-rotated_0-holdout": versions[1]}
    assert client.get_model_version(name, versions[1]).tags["source_val_acc_pct"] == "80.00"


def test_the_commit_tag_says_dirty_when_tracked_files_differ_from_head(tmp_path):
    """A run made by uncommitted code names HEAD with -dirty (as the image's GIT_COMMIT does); an untracked file
    (dvc.lock after a demo) does not make it dirty; outside a checkout there is no commit."""
    import subprocess

    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    subprocess.run(git + ["add", "code.py"], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "dvc.lock").write_text("untracked\n")
    assert provenance.checkout_commit(tmp_path) == head
    (tmp_path / "code.py").write_text("a = 2\n")
    assert provenance.checkout_commit(tmp_path) == head + "-dirty"
    assert provenance.checkout_commit(tmp_path / "not-a-checkout") is None


def test_registered_names_are_clean_for_ablations_and_formulations():
    from alignclip import tracking

    assert tracking.registered_name("rotated_digits", "erm") == "alignclip-rotated_digits-erm"
    assert tracking.registered_name("rotated_digits", "alignclip+release") == "alignclip-rotated_digits-alignclip-release"
    assert tracking.registered_name("rotated_digits", "alignclip[aal=False]") == "alignclip-rotated_digits-alignclip-aal-false"
    assert tracking.registered_name("office_home", "erm[pooling=avg,eps=0.2]") == "alignclip-office_home-erm-pooling-avg-eps-0.2"
