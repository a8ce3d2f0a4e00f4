"""`alignclip train --dry-run` goes through the real run's checks and resolution (train.resolve) and stops: it
refuses what the real run refuses, with the same exit code and error line, and prints the settings the real run
records in train.json."""

import json
import os
import subprocess
import sys

import pytest

from alignclip.cli import DRY_RUN_HIDDEN


def _train(prepared, out, *args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": f"file:{cwd}/mlruns"}
    env.pop("ALIGNCLIP_CHECKPOINT_ROOT", None)
    env.pop("ALIGNCLIP_CHECKPOINT_DIR", None)
    return subprocess.run([sys.executable, "-m", "alignclip", "train", str(prepared), str(out), *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def _error_line(done):
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


BAD = {
    "method": (["--method", "alignclp", "--test-domain", "rotated_30"], "unknown method 'alignclp'"),
    "domain": (["--test-domain", "rotated_31"], "rotated_31"),
    "no-domain": ([], "test domain None: expected one of"),
    "device": (["--device", "tpu", "--test-domain", "rotated_30"], "tpu"),
    "model": (["--model", "vit-b-99", "--test-domain", "rotated_30"], "unknown model 'vit-b-99'"),
    "checkpoint": (["--checkpoint-every", "-2", "--test-domain", "rotated_30"], "--checkpoint-every -2"),
    "steps+epochs": (["--steps", "10", "--epochs", "2", "--test-domain", "rotated_30"], "--steps 10 and --epochs 2: give one"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_dry_run_refuses_what_the_real_run_refuses(digits_prepared, tmp_path, case):
    args, message = BAD[case]
    steps = [] if "--steps" in args else ["--steps", "1", "--batch-size", "2"]
    dry = _train(digits_prepared, tmp_path / "dry", *args, *steps, "--dry-run", "--no-progress", cwd=tmp_path)
    real = _train(digits_prepared, tmp_path / "real", *args, *steps, "--no-progress", cwd=tmp_path)
    assert (dry.returncode, real.returncode) == (2, 2), (dry.stdout, dry.stderr, real.stderr)
    assert message in _error_line(dry)
    assert _error_line(dry) == _error_line(real)
    assert dry.stdout == "" and not (tmp_path / "dry").exists()


def test_dry_run_prints_the_settings_the_real_run_records(digits_prepared, tmp_path):
    """`+release` wins over --formulation (the real run's rule): dry-run shows release, as train.json records."""
    args = ["--method", "alignclip+release", "--formulation", "paper", "--test-domain", "rotated_30",
            "--steps", "1", "--batch-size", "2", "--no-progress", "--num-workers", "0"]
    dry = _train(digits_prepared, tmp_path / "dry", *args, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    shown = json.loads(dry.stdout)
    assert shown["method"] == "alignclip" and shown["formulation"] == "release"
    real = _train(digits_prepared, tmp_path / "real", *args, cwd=tmp_path)
    assert real.returncode == 0, real.stderr
    recorded = json.loads((tmp_path / "real" / "train.json").read_text())
    # only how the run is executed or shown is left out of the dry run, nothing it trains with
    assert shown == {k: v for k, v in recorded["settings"].items() if k not in DRY_RUN_HIDDEN}
    assert recorded["method"]["classifier"] == "margin" and recorded["method"]["aligned_layers"] == 5
