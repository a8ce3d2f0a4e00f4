"""Every loader of the project refuses a pickle that runs code, and a file that is not a checkpoint is one clear line."""

import os
import subprocess
import sys

import pytest
import torch

from alignclip.classifier import load_trained
from alignclip.artifacts import load_torch
from alignclip.presets import load_clip
from alignclip.report import build_report
from alignclip.similarity import load_similarity


class _RunsCode:
    """Unpickling this calls os.system: the marker file exists afterwards if the loader ran it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(path, marker, **fields):
    torch.save({"visual": _RunsCode(marker), **fields}, path)
    return path


def test_the_payload_really_runs_code_when_unpickled_unsafely(tmp_path):
    """Guards the test itself: without weights_only the file does create the marker."""
    marker = tmp_path / "ran"
    path = _malicious(tmp_path / "model.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_torch_refuses_code(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match="refused to load"):
        load_torch(_malicious(tmp_path / "x.pt", marker))
    assert not marker.exists()


def test_model_checkpoint_loader_refuses_code(tmp_path):
    marker = tmp_path / "ran"
    path = _malicious(tmp_path / "model.pt", marker, architecture="alignclip-tiny", pretrained=None, method={})
    with pytest.raises(ValueError, match="refused to load"):
        load_trained(path, "cpu")
    assert not marker.exists()


def test_similarity_loader_refuses_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "similarity.pt"
    torch.save({"cosine": _RunsCode(marker), "architecture": "alignclip-tiny"}, path)
    with pytest.raises(ValueError, match="refused to load"):
        load_similarity(path, "alignclip-tiny", [0, 1])
    assert not marker.exists()


def test_pretrained_weights_loader_refuses_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "weights.pt"
    torch.save({"positional_embedding": _RunsCode(marker)}, path)
    with pytest.raises(ValueError, match="refused or unreadable"):
        load_clip("tiny", str(path))
    assert not marker.exists()


def test_report_refuses_a_malicious_model_under_the_results(tmp_path, digits_prepared):
    import json

    marker = tmp_path / "ran"
    run = tmp_path / "results" / "erm"
    run.mkdir(parents=True)
    _malicious(run / "model.pt", marker, architecture="alignclip-tiny", pretrained=None, method={"name": "erm"})
    metrics = {"dataset": "rotated_digits", "protocol": "domainbed", "test_domain": "rotated_0", "test_split": "holdout",
               "method": "erm", "variant": "erm", "seed": 0, "formulation": "paper",
               "views": {"test": {"accuracy": 50.0, "correct": 1, "total": 2, "classes": 10, "skipped_images": []}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match="refused to load"):
        build_report(tmp_path / "results", tmp_path / "report", prepared_dir=digits_prepared)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"], ids=["empty", "text", "zip"])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"model\.pt: not a valid model checkpoint"):
        load_trained(path, "cpu")


def test_a_state_dict_that_is_not_a_train_checkpoint_is_named(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not an alignclip checkpoint of schema 1 .missing"):
        load_trained(path, "cpu")


def test_cli_evaluate_with_a_malicious_checkpoint_exits_2_in_one_line(tmp_path, digits_prepared):
    marker = tmp_path / "ran"
    path = _malicious(tmp_path / "model.pt", marker, architecture="alignclip-tiny", pretrained=None, method={})
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "alignclip", "evaluate", str(digits_prepared), str(path), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    assert "refused to load" in done.stderr and "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1, done.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
