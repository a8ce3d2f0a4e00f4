"""Two writers of one output, files that are not what their writer wrote, and a full disk (docs/reliability.md)."""

import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch

from alignclip import artifacts
from alignclip.datafiles import DataFileError
from alignclip.publish import OutputLocked, live_staging, lock_path, save_torch, stage_output
from alignclip.paths import DiskFull


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


# ---------------------------------------------------------------------------------------------- one writer


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"pid {os.getpid()} host {os.uname().nodename} since now\\n".encode())
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_writer_stops_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "cell"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_path(out))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=rf"{out} is being written by pid {holder.pid} host "):
            with stage_output(out, "train"):
                pytest.fail("entered a locked output")
        assert not live_staging(out, "train") and not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    out = tmp_path / "cell"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(out).write_text(f"pid {dead.stdout.strip()} host {socket.gethostname()} since then\n")
    with stage_output(out, "train") as staging:
        (staging / "model.pt").write_bytes(b"new")
        assert lock_path(out).read_text().startswith(f"pid {os.getpid()} host ")
    assert (out / "model.pt").read_bytes() == b"new" and not lock_path(out).exists()
    assert f"taking over the stale lock of pid {dead.stdout.strip()}" in caplog.text


@pytest.mark.slow
def test_two_concurrent_trains_into_one_folder_publish_one_run_and_refuse_the_other(digits_prepared, tmp_path):
    out, steps = tmp_path / "cell", 40
    cmd = [sys.executable, "-m", "alignclip", "train", str(digits_prepared), str(out), "--method", "erm", "--test-domain",
           "rotated_0", "--steps", str(steps), "--batch-size", "4", "--no-progress", "--num-workers", "0"]
    both = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in both]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, _, err in results]
    [(_, _, refused)] = [r for r in results if r[0] == 2]
    errors = [line for line in refused.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is being written by pid" in errors[0] and "Traceback" not in refused, refused[-2000:]
    log = pd.read_csv(out / artifacts.TRAIN_LOG)  # parses: no stray fragment of the loser
    assert log["step"].tolist() == list(range(1, steps + 1))
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "train.json", "train_log.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell"]  # no lock, staging or resume folder left


# ------------------------------------------------------------------------------------------- files as data


@pytest.fixture()
def prepared(tmp_path, digits_prepared):
    copy = tmp_path / "prepared"
    copy.mkdir()
    for name in (artifacts.MANIFEST, artifacts.META):
        (copy / name).write_bytes((digits_prepared / name).read_bytes())
    return copy


@pytest.mark.parametrize("text, message", [
    ("[]", "expected a JSON object (the metadata of `alignclip prepare`), found a list"),
    ('"a string"', "expected a JSON object (the metadata of `alignclip prepare`), found a string"),
    ('{"dataset": "x", "protocol": ', "empty or truncated"),
    ('{"dataset": 3}', "key 'dataset' must be a string, found an integer"),
])
def test_a_meta_json_of_the_wrong_shape_is_one_line_naming_the_file(prepared, text, message):
    from alignclip.data.prepare import load_prepared

    (prepared / artifacts.META).write_text(text)
    with pytest.raises(DataFileError, match=rf"^{prepared / artifacts.META}: .*") as caught:
        load_prepared(prepared)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_reports_reader_names_a_metrics_json_holding_a_list(tmp_path):
    from alignclip.report import collect

    (tmp_path / "cell").mkdir()
    (tmp_path / "cell" / artifacts.METRICS).write_text("[1, 2]")
    with pytest.raises(DataFileError, match=r"cell/metrics.json: expected a JSON object .*found a list"):
        collect(tmp_path)


@pytest.mark.slow
def test_wrong_typed_files_on_the_command_line_are_exit_2_and_one_line(prepared, tmp_path):
    (prepared / artifacts.META).write_text("[]")
    done = subprocess.run([sys.executable, "-m", "alignclip", "train", str(prepared), str(tmp_path / "o"), "--steps", "1"],
                          env=_env(), capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert f"{prepared / artifacts.META}: expected a JSON object" in line

    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / artifacts.MODEL).write_bytes(b"")
    (cell / artifacts.TRAIN_SUMMARY).write_text('["not", "a", "summary"]')
    done = subprocess.run([sys.executable, "-m", "alignclip", "evaluate", str(prepared), str(cell / artifacts.MODEL), str(cell)],
                          env=_env(), capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert f"{cell / artifacts.TRAIN_SUMMARY}: expected a JSON object" in line


# ---------------------------------------------------------------------------------------------- full disk


@pytest.fixture()
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root); skipped where it cannot be mounted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_one_line_naming_the_file_and_bytes_and_leaves_no_partial_file(small_disk):
    out = small_disk / "cell"
    out.mkdir()
    (out / artifacts.MODEL).write_bytes(b"the previous good model")
    weights = {"w": torch.zeros(400_000)}  # 1.6 MB: more than the disk holds
    with pytest.raises(DiskFull) as caught:
        with stage_output(out, "train", allowed=artifacts.CELL_FILES) as staging:
            (staging / artifacts.TRAIN_LOG).write_text("step,loss\n1,0.5\n")
            save_torch(weights, staging / artifacts.MODEL)
    message = str(caught.value)
    assert message.startswith(f"disk full: writing {small_disk}/.cell.train.")  # the per-process staging folder
    assert f"/{artifacts.MODEL} (" in message and " bytes)" in message and "\n" not in message
    size = int(message.split(" (")[1].split(" bytes")[0])
    assert size > 1_000_000
    assert (out / artifacts.MODEL).read_bytes() == b"the previous good model"
    assert sorted(str(p.relative_to(small_disk)) for p in small_disk.rglob("*")) == ["cell", f"cell/{artifacts.MODEL}"]
