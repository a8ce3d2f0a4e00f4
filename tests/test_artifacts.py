"""Stage artefacts: one set of file names (dvc.yaml and the KFP components use the same), the checkpoint schema,
and evaluation that takes the held-out domain, method and label space from the checkpoint."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from alignclip import artifacts
from alignclip.evaluate import evaluate
from alignclip.train import TrainSettings, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def zeroshot_checkpoint(digits_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("zs")
    train(digits_prepared, out, TrainSettings(method="zeroshot", test_domain="rotated_45", progress=False))
    return out / artifacts.MODEL


def test_dvc_pipeline_names_the_files_the_stages_write():
    """The grid stages publish the folder their command writes (each cell's model.pt, train.json, metrics.json,
    predictions inside it), and training reads the similarity stage's matrix by its artefact name."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("train", "zeroshot"):
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stages[name]["outs"]]
        assert len(outs) == 1 and f"'{outs[0]}'" in stages[name]["cmd"], (name, outs)
    assert [Path(next(iter(m))).suffix for m in stages["train"]["metrics"]] == [".json"]
    assert f"/{artifacts.SIMILARITY_MATRIX}" in stages["train"]["cmd"]
    assert stages["similarity"]["outs"] == ["outputs/similarity"]


def test_checkpoint_holds_the_schema_and_loads_without_pickled_code(zeroshot_checkpoint, digits_prepared):
    meta = json.loads((digits_prepared / artifacts.META).read_text())
    raw = torch.load(zeroshot_checkpoint, weights_only=True)  # plain values only
    assert raw["schema"] == artifacts.CHECKPOINT_SCHEMA
    state = artifacts.load_checkpoint(zeroshot_checkpoint)
    assert (state.dataset, state.protocol, state.test_domain) == ("rotated_digits", "domainbed", "rotated_45")
    assert state.label_space == list(range(10)) and state.classes == meta["classes"]
    assert state.method["name"] == "zeroshot" and state.visual is None
    assert not zeroshot_checkpoint.with_name(artifacts.MODEL + ".partial").exists()


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"visual": None, "method": {}}, path)
    with pytest.raises(ValueError, match=r"model\.pt: not an alignclip checkpoint.*'architecture'"):
        artifacts.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        artifacts.load_checkpoint(tmp_path / "nothing.pt")


def test_evaluate_takes_the_held_out_domain_from_the_checkpoint(zeroshot_checkpoint, digits_prepared, tmp_path):
    summary = evaluate(digits_prepared, zeroshot_checkpoint, tmp_path / "ev")
    assert summary["test_domain"] == "rotated_45"
    # the test view is the held-out domain's 20% split: rotated_45's "val" rows, nothing else
    import pandas as pd

    manifest = pd.read_parquet(digits_prepared / artifacts.MANIFEST)
    expected = int(((manifest["domain"] == "rotated_45") & (manifest["split"] == "val")).sum())
    assert summary["views"]["test"]["total"] == expected
    predictions = pd.read_parquet(tmp_path / "ev" / artifacts.PREDICTIONS)
    assert set(predictions[predictions["view"] == "test"]["path"].str.split("/").str[0]) == {"rotated_45"}


def test_evaluate_refuses_a_contradicting_flag_and_a_foreign_dataset(zeroshot_checkpoint, digits_prepared, tmp_path):
    with pytest.raises(ValueError, match="'rotated_0' contradicts .*'rotated_45'"):
        evaluate(digits_prepared, zeroshot_checkpoint, tmp_path / "ev", test_domain="rotated_0")
    assert not (tmp_path / "ev").exists()  # refused before anything is written
    other = tmp_path / "other"
    other.mkdir()
    meta = json.loads((digits_prepared / artifacts.META).read_text())
    meta["classes"] = list(reversed(meta["classes"]))
    (other / artifacts.META).write_text(json.dumps(meta))
    (other / artifacts.MANIFEST).write_bytes((digits_prepared / artifacts.MANIFEST).read_bytes())
    with pytest.raises(ValueError, match="classes differ"):
        evaluate(other, zeroshot_checkpoint, tmp_path / "ev2")


def test_cli_contradicting_test_domain_is_one_line_and_exit_2(zeroshot_checkpoint, digits_prepared, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "alignclip", "evaluate", str(digits_prepared), str(zeroshot_checkpoint),
                           str(tmp_path / "ev"), "--test-domain", "rotated_0"], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "error: test domain 'rotated_0' contradicts" in done.stderr and "'rotated_45'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "ev").exists()
