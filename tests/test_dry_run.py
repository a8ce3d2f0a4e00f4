"""`alignclip train --dry-run` goes through the real run's checks and resolution (train.resolve) and stops: it
refuses what the real run refuses, with the same exit code and error line, and prints the settings the real run
records in train.json."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from alignclip import cli
from alignclip.cli import DRY_RUN_HIDDEN


def _train(prepared, out, *args, cwd, monkeypatch, capsys):
    """`alignclip train ...` through the CLI's own entry point (cli.main: the error line, the exit code), in this
    process: the process boundary is not what these tests prove, and each subprocess cost an interpreter and a
    torch import. One of them runs as a subprocess too (test_the_subprocess_exits_2_...)."""
    with monkeypatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"file:{cwd}/mlruns")
        patch.delenv("ALIGNCLIP_CHECKPOINT_ROOT", raising=False)
        patch.delenv("ALIGNCLIP_CHECKPOINT_DIR", raising=False)
        patch.chdir(cwd)
        patch.setattr(sys, "argv", ["alignclip", "train", str(prepared), str(out), *args])
        capsys.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


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
def test_dry_run_refuses_what_the_real_run_refuses(digits_prepared, tmp_path, case, monkeypatch, capsys):
    args, message = BAD[case]
    steps = [] if "--steps" in args else ["--steps", "1", "--batch-size", "2"]
    run = dict(cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    dry = _train(digits_prepared, tmp_path / "dry", *args, *steps, "--dry-run", "--no-progress", **run)
    real = _train(digits_prepared, tmp_path / "real", *args, *steps, "--no-progress", **run)
    assert (dry.returncode, real.returncode) == (2, 2), (dry.stdout, dry.stderr, real.stderr)
    assert message in _error_line(dry)
    assert _error_line(dry) == _error_line(real)
    assert dry.stdout == "" and not (tmp_path / "dry").exists()


def test_dry_run_prints_the_settings_the_real_run_records(digits_prepared, tmp_path, monkeypatch, capsys):
    """`+release` wins over --formulation (the real run's rule): dry-run shows release, as train.json records."""
    args = ["--method", "alignclip+release", "--formulation", "paper", "--test-domain", "rotated_30",
            "--steps", "1", "--batch-size", "2", "--no-progress", "--num-workers", "0"]
    run = dict(cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    dry = _train(digits_prepared, tmp_path / "dry", *args, "--dry-run", **run)
    assert dry.returncode == 0, dry.stderr
    shown = json.loads(dry.stdout)
    assert shown["method"] == "alignclip" and shown["formulation"] == "release"
    real = _train(digits_prepared, tmp_path / "real", *args, **run)
    assert real.returncode == 0, real.stderr
    recorded = json.loads((tmp_path / "real" / "train.json").read_text())
    # only how the run is executed or shown is left out of the dry run, nothing it trains with
    assert shown == {k: v for k, v in recorded["settings"].items() if k not in DRY_RUN_HIDDEN}
    assert recorded["method"]["classifier"] == "margin" and recorded["method"]["aligned_layers"] == 5


def test_the_subprocess_exits_2_with_the_same_line_as_in_process(digits_prepared, tmp_path, monkeypatch, capsys):
    """The process boundary once: `python -m alignclip train --dry-run` with a refused value exits 2 with the one
    line that cli.main gives in-process."""
    args = ["--method", "alignclp", "--test-domain", "rotated_30", "--dry-run", "--no-progress"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"file:{tmp_path}/mlruns"}
    done = subprocess.run([sys.executable, "-m", "alignclip", "train", str(digits_prepared), str(tmp_path / "p"), *args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    here = _train(digits_prepared, tmp_path / "q", *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert (done.returncode, here.returncode) == (2, 2) and done.stdout == ""
    assert _error_line(done) == _error_line(here).replace(str(tmp_path / "q"), str(tmp_path / "p"))
