"""Local services for the orchestration tests: an S3 API (moto), PostgreSQL, an MLflow server. All on 127.0.0.1,
started and stopped by the tests; each subprocess runs in its own process group and is stopped by it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise TimeoutError(f"{url}: the server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextmanager
def s3_server():
    """moto's S3 API server on a free port; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in S3_ENV.items() if k != "AWS_DEFAULT_REGION"},
                 region_name=S3_ENV["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)


@contextmanager
def postgres_server():
    """A throw-away PostgreSQL cluster (initdb + pg_ctl); yields a connection URI. As root, runs as `postgres`."""
    for tool in ("initdb", "pg_ctl"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: PostgreSQL's server binaries are needed for this test")
    data = Path(tempfile.mkdtemp(prefix="alignclip-pg-", dir="/tmp"))
    prefix = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run(prefix + ["initdb", "-D", str(data / "db"), "-A", "trust", "-U", "mlflow"], check=True, capture_output=True)
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    subprocess.run(prefix + ["pg_ctl", "-D", str(data / "db"), "-o", options, "-l", str(data / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(prefix + ["pg_ctl", "-D", str(data / "db"), "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@contextmanager
def _mlflow(backend_uri: str, artifacts: str, port: int, env: dict, log_path: Path, timeout: float):
    """`mlflow server` (one worker, served artifacts, this host allowed) in its own process group; yields
    (url, process). Its output goes to ``log_path``, whose tail is raised when it does not come up."""
    cmd = [
        shutil.which("mlflow") or str(Path(os.sys.executable).parent / "mlflow"), "server",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts, "--serve-artifacts",
        "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
    ]
    log = open(log_path, "ab")
    env = dict(env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # as infra/base/mlflow.yaml: no job runner
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(url + "/health", timeout=timeout, process=process)
        except TimeoutError as err:
            raise RuntimeError(f"{err}\n{Path(log_path).read_text()[-3000:]}") from err
        yield url, process
    finally:
        stop_group(process)
        log.close()


@contextmanager
def mlflow_server(backend_uri: str, s3_endpoint: str, bucket: str):
    """`mlflow server` with a PostgreSQL backend store and served S3 artifacts; yields its URL."""
    env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=s3_endpoint, **S3_ENV)
    log = tempfile.NamedTemporaryFile(prefix="mlflow-server-", suffix=".log", delete=False)
    log.close()
    with _mlflow(backend_uri, f"s3://{bucket}/artifacts", free_port(), env, Path(log.name), timeout=120) as (url, _):
        yield url


@contextmanager
def mlflow_local_server(folder: Path, port: int | None = None):
    """`mlflow server` on a sqlite store and a local artifact folder under ``folder``; yields (url, process).
    Restartable on the same port and store: tests stop it mid-run and bring it back."""
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    with _mlflow(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts"), port, env,
                 folder / f"server-{port}.log", timeout=180) as served:
        yield served


class TcpOutage:
    """A TCP relay in front of a server that a test can cut and restore: a real outage for the client. Stopping a
    server is not one: moto's (werkzeug's) server stops accepting, but its threads go on answering on connections
    the client keeps alive, so a client with a connection pool may never notice. ``cut()`` resets the open
    connections and every new one until ``restore()``; ``refused`` counts the connections reset while cut, i.e.
    the client's attempts during the outage (botocore's own retries may hide them from the client's log)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.refused = 0
        self._down = False
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        with self._lock:
            self._down = True
            connections, self._open = self._open, set()
        for connection in connections:
            _reset(connection)

    def restore(self) -> None:
        with self._lock:
            self._down = False

    def close(self) -> None:
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # close()
                return
            with self._lock:
                down = self._down
                if down:
                    self.refused += 1
            if down:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        for end in (source, target):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()
        with self._lock:
            self._open -= {source, target}


def _reset(connection: socket.socket) -> None:
    """Close with a TCP reset, as a dead endpoint or a dropped route looks to the client."""
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()
    except OSError:
        pass


@contextmanager
def s3_bucket(monkeypatch, cache_dir, bucket: str):
    """A moto S3 endpoint holding ``bucket``, with this process's AWS settings and ALIGNCLIP_CACHE pointed at it;
    yields a boto3 client. moto's buckets outlive the server within one process: give each test module its own
    bucket name."""
    import boto3

    with s3_server() as endpoint:
        for key, value in S3_ENV.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        monkeypatch.setenv("ALIGNCLIP_CACHE", str(cache_dir))
        make_bucket(endpoint, bucket)
        yield boto3.client("s3", endpoint_url=endpoint)
