"""The demo DAG as the tests run it, and what its runs must hold afterwards: one definition for the two runners.

The DAG runs once per suite: in containers of the image (kfp's DockerRunner, tests/test_image.py) where a Docker
daemon is reachable, as CI has; else in subprocesses (kfp's SubprocessRunner, `alignclip pipeline run`,
tests/test_pipeline.py). Both run the same settings and pass ``check_runs``; the runner choice itself is tested
in the fast tier. Two cells run every task of the DAG (more cells add only more of the same processes): AlignCLIP
in the paper's formulation x two held-out domains (a registered model with a version per domain, one alias each).
Zero-shot cells (not registered) and the released formulation (the '+' of its variant in model and metric names)
are proven by `dvc repro` (tests/test_services.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# `alignclip pipeline run demo --params-file params.yaml --param KEY=VALUE ...`: one method, one seed, no selection
# grid, the old batch and split: 2 cells
SETTINGS = {"data_root": "embedded", "train_steps": "4", "train_methods": "alignclip", "train_seeds": "0",
            "train_grid": "{}", "train_batch_size": "16", "data_test_split": "holdout"}
DOMAINS = ("rotated_0", "rotated_75")
VARIANT = "alignclip"
MODEL = "alignclip-rotated_digits-alignclip"


def docker_unavailable() -> str | None:
    """Why no Docker daemon can be used (None: one answers)."""
    try:
        import docker

        docker.from_env(timeout=10).ping()
    except Exception as err:  # any failure to reach a daemon means: skip, and say why
        return f"no Docker daemon reachable ({type(err).__name__}: {str(err)[:120]}); .ci/run starts one"
    return None


def pipeline_arguments(tracking_uri: str) -> dict:
    """The demo pipeline's arguments for SETTINGS, resolved as `alignclip pipeline run` resolves them."""
    from alignclip.config import parse_assignments
    from alignclip_kfp.arguments import pipeline_arguments as arguments, resolve_pipeline

    overrides = parse_assignments(param_options(tracking_uri)[1::2])
    return arguments("demo", resolve_pipeline("demo", ROOT / "params.yaml", overrides))


def param_options(tracking_uri: str) -> list[str]:
    """SETTINGS and the tracking URI as `--param KEY=VALUE` options."""
    return [word for key, value in {**SETTINGS, "mlflow_tracking_uri": tracking_uri}.items() for word in ("--param", f"{key}={value}")]


