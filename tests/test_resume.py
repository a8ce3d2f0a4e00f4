"""Training survives kill -9 and SIGTERM: the same command resumes, and the result is byte-identical (CPU)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from alignclip.artifacts import load_torch
from alignclip.publish import live_staging
from alignclip.resume import CheckpointStore, ResumeOptions, default_location
from alignclip.train import TrainSettings, train

STEPS = 30


def _command(prepared, out, *extra):
    return [sys.executable, "-m", "alignclip", "train", str(prepared), str(out), "--method", "alignclip",
            "--test-domain", "rotated_0", "--seed", "3", "--steps", str(STEPS), "--batch-size", "4", "--lr", "1e-3",
            "--no-progress", "--checkpoint-every", "5", *extra]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _logged(out) -> int:
    try:
        return max(0, len((live_staging(out, "train")[0] / "train_log.csv").read_text().splitlines()) - 1)
    except (OSError, IndexError):
        return 0


def _run_until(cmd, out, rows, timeout=600):
    """Start training and return the process once its log has ``rows`` steps."""
    process = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while _logged(out) < rows:
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("training did not reach the step in time")
        time.sleep(0.05)
    return process


@pytest.mark.slow
def test_kill_9_then_resume_gives_a_byte_identical_model(digits_prepared, tmp_path):
    reference = tmp_path / "uninterrupted"
    done = subprocess.run(_command(digits_prepared, reference), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "killed"
    process = _run_until(_command(digits_prepared, out), out, rows=12)
    process.send_signal(signal.SIGKILL)
    process.wait()
    store = CheckpointStore(default_location(out))
    checkpointed = store.info()["step"]
    assert 10 <= checkpointed < STEPS and not (out / "model.pt").exists()

    resumed = subprocess.run(_command(digits_prepared, out), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the state file is written before the info file that names its step: a kill between the two leaves a state one
    # interval ahead of the info, and resume trusts the state (CheckpointStore.save)
    resumed_from = re.search(rf"resuming from step (\d+) of {STEPS}", resumed.stdout + resumed.stderr)
    assert resumed_from and int(resumed_from.group(1)) in (checkpointed, checkpointed + 5), resumed.stderr[-3000:]
    assert (out / "model.pt").read_bytes() == (reference / "model.pt").read_bytes()
    log, expected = pd.read_csv(out / "train_log.csv"), pd.read_csv(reference / "train_log.csv")
    assert log["step"].tolist() == list(range(1, STEPS + 1))
    assert log["loss"].tolist() == expected["loss"].tolist()
    # train.json names the step it resumed from (the state's, when the kill fell between the two writes)
    assert json.loads((out / "train.json").read_text())["resumed_from"] == int(resumed_from.group(1))
    # published without the resume files, and nothing left beside the outputs
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "train.json", "train_log.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed", "uninterrupted"]


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_at_the_step_it_stopped(digits_prepared, tmp_path):
    out = tmp_path / "run"
    process = _run_until(_command(digits_prepared, out, "--checkpoint-every", "0", "--checkpoint-minutes", "0"), out, rows=7)
    at_signal = _logged(out)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    assert "stopped: stopped at step" in stderr and "Traceback" not in stdout + stderr
    info = CheckpointStore(default_location(out)).info()
    assert at_signal <= info["step"] < STEPS  # no checkpoint but the one SIGTERM asked for
    assert not out.exists() and not live_staging(out, "train")  # the staging folder goes; the resume folder stays


def test_clearing_the_store_removes_a_write_cut_short_by_a_kill(tmp_path):
    """kill -9 during atomic_write leaves `.resume.pt.XXXX.tmp`; the published folder must not carry it."""
    store = CheckpointStore(tmp_path)
    store.save({"step": 1}, {"step": 1})
    (tmp_path / ".resume.pt.i0_r7zia.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "model.pt").write_bytes(b"an output")
    store.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_resume_checkpoint_of_other_settings_is_not_continued(digits_prepared, tmp_path, caplog):
    options = ResumeOptions(every_steps=2, every_seconds=0)
    out = tmp_path / "run"
    settings = TrainSettings(method="erm", test_domain="rotated_0", steps=4, batch_size=4, progress=False)
    store = CheckpointStore(default_location(out))
    torch.manual_seed(0)
    store.save({"step": 2, "fingerprint": "{}", "visual": {}}, {"step": 2})
    summary = train(digits_prepared, out, settings, resume=options)
    assert "belongs to a run with other settings" in caplog.text
    assert summary["resumed_from"] is None and len(pd.read_csv(out / "train_log.csv")) == 4
    assert not live_staging(out, "train") and not default_location(out).exists()


def test_a_malicious_resume_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"format": "alignclip-resume/1", "step": RunsCode()}, folder / "resume.pt")
    with pytest.raises(ValueError, match="refused to load"):
        CheckpointStore(folder).load()
    assert not marker.exists()


def test_a_checkpoint_root_keys_the_location_by_output_path_and_cell(tmp_path):
    from alignclip.resume import keyed_location

    first = keyed_location("s3://bucket/ckpt/", tmp_path / "run-a" / "model", "train-erm-Art-s0")
    assert first.startswith("s3://bucket/ckpt/") and first.endswith("-train-erm-Art-s0")
    assert keyed_location("s3://bucket/ckpt", tmp_path / "run-a" / "model", "train-erm-Art-s0") == first  # a retry
    assert keyed_location("s3://bucket/ckpt", tmp_path / "run-b" / "model", "train-erm-Art-s0") != first  # another run


def test_a_checkpoint_store_under_an_s3_prefix_round_trips(monkeypatch):
    from tests.servers import S3_ENV, make_bucket, s3_server

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    with s3_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        make_bucket(endpoint, "ckpt")
        store = CheckpointStore("s3://ckpt/run-1/train-erm-s0")
        assert store.info() is None and store.load() is None
        weights = torch.arange(6.0).reshape(2, 3)
        store.save({"step": 7, "visual": {"w": weights}}, {"step": 7, "mlflow_run_id": "abc"})
        assert store.info()["mlflow_run_id"] == "abc"
        state = store.load()
        assert state["step"] == 7 and torch.equal(state["visual"]["w"], weights)
        store.clear()
        assert store.info() is None and store.load() is None


def test_a_preempted_run_resumes_into_the_same_mlflow_run(digits_prepared, tmp_path):
    """SIGTERM mid-run (sent by the run to itself after step 6): the MLflow run ends KILLED; the re-run continues
    that run (the CLI's sequence: pending_run_id, then start_run(resume_run_id=...)) and ends it FINISHED."""
    from mlflow.tracking import MlflowClient

    from alignclip import tracking
    from alignclip.resume import Preempted, pending_run_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    options = ResumeOptions(every_steps=0, every_seconds=0)
    settings = TrainSettings(method="erm", test_domain="rotated_0", steps=12, batch_size=4, progress=False, num_workers=0)

    def preempt(step, visual, parts):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted):
        with tracking.start_run("resume", "train", uri=uri, resume_run_id=pending_run_id(out, options)) as tracker:
            train(digits_prepared, out, settings, tracker, callbacks=[preempt], resume=options)
    first = tracker.run_id
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(first).info.status == "KILLED"
    assert pending_run_id(out, options) == first and CheckpointStore(default_location(out)).info()["step"] == 6
    with tracking.start_run("resume", "train", uri=uri, resume_run_id=pending_run_id(out, options)) as tracker:
        summary = train(digits_prepared, out, settings, tracker, resume=options)
    assert tracker.run_id == first and summary["resumed_from"] == 6
    assert client.get_run(first).info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(first, "loss")}) == list(range(1, 13))
    assert len(client.search_runs([client.get_experiment_by_name("resume").experiment_id])) == 1
