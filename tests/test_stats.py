"""Paired bootstrap intervals (alignclip.stats), model selection by training-domain validation
(alignclip.selection) and the paper-shaped report tables built from them (alignclip.report_tables)."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from alignclip import selection, stats
from alignclip.report import build_report, collect


# ------------------------------------------------------------------------------------------------ the bootstrap


def _percentile(values, q):
    """Linear interpolation between order statistics (numpy's default), written out."""
    ordered = sorted(values)
    position = q / 100.0 * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def _naive_replicates(method, baseline, indices):
    """Each resample: the method's accuracy averaged over its seeds minus the baseline's, image by image in loops."""
    replicates = []
    for idx in indices:
        acc_m = sum(sum(seed[i] for i in idx) / len(idx) for seed in method) / len(method)
        acc_b = sum(sum(seed[i] for i in idx) / len(idx) for seed in baseline) / len(baseline)
        replicates.append(100.0 * (acc_m - acc_b))
    return replicates


def _indices(key, n):
    return np.concatenate(list(stats.resample_indices(key, n))).tolist()


def test_identical_predictions_give_zero_and_an_interval_of_zero():
    correct = np.random.default_rng(0).integers(0, 2, size=(3, 40))
    difference = stats.paired_difference(correct, correct, "d/x")
    assert (difference.diff, difference.low, difference.high) == (0.0, 0.0, 0.0)
    assert not difference.significant and stats.format_difference(difference).endswith("n.s.")


def test_k_more_right_images_give_a_difference_of_100_k_over_n():
    n, k = 50, 7
    baseline = np.zeros((1, n), dtype=int)
    baseline[0, :20] = 1
    method = baseline.copy()
    method[0, 20 : 20 + k] = 1  # right on k more images, wrong on none the baseline got right
    difference = stats.paired_difference(np.repeat(method, 3, axis=0), baseline, "d/x")
    assert difference.diff == pytest.approx(100.0 * k / n)
    assert difference.low >= 0.0 and difference.high <= 100.0 * 20 / n
    assert difference.images == n
    assert difference.significant  # 7 of 50 images, never contradicted: 0 is outside the interval


def test_interval_matches_an_independent_computation_with_the_same_resamples():
    rng = np.random.default_rng(3)
    n = 37
    method = rng.integers(0, 2, size=(3, n)).tolist()  # three seeds
    baseline = [rng.integers(0, 2, size=n).tolist()]  # a deterministic baseline: one run, reused for every seed
    indices = _indices("digits/rotated_0", n)
    assert len(indices) == stats.BOOTSTRAP_RESAMPLES and all(len(i) == n for i in indices)
    replicates = _naive_replicates(method, baseline, indices)
    difference = stats.paired_difference(np.array(method), np.array(baseline), "digits/rotated_0")
    point = 100.0 * (sum(map(sum, method)) / (3 * n) - sum(baseline[0]) / n)
    assert difference.diff == pytest.approx(point)
    assert difference.low == pytest.approx(_percentile(replicates, 2.5))
    assert difference.high == pytest.approx(_percentile(replicates, 97.5))


def test_the_average_over_domains_resamples_within_each_domain():
    rng = np.random.default_rng(5)
    domains = {"d/a": 23, "d/b": 31}
    pairs = {key: (rng.integers(0, 2, size=(2, n)), rng.integers(0, 2, size=(2, n))) for key, n in domains.items()}
    per_domain = {key: _naive_replicates(m.tolist(), b.tolist(), _indices(key, domains[key])) for key, (m, b) in pairs.items()}
    averaged = [sum(values) / len(values) for values in zip(*per_domain.values())]
    difference = stats.averaged_difference(pairs)
    expected = sum(100.0 * (m.mean() - b.mean()) for m, b in pairs.values()) / 2
    assert difference.diff == pytest.approx(expected)
    assert difference.low == pytest.approx(_percentile(averaged, 2.5))
    assert difference.high == pytest.approx(_percentile(averaged, 97.5))
    assert difference.images == 23 + 31


def test_resampling_indices_are_fixed_per_column_and_shared_by_every_method():
    first = _indices("pacs/sketch", 30)
    assert first == _indices("pacs/sketch", 30)  # the same for every method compared on this column, run after run
    assert first != _indices("pacs/photo", 30)
    flat = np.array(first).ravel()
    assert flat.min() == 0 and flat.max() == 29  # with replacement, over every image
    # bootstrap_means uses these very resamples
    values = np.arange(30, dtype=float)
    np.testing.assert_allclose(stats.bootstrap_means(values, "pacs/sketch"), [values[i].mean() for i in first])


def test_an_interval_that_contains_zero_is_marked():
    assert stats.format_difference(stats.Difference(1.0, -2.0, 4.0, 100)) == "+1.0 [-2.0, +4.0] n.s."
    assert stats.format_difference(stats.Difference(5.0, 1.25, 8.9, 100)) == "+5.0 [+1.2, +8.9]"
    assert stats.format_difference(None) == "—"


# ------------------------------------------------------------------------------------------------ fake cells


DOMAINS = ("rotated_0", "rotated_75")
N_TEST, N_VAL = 60, 40


def write_cell(root, method, domain, seed, test_correct, val_correct, hparams=None):
    """A cell folder as train + evaluate write it: metrics.json (evaluate's schema, with the grid's ``hparams``),
    train.json and predictions.parquet (view, path, label, pred, top5, top5_prob)."""
    folder = root / f"{method}-{domain}-s{seed}" / selection.hparams_key(hparams).replace('"', "").replace(" ", "")
    folder.mkdir(parents=True)
    frames, views = [], {}
    for view, correct in (("test", test_correct), ("source_val", val_correct)):
        correct = np.asarray(correct, dtype=bool)
        label = np.arange(len(correct)) % 10
        pred = np.where(correct, label, (label + 1) % 10)
        paths = [f"{domain if view == 'test' else 'source'}/{i:04d}.png" for i in range(len(correct))]
        frames.append(pd.DataFrame({"view": view, "path": paths, "label": label, "pred": pred,
                                    "top5": [f"{p},0,1,2,3" for p in pred], "top5_prob": "0.9,0.05,0.03,0.01,0.01"}))
        views[view] = {"accuracy": 100.0 * correct.mean(), "correct": int(correct.sum()), "total": len(correct),
                       "classes": 10, "unreadable": 0, "skipped_images": []}
    pd.concat(frames, ignore_index=True).to_parquet(folder / "predictions.parquet", index=False)
    summary = {"dataset": "rotated_digits", "protocol": "domainbed", "test_domain": domain, "test_split": "holdout",
               "method": method, "variant": method, "seed": seed, "checkpoint": "model.pt", "formulation": "paper",
               "views": views, "hparams": hparams or {}}
    (folder / "metrics.json").write_text(json.dumps(summary))
    (folder / "train.json").write_text(json.dumps({"hparams": hparams or {}}))
    return folder


def _correct(n, right, offset=0):
    values = np.zeros(n, dtype=bool)
    values[offset : offset + right] = True
    return values


@pytest.fixture()
def grid(tmp_path):
    """zero-shot once per domain; ERM over two learning rates x 3 seeds, where the lower source-val one has the higher
    test accuracy; AlignCLIP (one setting) far above ERM on rotated_0 and level with it on rotated_75."""
    root = tmp_path / "runs"
    for domain in DOMAINS:
        write_cell(root, "zeroshot", domain, 0, _correct(N_TEST, 30), _correct(N_VAL, 20))
        for seed in range(3):
            write_cell(root, "erm", domain, seed, _correct(N_TEST, 36 + seed), _correct(N_VAL, 30), {"lr": 0.001})
            write_cell(root, "erm", domain, seed, _correct(N_TEST, 55), _correct(N_VAL, 25), {"lr": 0.01})  # better test, worse val
            # rotated_75: one image more right on average, but right and wrong on different images than ERM
            right, offset = (52, 0) if domain == "rotated_0" else (37, 10)
            write_cell(root, "alignclip", domain, seed, _correct(N_TEST, right + seed, offset), _correct(N_VAL, 32))
    return root


# ------------------------------------------------------------------------------------------------ selection


def test_the_setting_with_higher_test_but_lower_validation_accuracy_is_not_chosen(grid):
    reported, searched = selection.select(collect(grid))
    erm = searched[searched["variant"] == "erm"]
    assert set(erm[erm["chosen"]]["hparams"]) == {selection.hparams_key({"lr": 0.001})}
    assert len(erm) == 4 and erm["val_mean"].tolist() == pytest.approx([75.0, 62.5] * 2)
    erm_test = reported[(reported["variant"] == "erm") & (reported["view"] == "test")]
    assert sorted(erm_test["accuracy"].unique()) == pytest.approx([100 * 36 / 60, 100 * 37 / 60, 100 * 38 / 60])


def test_selection_sees_source_validation_numbers_only(grid, monkeypatch):
    seen = []
    original = selection.choose_settings
    monkeypatch.setattr(selection, "choose_settings", lambda frame: seen.append(frame.copy()) or original(frame))
    results = collect(grid)
    reference = selection.select(results)[1]
    assert list(seen[0].columns) == selection.VALIDATION_COLUMNS  # no view, no source path to read predictions from
    validation = results[results["view"] == "source_val"]["accuracy"]
    assert sorted(seen[0]["accuracy"]) == sorted(validation)
    # poisoning every test accuracy leaves the choice as it was
    poisoned = results.copy()
    poisoned.loc[poisoned["view"] == "test", "accuracy"] = np.random.default_rng(0).uniform(0, 100, (poisoned["view"] == "test").sum())
    pd.testing.assert_frame_equal(selection.select(poisoned)[1], reference)
    with pytest.raises(ValueError, match="source-validation scores only"):
        original(results[results["view"] == "test"][selection.VALIDATION_COLUMNS + ["view"]])


def test_a_protocol_without_source_validation_keeps_every_setting_labelled():
    rows = [{"dataset": "pets", "protocol": "base2new", "variant": "erm", "test_domain": "", "seed": 0, "view": view,
             "hparams": selection.hparams_key({"lr": lr}), "accuracy": acc, "source": f"{lr}"}
            for lr, acc in ((0.1, 50.0), (0.01, 60.0)) for view in ("base", "new")]
    reported, _ = selection.select(pd.DataFrame(rows))
    assert sorted(reported["variant"].unique()) == ["erm {lr=0.01}", "erm {lr=0.1}"]


# ------------------------------------------------------------------------------------------------ the report


def test_report_shows_the_papers_shape_intervals_and_the_selection(grid, tmp_path):
    build_report(grid, tmp_path / "report")
    out = tmp_path / "report"
    markdown = (out / "domain_shift_rotated_digits.md").read_text()
    assert "| method | rotated_0 | rotated_75 | Avg | seeds |" in markdown
    assert "| zeroshot | 50.0 | 50.0 | 50.0 | 1 run |" in markdown  # deterministic: one run per held-out domain
    erm = [100 * (36 + s) / 60 for s in range(3)]
    assert f"| erm | {np.mean(erm):.1f} ± {np.std(erm, ddof=1):.1f} |" in markdown  # the chosen lr, not the test-best
    scores = json.loads((out / "scores.json").read_text())["domain_shift_rotated_digits"]
    # AlignCLIP vs ERM on rotated_0: (52+53+54)/3 - (36+37+38)/3 = 16 of 60 images, never worse: significant
    far = scores["alignclip"]["rotated_0"]
    assert far["vs_erm"] == pytest.approx(100 * 16 / 60, abs=1e-3) and far["vs_erm_low"] > 0
    # rotated_75: (37+38+39)/3 - (36+37+38)/3 = 1 image: the interval contains 0, shown as n.s.
    near = scores["alignclip"]["rotated_75"]
    assert near["vs_erm"] == pytest.approx(100 / 60, abs=1e-3) and near["vs_erm_low"] <= 0 <= near["vs_erm_high"]
    assert scores["alignclip"]["Avg"]["vs_erm"] == pytest.approx((100 * 16 / 60 + 100 / 60) / 2, abs=1e-3)
    assert scores["erm"]["rotated_0"]["vs_zeroshot"] == pytest.approx(100 * (37 - 30) / 60, abs=1e-3)
    assert scores["alignclip"]["Avg"]["acc_std"] == pytest.approx(np.std([100 * (44.5 + s) / 60 for s in range(3)], ddof=1), abs=0.01)
    assert "n.s." in markdown and "Difference to ERM" in markdown and "Difference to zero-shot" in markdown
    for page in ((out / "index.md").read_text(), (out / "index.html").read_text()):
        assert "Model selection" in page and "lr=0.01" in page and "lr=0.001" in page and "chosen" in page
        assert "n.s." in page and "Difference to ERM" in page
    long = pd.read_csv(out / "results_long.csv")
    assert long["reported"].sum() == 2 * 2 * (1 + 3 + 3)  # two views of each reported cell; ERM's lr=0.01 cells not
    assert json.loads((out / "report.json").read_text())["selection"][2]["hparams"] == {"lr": 0.001}


def test_the_reports_scores_become_parent_run_metrics_and_selection_tags(grid, tmp_path):
    from alignclip.tracking import runs

    build_report(grid, tmp_path / "report")
    metrics = runs.report_metrics(tmp_path / "report")
    scores = json.loads((tmp_path / "report" / "scores.json").read_text())["domain_shift_rotated_digits"]
    assert metrics["report/domain_shift_rotated_digits/alignclip/Avg/vs_erm_low"] == scores["alignclip"]["Avg"]["vs_erm_low"]
    assert metrics["report/domain_shift_rotated_digits/erm/rotated_0/acc_std"] == scores["erm"]["rotated_0"]["acc_std"]
    tags = runs.selection_tags(tmp_path / "report")
    assert tags == {"selected/erm/rotated_0": '{"lr": 0.001}', "selected/erm/rotated_75": '{"lr": 0.001}'}


def test_dvc_reads_the_reports_scores_from_the_file_the_report_stage_writes():
    from pathlib import Path

    import yaml

    stage = yaml.safe_load((Path(__file__).resolve().parent.parent / "dvc.yaml").read_text())["stages"]["report"]
    metrics = [next(iter(m)) for m in stage["metrics"]]
    assert metrics == ["outputs/report_scores.json"] and f"--metrics-file {metrics[0]}" in stage["cmd"]
    assert not any(metrics[0].startswith(out.rstrip("/") + "/") for out in stage["outs"])  # DVC refuses overlaps


def test_the_parent_run_gets_the_intervals_and_the_chosen_setting(grid, tmp_path, monkeypatch):
    """`alignclip report` inside a pipeline ends its MLflow parent run (a real sqlite store) with the report's numbers."""
    from mlflow import MlflowClient

    from alignclip.report import reported_results
    from alignclip.tracking import runs

    monkeypatch.chdir(tmp_path)  # the sqlite store keeps artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    parent = runs.open_pipeline_run("exp", "pipeline", {})
    build_report(grid, tmp_path / "report")
    runs.finish_pipeline_run(parent, reported_results(grid), tmp_path / "report")
    run = MlflowClient(tracking_uri=uri).get_run(parent)
    scores = json.loads((tmp_path / "report" / "scores.json").read_text())["domain_shift_rotated_digits"]
    assert run.data.metrics["report/domain_shift_rotated_digits/alignclip/rotated_75/vs_erm_high"] == pytest.approx(
        scores["alignclip"]["rotated_75"]["vs_erm_high"])
    # the summary metrics are those of the chosen setting: ERM's lr=0.001 cells, not the test-best lr=0.01
    assert run.data.metrics["test_acc_pct/erm/rotated_0/mean"] == pytest.approx(100 * 37 / 60)
    assert run.data.tags["selected/erm/rotated_0"] == '{"lr": 0.001}'


def test_report_command_writes_the_metrics_file_dvc_reads(grid, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from alignclip.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # tracking off: the report alone
    done = CliRunner().invoke(app, ["report", str(grid), str(tmp_path / "report"), "--metrics-file", str(tmp_path / "scores.json")])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "scores.json").read_text()) == json.loads((tmp_path / "report" / "scores.json").read_text())


