"""Storage errors are not image errors: a bad store, endpoint or credentials stops the stage in one line; only bytes
that do not decode make an image unreadable, and evaluation leaves such images out (counted), never duplicated."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from botocore.stub import Stubber

from alignclip import storage
from alignclip.data.prepare import PrepareSettings, prepare, write_prepared
from alignclip.storage import StorageError, UnreadableImage
from tests.servers import S3_ENV, TcpOutage, free_port, make_bucket, s3_server


@pytest.fixture
def s3_env(monkeypatch):
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)


def _stubbed(monkeypatch, code, status):
    import boto3

    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    stubber = Stubber(client)
    for _ in range(4):
        stubber.add_client_error("list_objects_v2", service_error_code=code, http_status_code=status)
    stubber.activate()
    monkeypatch.setattr("alignclip.storage.client", lambda: client)


@pytest.mark.parametrize(
    "code, status, message",
    [
        ("NoSuchBucket", 404, "bucket 'data' does not exist"),
        ("InvalidAccessKeyId", 403, "S3 credentials rejected by .* for s3://data .InvalidAccessKeyId"),
        ("SignatureDoesNotMatch", 403, "S3 credentials rejected"),
    ],
)
def test_prepare_names_a_missing_bucket_or_rejected_credentials(monkeypatch, code, status, message):
    _stubbed(monkeypatch, code, status)
    with pytest.raises(StorageError, match=message) as caught:
        prepare(PrepareSettings("rotated_digits", "s3://data/digits"))
    assert "\n" not in str(caught.value) and not caught.value.transient


def test_the_resume_checkpoint_store_fails_in_the_same_one_line_as_the_data(monkeypatch):
    """CheckpointStore reads, writes and deletes through alignclip.storage: one translation of S3 errors for
    checkpoints and images alike; a missing object is no checkpoint yet (None), not an error."""
    import boto3

    from alignclip.resume import CheckpointStore

    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    stubber = Stubber(client)
    stubber.add_client_error("get_object", service_error_code="NoSuchKey", http_status_code=404)
    stubber.add_client_error("get_object", service_error_code="AccessDenied", http_status_code=403)
    stubber.add_client_error("put_object", service_error_code="NoSuchBucket", http_status_code=404)
    stubber.add_client_error("delete_object", service_error_code="SlowDown", http_status_code=503)
    stubber.activate()
    monkeypatch.setattr("alignclip.storage.client", lambda: client)
    store = CheckpointStore("s3://ckpt/run-1")
    assert store.info() is None
    with pytest.raises(StorageError, match=r"S3 credentials rejected by .* for s3://ckpt \(AccessDenied\)") as denied:
        store.load()
    with pytest.raises(StorageError, match="bucket 'ckpt' does not exist at") as missing:
        store.save({"step": 1}, {"step": 1})
    with pytest.raises(StorageError, match=r"S3 error at .* reading s3://ckpt/run-1/resume.pt: SlowDown$") as slow:
        store.clear()
    assert not denied.value.transient and not missing.value.transient and slow.value.transient
    stubber.assert_no_pending_responses()


def test_prepare_without_credentials_says_so(tmp_path):
    """A fresh process (boto3's default session caches credentials it found once, so not in-process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{free_port()}",
               AWS_DEFAULT_REGION="us-east-1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "alignclip", "prepare", "rotated_digits", "s3://data/digits",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    assert "error: no S3 credentials for s3://data" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow  # waits out the client's connect retries
def test_prepare_against_an_unreachable_endpoint_is_one_line(monkeypatch, s3_env):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    # 3 attempts per request, not the default 10 (test_aws_max_attempts_sets_the_attempts_per_request): what is
    # tested is the one line; ten attempts of botocore's back-off made this test wait 74 s
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"S3 endpoint {endpoint} unreachable") as caught:
        prepare(PrepareSettings("rotated_digits", "s3://data/digits"))
    assert caught.value.transient and time.monotonic() - started < 60


