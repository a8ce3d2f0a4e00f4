"""Tracking never costs a result: an unreachable or dying MLflow server does not stop a stage, what it missed is
kept on disk and replayed, runs end with the stage's status, and a fresh sqlite store survives concurrent first use.
Servers are started by the tests on 127.0.0.1."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignclip import tracking
from alignclip.tracking import transport
from alignclip.resume import Preempted
from tests.servers import free_port, mlflow_local_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def spool(tmp_path, monkeypatch):
    folder = tmp_path / "spool"
    monkeypatch.setenv("ALIGNCLIP_TRACKING_SPOOL", str(folder))
    return folder


def _log_a_run(uri, artifact, steps=30, fail=None):
    with tracking.start_run("resilience", "offline-run", uri=uri, tags={"stage": "train"}) as tracker:
        tracker.log_params({"train": {"lr": 0.001, "steps": steps}})
        for step in range(1, steps + 1):
            tracker.log_metrics({"loss": 1.0 / step, "acc": float(step)}, step=step)
        tracker.log_artifact(artifact)
        if fail:
            raise fail
    return tracker


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_an_unreachable_tracking_uri_costs_seconds_and_spools_everything(tmp_path, spool):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    artifact = tmp_path / "train.json"
    artifact.write_text("{}")
    started = time.monotonic()
    _log_a_run(uri, artifact)
    assert time.monotonic() - started < 5.0
    [path] = list(spool.glob("*.jsonl"))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0]["op"] == "run" and records[0]["uri"] == uri and records[0]["run_id"] is None
    ops = [r["op"] for r in records[1:]]
    assert ops[0] == "params" and ops[-2:] == ["artifact", "end"] and records[-1]["status"] == "FINISHED"
    steps = sorted({m[3] for r in records if r["op"] == "metrics" for m in r["metrics"] if m[0] == "loss"})
    assert steps == list(range(1, 31))


@pytest.mark.parametrize(
    "error, status", [(ValueError("bad"), "FAILED"), (KeyboardInterrupt(), "KILLED"), (Preempted("SIGTERM"), "KILLED")]
)
def test_a_stage_that_stops_ends_its_run_failed_or_killed(tmp_path, error, status):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    with pytest.raises(type(error)):
        _log_a_run(uri, artifact, steps=3, fail=error)
    [run] = _client(uri).search_runs([_client(uri).get_experiment_by_name("resilience").experiment_id])
    assert run.info.status == status
    assert [m.step for m in _client(uri).get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]


def test_concurrent_first_use_of_a_fresh_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = (
        "import sys; from alignclip import tracking\n"
        "with tracking.start_run('concurrent', 'run-' + sys.argv[1], uri=sys.argv[2]) as t:\n"
        "    t.log_metrics({'x': 1.0}, step=1)\n"
    )
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    processes = [subprocess.Popen([sys.executable, "-c", code, str(i), uri], env=env, stderr=subprocess.PIPE, text=True)
                 for i in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], errors
    client = _client(uri)
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run-0", "run-1", "run-2"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_tracked_run_in_a_checkout_leaves_no_untracked_file(tmp_path, monkeypatch):
    """`make demo` tracks into the repository's mlflow.db: the store, its artifacts and its lock must leave `git
    status` clean (the project's own .gitignore, a run made by the stages' tracking code from the checkout)."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", ".gitignore"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], check=True)
    monkeypatch.chdir(repo)
    artifact = tmp_path / "train.json"
    artifact.write_text("{}")
    _log_a_run(f"sqlite:///{repo / 'mlflow.db'}", artifact, steps=2)
    assert (repo / "mlflow.db").is_file()
    status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=all"],
                            capture_output=True, text=True, check=True).stdout
    assert status == ""


def test_the_store_lock_excludes_another_process(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    code = ("import sys; from alignclip.tracking.transport import store_lock\n"
            "with store_lock(sys.argv[1]):\n    print('taken')\n")
    with transport.store_lock(uri):
        waiting = subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.communicate(timeout=3)
    assert waiting.communicate(timeout=60)[0] == "taken\n"
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == []  # nothing left beside the store


@pytest.mark.slow
def test_records_spooled_while_the_server_was_down_are_replayed_by_sync(tmp_path, spool):
    from alignclip.cli import app
    from typer.testing import CliRunner

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    artifact = tmp_path / "train.json"
    artifact.write_text('{"steps": 30}')
    _log_a_run(uri, artifact)
    assert len(list(spool.glob("*.jsonl"))) == 1
    with mlflow_local_server(tmp_path / "server", port):
        result = CliRunner().invoke(app, ["tracking", "sync", "--uri", uri])
        assert result.exit_code == 0, result.output
        assert "replayed 1 of 1" in result.output
        client = _client(uri)
        [run] = client.search_runs([client.get_experiment_by_name("resilience").experiment_id])
        assert run.info.run_name == "offline-run" and run.info.status == "FINISHED"
        assert run.data.params["train.lr"] == "0.001" and run.data.tags["stage"] == "train"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 31))
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["train.json"]
    assert list(spool.glob("*.jsonl")) == []


@pytest.mark.slow
def test_a_server_killed_mid_training_does_not_stop_it_and_the_missed_metrics_are_replayed(tmp_path, spool, digits_prepared):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    steps = 120
    out = tmp_path / "run"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, ALIGNCLIP_TRACKING_SPOOL=str(spool), ALIGNCLIP_TRACKING_RETRY_S="2",
               HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
    cmd = [sys.executable, "-m", "alignclip", "train", str(digits_prepared), str(out), "--method", "erm",
           "--test-domain", "rotated_0", "--steps", str(steps), "--batch-size", "4", "--lr", "1e-3", "--no-progress",
           "--no-hflip"]
    with mlflow_local_server(tmp_path / "server", port) as (_, server):
        trainer = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while _logged_steps(_partial_log(tmp_path)) < 40 and trainer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        # paused while the server goes away, so that a fast machine cannot finish the run first
        trainer.send_signal(signal.SIGSTOP)
        try:
            assert trainer.poll() is None, "training finished before the server went away"
            from tests.servers import stop_group

            stop_group(server)  # the server goes away mid-run
            stopped_at = _logged_steps(_partial_log(tmp_path))
        finally:
            trainer.send_signal(signal.SIGCONT)
        _, stderr = trainer.communicate(timeout=600)
    assert trainer.returncode == 0, stderr[-3000:]
    assert stopped_at < steps
    assert (out / "model.pt").is_file() and len((out / "train_log.csv").read_text().splitlines()) == steps + 1
    assert "stopped answering" in stderr and "alignclip tracking sync" in stderr
    with mlflow_local_server(tmp_path / "server", port):
        done = transport.sync(uri)
        assert len(done) == 1
        client = _client(uri)
        [run] = client.search_runs([client.get_experiment_by_name("alignclip").experiment_id])
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, steps + 1))  # nothing lost, nothing twice


def _partial_log(tmp_path):
    from alignclip.publish import live_staging

    folders = live_staging(tmp_path / "run", "train")
    return (folders[0] if folders else tmp_path / "no-staging-yet") / "train_log.csv"


def _logged_steps(path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except OSError:
        return 0


@pytest.mark.slow
def test_evaluate_of_a_tracked_model_with_the_server_down_costs_seconds(tmp_path, spool, digits_prepared):
    """The server goes away between train and evaluate: evaluate must not wait on MLflow's own retries (minutes)
    to ask whether the training run can be continued; its records are spooled under that run."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", ALIGNCLIP_TRACKING_SPOOL=str(spool),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "run"
    trained = subprocess.run([sys.executable, "-m", "alignclip", "train", str(digits_prepared), str(out), "--method",
                              "zeroshot", "--test-domain", "rotated_0", "--no-progress"], env=env, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_id = json.loads((out / "train.json").read_text())["mlflow_run_id"]
    assert run_id
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there now
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "alignclip", "evaluate", str(digits_prepared), str(out / "model.pt"),
                           str(out), "--num-workers", "0"], env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unreachable" in done.stderr
    # the evaluation did its work: the printed accuracy is the share of right predictions it wrote
    import pandas as pd

    test = pd.read_parquet(out / "predictions.parquet").query("view == 'test'")
    assert json.loads(done.stdout.splitlines()[-1])["test_acc_pct"] == pytest.approx(100.0 * (test["pred"] == test["label"]).mean())
    assert elapsed < 60, f"evaluate took {elapsed:.0f}s with the tracking server down"
    [path] = list(spool.glob("*.jsonl"))
    header = json.loads(path.read_text().splitlines()[0])
    assert header["op"] == "run" and header["run_id"] == run_id  # replayed into the cell's training run