def test_base_to_new_gets_base_new_and_h_columns_and_intervals_per_view(tmp_path):
    """Another protocol's shape: columns base, new, H (table 3); intervals for base and new (H is not a mean over
    images, so it has none)."""
    for method, right in (("erm", 30), ("alignclip", 45)):
        folder = tmp_path / "runs" / method
        folder.mkdir(parents=True)
        frames, views = [], {}
        for view in ("base", "new"):
            correct = _correct(N_TEST, right)
            label = np.arange(N_TEST) % 5
            frames.append(pd.DataFrame({"view": view, "path": [f"{view}/{i}.jpg" for i in range(N_TEST)], "label": label,
                                        "pred": np.where(correct, label, (label + 1) % 5), "top5": "0", "top5_prob": "1"}))
            views[view] = {"accuracy": 100.0 * correct.mean(), "correct": int(correct.sum()), "total": N_TEST}
        pd.concat(frames).to_parquet(folder / "predictions.parquet", index=False)
        (folder / "metrics.json").write_text(json.dumps({"dataset": "oxford_pets", "protocol": "base2new", "method": method,
                                                         "variant": method, "formulation": "paper", "test_domain": None,
                                                         "test_split": None, "seed": 1, "views": views}))
    build_report(tmp_path / "runs", tmp_path / "report")
    markdown = (tmp_path / "report" / "base2new_oxford_pets.md").read_text()
    assert "| method | base | new | H | seeds |" in markdown
    assert "| method | base | new |\n" in markdown  # the differences to ERM: no H column
    scores = json.loads((tmp_path / "report" / "scores.json").read_text())["base2new_oxford_pets"]
    assert scores["alignclip"]["new"]["vs_erm"] == pytest.approx(100 * 15 / 60, abs=1e-3)
    assert "vs_erm" not in scores["alignclip"]["H"] and scores["alignclip"]["H"]["paper"] > 0  # the paper's table 5
