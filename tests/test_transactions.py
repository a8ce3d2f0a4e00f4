"""Stage outputs are transactions: a rerun replaces them whole, a failure leaves the previous ones and no empty folder."""

import json

import pytest

from alignclip.artifacts import CELL_FILES
from alignclip.publish import stage_output, staging_dir


def _write(folder, **files):
    for name, text in files.items():
        (folder / name).write_text(text)


def test_a_rerun_replaces_the_outputs_as_a_whole(tmp_path):
    out = tmp_path / "run"
    with stage_output(out, "train", allowed=CELL_FILES) as staging:
        _write(staging, **{"model.pt": "old model", "train.json": "{}", "metrics.json": "old metrics"})
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pt", "train.json"]
    with stage_output(out, "train", allowed=CELL_FILES) as staging:
        _write(staging, **{"model.pt": "new model", "train.json": "{}"})
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "train.json"]  # no stale metrics beside it
    assert (out / "model.pt").read_text() == "new model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failed_stage_leaves_the_previous_outputs_and_no_empty_folder(tmp_path):
    out = tmp_path / "run"
    with stage_output(out, "train", allowed=CELL_FILES) as staging:
        _write(staging, **{"model.pt": "good"})
    with pytest.raises(RuntimeError):
        with stage_output(out, "train", allowed=CELL_FILES) as staging:
            _write(staging, **{"model.pt": "half"})
            raise RuntimeError("killed")
    assert (out / "model.pt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    fresh = tmp_path / "a" / "b" / "new"
    with pytest.raises(RuntimeError):
        with stage_output(fresh, "train"):
            raise RuntimeError("bad input")
    assert not (tmp_path / "a").exists()  # the parents it created are gone too


def test_a_folder_holding_the_users_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        with stage_output(tmp_path, "train"):
            pass
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        with stage_output(tmp_path / "file", "train"):
            pass


def test_a_shared_folder_has_only_the_stages_own_files_replaced(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    _write(out, **{"model.pt": "model", "metrics.json": "old", "predictions.parquet": "old"})
    with stage_output(out, "evaluate", owns=("metrics.json", "predictions.parquet")) as staging:
        _write(staging, **{"metrics.json": "new"})
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pt"]
    assert (out / "metrics.json").read_text() == "new" and (out / "model.pt").read_text() == "model"
    assert not staging_dir(out, "evaluate").exists()


def test_retraining_into_an_evaluated_folder_leaves_no_stale_metrics(digits_prepared, tmp_path):
    from alignclip.evaluate import evaluate
    from alignclip.train import TrainSettings, train

    out = tmp_path / "run"
    train(digits_prepared, out, TrainSettings(method="zeroshot", test_domain="rotated_30", progress=False))
    evaluate(digits_prepared, out / "model.pt", out)
    assert (out / "metrics.json").is_file()
    train(digits_prepared, out, TrainSettings(method="zeroshot", test_domain="rotated_15", progress=False))
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "train.json", "train_log.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_report_rerun_leaves_no_stale_figure_and_a_foreign_folder_is_refused(tmp_path):
    from alignclip.report import build_report

    results = tmp_path / "results" / "erm"
    results.mkdir(parents=True)
    metrics = {"dataset": "rotated_digits", "protocol": "domainbed", "test_domain": "rotated_0", "test_split": "holdout",
               "method": "erm", "variant": "erm", "seed": 0, "formulation": "paper",
               "views": {"test": {"accuracy": 50.0, "correct": 1, "total": 2, "classes": 10, "skipped_images": []}}}
    (results / "metrics.json").write_text(json.dumps(metrics))
    report = tmp_path / "report"
    build_report(tmp_path / "results", report)
    (report / "old_figure.png").write_bytes(b"stale")
    page = build_report(tmp_path / "results", report)
    assert page == report / "index.html" and page.is_file()
    assert not (report / "old_figure.png").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError, match="holds no report.json"):
        build_report(tmp_path / "results", mine)


@pytest.mark.parametrize("stage", ["train", "similarity"])
def test_a_stage_refuses_the_prepared_folder_as_its_output_and_deletes_nothing(digits_prepared, tmp_path, stage):
    """`alignclip train PREP PREP` (or similarity) would replace the folder whole: the dataset's manifest is not its."""
    import shutil
    import subprocess
    import sys

    prepared = tmp_path / "prepared"
    shutil.copytree(digits_prepared, prepared)
    before = sorted(p.name for p in prepared.iterdir())
    extra = ["--method", "erm", "--test-domain", "rotated_0", "--steps", "1", "--batch-size", "2", "--no-progress"] if stage == "train" else []
    done = subprocess.run([sys.executable, "-m", "alignclip", stage, str(prepared), str(prepared), *extra],
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "manifest.parquet" in line and "not outputs of this stage" in line
    assert sorted(p.name for p in prepared.iterdir()) == before