def check_runs(root: Path, db: Path, commit: str) -> dict:
    """What the DAG's MLflow store (sqlite ``db``) and KFP outputs (under the pipeline root ``root``) must hold;
    ``commit``: the provenance the cells' runs carry. Returns the cell runs by held-out domain."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from alignclip.tracking import manifest_digest

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
    assert len(cells) == len(runs) - 1 == 2  # the similarity matrix and the report are the parent's artifacts
    assert parent.info.start_time <= min(r.info.start_time for r in cells)
    assert parent.info.end_time >= max(r.info.end_time for r in cells)
    assert {"report", "similarity"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    reported = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/index.html", "report/domain_shift_rotated_digits.csv"} <= reported
    # one cell run per (variant, held-out domain, seed), training and evaluation together
    grid = sorted((r.data.tags["variant"], r.data.tags["held_out_domain"], r.data.tags["seed"]) for r in cells)
    assert grid == [(VARIANT, d, "0") for d in DOMAINS]
    prepared = next(root.rglob("prepare/prepared/manifest.parquet"))
    digest = manifest_digest(pd.read_parquet(prepared))
    metrics = {}
    for path in root.rglob("evaluate/results/metrics.json"):
        m = json.loads(path.read_text())
        metrics[(m["variant"], m["test_domain"])] = (m, path.parent)
    assert sorted((m["method"], m["formulation"], m["test_domain"]) for m, _ in metrics.values()) == [
        ("alignclip", "paper", d) for d in DOMAINS]
    for cell in cells:
        tags = cell.data.tags
        assert cell.info.run_name == f"{tags['variant']} | {tags['held_out_domain']} | seed 0"
        assert tags["dataset"] == "rotated_digits" and tags["protocol"] == "domainbed" and tags["test_split"] == "holdout"
        assert tags["formulation"] == "paper" and tags["method"] == "alignclip"
        assert cell.data.params["train.test_domain"] == tags["held_out_domain"]
        assert cell.data.params["method.kl_direction"] == "forward" and cell.data.params["method.aal"] == "True"
        # accuracies in percent: the held-out accuracy is 100 * correct / total of the evaluation's own counts
        m, _ = metrics[(tags["variant"], tags["held_out_domain"])]
        assert cell.data.metrics["test_acc_pct"] == pytest.approx(100.0 * m["views"]["test"]["correct"] / m["views"]["test"]["total"])
        assert cell.data.metrics["test_images"] == m["views"]["test"]["total"]
        # the data came from the embedded build inside the prepare artifact, not from data.dvc: the tag says so
        assert tags["data_version"] == f"manifest:{digest}" and tags["data_source"].endswith("/images")
        assert [i.dataset.digest for i in cell.inputs.dataset_inputs] == [digest]
        assert tags["git_commit"] == commit
        assert [m.step for m in client.get_metric_history(cell.info.run_id, "loss")] == [1, 2, 3, 4]
        # train accuracy in percent: batches of 16 images from each of 5 training domains, so multiples of 100/80
        train_acc = [m.value for m in client.get_metric_history(cell.info.run_id, "train_acc_pct")]
        assert all(0.0 <= v <= 100.0 and abs(v / 1.25 - round(v / 1.25)) < 1e-4 for v in train_acc) and max(train_acc) > 1.0
        assert {"train_log.csv", "train.json", "metrics.json", "predictions.parquet"} <= {
            a.path for a in client.list_artifacts(cell.info.run_id)}
        # the pipeline run's summary: mean (and std over the one seed) per method and held-out domain
        key = f"test_acc_pct/{tags['variant'].replace('+', '-')}/{tags['held_out_domain']}"
        assert parent.data.metrics[f"{key}/mean"] == pytest.approx(cell.data.metrics["test_acc_pct"])
        assert parent.data.metrics[f"{key}/std"] == 0.0
    _check_registry(client)
    _check_served_model(root, prepared, metrics)
    # the attention-map figure found the collected checkpoints; no checkpoint is stored twice
    assert list(root.rglob("report/attention_maps.png"))
    assert len(list(root.rglob("model.pt"))) == 2
    tables = list(root.rglob("domain_shift_rotated_digits.csv"))  # the KFP report artifact holds the same table
    assert tables and "alignclip" in tables[0].read_text()
    return {cell.data.tags["held_out_domain"]: cell for cell in cells}


def _check_registry(client) -> None:
    """Registered models: only the trained methods, tagged, described, the best version (by source validation)
    aliased per held-out domain."""
    models = {m.name: m for m in client.search_registered_models()}
    assert set(models) == {MODEL}
    model = models[MODEL]
    assert model.tags["dataset"] == "rotated_digits" and model.tags["variant"] == VARIANT
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(v.tags["held_out_domain"] for v in versions) == list(DOMAINS)
    for version in versions:
        run = client.get_run(version.run_id)
        assert run.data.tags["run_type"] == "cell"
        assert float(version.tags["test_acc_pct"]) == pytest.approx(run.data.metrics["test_acc_pct"], abs=0.01)
        assert f"{run.data.metrics['test_acc_pct']:.1f}%" in version.description
        assert version.tags["formulation"] == run.data.tags["formulation"]
    for domain in DOMAINS:
        best = client.get_model_version_by_alias(MODEL, f"best-{domain}-holdout")
        assert float(best.tags["source_val_acc_pct"]) == max(
            float(v.tags["source_val_acc_pct"]) for v in versions if v.tags["held_out_domain"] == domain)


def _check_served_model(root: Path, prepared: Path, metrics: dict) -> None:
    """The registered model returns class probabilities over its label space: the evaluation's own top-5."""
    import mlflow
    import numpy as np
    import open_clip
    import pandas as pd

    from alignclip.data.images import ManifestImages, eval_transform
    from alignclip.data.prepare import load_prepared

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@best-rotated_0-holdout")
    classes = model.metadata.metadata["classes"]
    assert model.metadata.get_output_schema().inputs[0].shape == (-1, len(classes))
    _, folder = metrics[(VARIANT, "rotated_0")]
    predictions = pd.read_parquet(folder / "predictions.parquet").query("view == 'test'").head(6)
    _, meta = load_prepared(prepared.parent)  # resolves the root, which is stored relative to the prepared folder
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
    version = mlflow.MlflowClient().get_model_version_by_alias(MODEL, "best-rotated_0-holdout")
    assert version.tags["classes"] == ",".join(classes)