def test_cli_prepare_of_a_missing_bucket_exits_2_in_one_line(s3_env, tmp_path):
    with s3_server() as endpoint:
        env = dict(os.environ, AWS_ENDPOINT_URL_S3=endpoint, HF_HUB_OFFLINE="1")
        done = subprocess.run([sys.executable, "-m", "alignclip", "prepare", "rotated_digits", "s3://missing/digits",
                               str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert "error: bucket 'missing' does not exist at http://127.0.0.1" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_file_that_does_not_decode_is_unreadable_and_a_missing_one_is_a_storage_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UnreadableImage):
        storage.open_image(str(tmp_path / "bad.png"))
    with pytest.raises(StorageError, match="file not found"):
        storage.open_image(str(tmp_path / "gone.png"))


def test_evaluation_leaves_an_unreadable_image_out_and_counts_it(digits_root, tmp_path):
    from alignclip.evaluate import evaluate
    from alignclip.train import TrainSettings, train

    root = tmp_path / "raw"
    shutil.copytree(digits_root, root)
    manifest, meta = prepare(PrepareSettings("rotated_digits", str(root)))
    test_rows = manifest[(manifest["domain"] == "rotated_30") & (manifest["split"] == "val")]
    broken = test_rows["path"].iloc[3]
    (root / broken).write_bytes(b"\x89PNG truncated")
    write_prepared(manifest, meta, tmp_path / "prepared")
    train(tmp_path / "prepared", tmp_path / "zs", TrainSettings(method="zeroshot", test_domain="rotated_30", progress=False))
    summary = evaluate(tmp_path / "prepared", tmp_path / "zs" / "model.pt", tmp_path / "zs", batch_size=4)
    view = summary["views"]["test"]
    assert view["total"] == len(test_rows) - 1 and view["unreadable"] == 1
    assert view["skipped_images"] == [str(root / broken)]
    predictions = pd.read_parquet(tmp_path / "zs" / "predictions.parquet")
    test_predictions = predictions[predictions["view"] == "test"]
    assert len(test_predictions) == len(test_rows) - 1 and test_predictions["path"].is_unique
    assert broken not in set(test_predictions["path"])


def _upload(endpoint, root, bucket):
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    for path in sorted(root.rglob("*.png")):
        client.upload_file(str(path), bucket, f"digits/{path.relative_to(root).as_posix()}")


def _logged(out) -> int:
    from alignclip.publish import live_staging

    try:
        return max(0, len((live_staging(out, "train")[0] / "train_log.csv").read_text().splitlines()) - 1)
    except (OSError, IndexError):
        return 0


@pytest.mark.slow
def test_an_s3_outage_during_training_is_retried_and_a_long_one_stops_with_a_checkpoint(digits_root, tmp_path, s3_env, monkeypatch):
    from moto.server import ThreadedMotoServer

    from alignclip.resume import CheckpointStore, default_location

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    outage = TcpOutage(port)  # the trainer reaches S3 through it: cutting it is the outage
    endpoint = outage.url
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    try:
        make_bucket(endpoint, "data")
        _upload(endpoint, digits_root, "data")
        manifest, meta = prepare(PrepareSettings("rotated_digits", "s3://data/digits"))
        write_prepared(manifest, meta, tmp_path / "prepared")
        # 3 attempts per request instead of 10: botocore's back-off alone (up to 20 s a wait) made this test 5 minutes;
        # the stage's own retry window (15 s) is what the test is about
        env = dict(os.environ, AWS_ENDPOINT_URL_S3=endpoint, ALIGNCLIP_STORAGE_RETRY_S="15", AWS_MAX_ATTEMPTS="3",
                   HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
        env.pop("MLFLOW_TRACKING_URI", None)

        def command(out, steps):
            return [sys.executable, "-m", "alignclip", "train", str(tmp_path / "prepared"), str(out), "--method", "erm",
                    "--test-domain", "rotated_0", "--steps", str(steps), "--batch-size", "4", "--no-progress",
                    "--checkpoint-every", "25", "--no-stage-remote", "--num-workers", "0"]

        def cut_after(out, steps, trainer):
            """Cut S3 off once ``steps`` are logged; the trainer is paused meanwhile, so that a fast machine cannot
            finish before the outage starts."""
            while _logged(out) < steps and trainer.poll() is None:
                time.sleep(0.05)
            trainer.send_signal(signal.SIGSTOP)
            assert trainer.poll() is None, "training finished before the outage"
            outage.cut()
            trainer.send_signal(signal.SIGCONT)

        # a short outage: the stage waits it out; no image is skipped
        short = tmp_path / "short"
        trainer = subprocess.Popen(command(short, 60), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cut_after(short, 10, trainer)
        deadline = time.monotonic() + 60  # restore once the trainer has met the cut (a loaded machine is slow to)
        while outage.refused == 0 and trainer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # and keep it cut a little longer, so that the stage's own retries wait too
        outage.restore()
        stdout, stderr = trainer.communicate(timeout=900)
        assert trainer.returncode == 0, stderr[-3000:]
        assert outage.refused > 0  # it did hit the outage (botocore's retries, then ours, waited it out)
        assert json.loads((short / "train.json").read_text())["skipped_images"] == []

        # a long outage: after the retry window the stage stops in one line and keeps a resumable checkpoint
        long = tmp_path / "long"
        trainer = subprocess.Popen(command(long, 400), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cut_after(long, 12, trainer)
        stdout, stderr = trainer.communicate(timeout=900)
    finally:
        outage.close()
        server.stop()
    assert trainer.returncode == 2, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert f"S3 endpoint {endpoint} unreachable" in line and "re-run the same command to resume" in line
    assert "Traceback" not in stderr
    info = CheckpointStore(default_location(long)).info()
    assert 12 <= info["step"] < 400 and not long.exists()
    # the checkpoint is the one written where it stopped (every whole step done): the log is flushed every 10
    # steps, so the cut comes at step 20, before the first scheduled checkpoint (25)
    assert f"training stopped at step {info['step']}/400" in line


@pytest.mark.parametrize("value, attempts", [(None, 10), ("3", 3), ("0", 10), ("-2", 10), ("many", 10)])
def test_aws_max_attempts_sets_the_attempts_per_request(monkeypatch, value, attempts):
    from alignclip import storage

    if value is None:
        monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    else:
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", value)
    assert storage.retry_attempts() == attempts
