"""The image as a tested artefact: built from the lock file with `make image`, then used as a cluster would use it:
non-root (uid 1000) on a read-only root filesystem with only /tmp, the cache and KFP's launcher paths writable, and
no network. The whole demo DAG runs with kfp's DockerRunner, each task in its own container. The MLflow server image
of infra/ is built and run with the manifests' authentication settings.

Needs a Docker daemon (`.ci/run` installs and starts one); without one every test here is skipped, with the reason.
Base image: the Dockerfile's default (python:3.11.14-slim-bookworm), or ALIGNCLIP_TEST_BASE_IMAGE (where registries
cannot be reached, `.ci/run` makes a Debian base with debootstrap and sets it).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest

from tests import demo_dag
from tests.kfp_package import package_docs
from tests.servers import free_port, postgres_server, wait_http

ROOT = Path(__file__).resolve().parent.parent
# One tag per checkout: test runs of several checkouts (worktrees) may share one Docker daemon.
CHECKOUT = hashlib.sha1(str(ROOT).encode()).hexdigest()[:8]
IMAGE = os.environ.get("ALIGNCLIP_TEST_IMAGE", f"alignclip:test-{CHECKOUT}")
MLFLOW_IMAGE = os.environ.get("ALIGNCLIP_TEST_MLFLOW_IMAGE", f"alignclip-mlflow:test-{CHECKOUT}")
BASE_IMAGE = os.environ.get("ALIGNCLIP_TEST_BASE_IMAGE", "")
# Builds reach the package index over the host's network (the default bridge may be absent, as with
# `dockerd --bridge=none`); containers under test get no network unless a test says so.
BUILD_FLAGS = os.environ.get("ALIGNCLIP_TEST_DOCKER_BUILD_FLAGS", "--network host")
# Written into the build's pip configuration (a BuildKit secret): it must not appear in any layer or in the history.
CANARY = "alignclip-build-secret-canary-5d1e"
USER = "1000:1000"
# What a read-only container may write: scratch, the caches (HOME/.cache) and KFP launcher paths (emptyDirs on a
# cluster, kubeflow/pipelines#10538).
TMPFS = {path: "rw,uid=1000,gid=1000,mode=0755" for path in ("/home/alignclip/.cache", "/gcs", "/minio", "/s3")} | {"/tmp": "rw,mode=1777"}
FAMILIES = ("demo", "domain_shift", "imagenet", "base2new", "wild", "all")


_reason = demo_dag.docker_unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_reason is not None, reason=_reason or "")]


@pytest.fixture(scope="module")
def client():
    import docker

    return docker.from_env(timeout=600)


def expected_commit() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    return head + ("-dirty" if changed.strip() else "")


def make(target: str, tmp: Path, **variables) -> None:
    """`make image` / `make mlflow-image`, the command users run, with a build pip configuration holding the canary."""
    pip_conf = tmp / "pip.conf"
    pip_conf.write_text(f"[global]\ntrusted-host = {CANARY}.invalid\n")
    variables = {"PIP_CONF": str(pip_conf), "DOCKER_BUILD_FLAGS": f"{BUILD_FLAGS} --progress plain", **variables}
    if BASE_IMAGE:
        variables["BASE_IMAGE"] = BASE_IMAGE
    cmd = ["make", "-C", str(ROOT), target, *(f"{k}={v}" for k, v in variables.items())]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


@pytest.fixture(scope="module")
def image(client, tmp_path_factory):
    make("image", tmp_path_factory.mktemp("build"), IMAGE=IMAGE)
    return client.images.get(IMAGE)


def writable_dir(path: Path) -> Path:
    """A host folder the container's uid 1000 can write (bind mounts keep host ownership)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(path, 1000, 1000)
    else:
        path.chmod(0o777)
    return path


def run(client, *command: str, entrypoint=None, volumes=None, environment=None, image_name=IMAGE, user=USER) -> str:
    """One container as on a cluster: uid 1000, read-only root, tmpfs scratch, no network; its output, or the
    test fails with its stderr."""
    import docker

    try:
        out = client.containers.run(
            image_name, list(command) or None, entrypoint=entrypoint, user=user, read_only=True, tmpfs=TMPFS,
            network_mode="none", volumes=volumes or {}, environment=environment or {}, remove=True, stdout=True, stderr=True,
        )
    except docker.errors.ContainerError as err:
        pytest.fail(f"{' '.join(command)} exited {err.exit_status}: {(err.stderr or b'').decode()[-3000:]}")
    return out.decode()


def test_cli_help_and_version_as_uid_1000_on_a_read_only_root(client, image):
    config = image.attrs["Config"]
    assert config["User"] == USER and config["Entrypoint"] == ["alignclip"]
    assert "Usage" in run(client) and "pipeline" in run(client, "--help")  # the default command is --help
    from alignclip import __version__

    assert run(client, "version").strip() == __version__
    # whoever runs it, the process is not root
    assert run(client, "-c", "id -u; id -g", entrypoint=["sh"]).split() == ["1000", "1000"]


def test_provenance_is_inside(client, image):
    commit = expected_commit()
    assert image.labels["org.opencontainers.image.revision"] == commit
    out = run(client, "-c", "import json; from alignclip.tracking import provenance_tags; print(json.dumps(provenance_tags()))",
              entrypoint=["python"])
    tags = json.loads(out.strip().splitlines()[-1])
    assert tags["git_commit"] == commit
    # the data version belongs to the data a stage read (alignclip.tracking.data_tags), not to the image's checkout
    assert "data_version" not in tags
    assert tags["image"] == IMAGE


def test_the_tiny_presets_weights_are_built_in(client, image):
    """The image holds the tiny preset's default weights (ALIGNCLIP_WEIGHTS_PATH): a CPU stage in a container whose
    cache starts empty loads them and builds nothing (each task of the demo DAG pre-trained its own copy before)."""
    script = ("import json, os; from alignclip import determinism; determinism.pin_process('cpu'); "
              "from alignclip import pretrain; path = pretrain.cached_weights(); "
              "summary = json.load(open(path.with_suffix('.json'))); "
              "print(json.dumps([str(path), summary['cpu']['cpu_kernels'], os.listdir(pretrain.cache_dir()) if pretrain.cache_dir().exists() else []]))")
    path, kernels, cached = json.loads(run(client, "-c", script, entrypoint=["python"]).strip().splitlines()[-1])
    assert path.startswith("/opt/alignclip/weights/alignclip-tiny-digits-") and kernels == "portable" and cached == []


@pytest.fixture(scope="module")
def compiled(client, image, tmp_path_factory):
    """`alignclip pipeline compile` of every family inside the image (the non-editable install users get)."""
    out = writable_dir(tmp_path_factory.mktemp("compiled"))
    script = " && ".join(f"alignclip pipeline compile {f} -o /out/{f}.yaml" for f in FAMILIES)
    run(client, "-c", script, entrypoint=["sh"], volumes={str(out): {"bind": "/out", "mode": "rw"}})
    return out


def test_pipeline_compile_for_every_family(compiled):
    for family in FAMILIES:
        docs = package_docs(compiled / f"{family}.yaml")
        spec = docs[0]
        assert spec["pipelineInfo"]["name"].startswith("alignclip-")
        images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
        assert images == {IMAGE}, family  # every task runs on the image that compiled it (ALIGNCLIP_IMAGE)


def test_no_secret_in_any_layer_or_the_history_and_nothing_left_from_the_build(client, image):
    history = json.dumps(client.api.history(IMAGE))
    assert CANARY not in history and CANARY not in json.dumps(image.attrs)
    # every byte of every layer: `docker save` streams the layers as plain tar files
    tail, size = b"", 0
    for chunk in image.save(named=True):
        window = tail + chunk
        if CANARY.encode() in window:
            pytest.fail("the build's pip configuration (a BuildKit secret) ended up in a layer")
        tail, size = window[-len(CANARY):], size + len(chunk)
    assert size > 100 * 2**20  # the stream really held the layers
    # no secret mount, source tree, pip cache, compiler or test suite is left in the file system (looked at as root,
    # which sees /root too)
    leftovers = run(client, "-c", textwrap.dedent("""
        for p in /run/secrets/pip.conf /run/secrets/ca.crt /root/.cache/pip /home/alignclip/.cache/pip; do
          [ -e "$p" ] && echo "$p"; done
        for tool in gcc cc g++ make git; do command -v "$tool"; done
        # our tests, lock files, a git checkout, pip configurations, downloaded wheels (the base's own ensurepip
        # wheels in /usr/share/python-wheels belong to its python3-venv)
        find / -xdev \\( -path /proc -o -path /sys -o -path /usr/share/python-wheels \\) -prune -o \\( -path '*/tests/servers.py' \\
          -o -name 'requirements*.lock' -o -name .git -o -name pip.conf -o -name '*.whl' \\) -print 2>/dev/null
        true"""), entrypoint=["sh"], user="0:0")
    assert leftovers.split() == []


def test_demo_dag_with_kfp_docker_runner_each_task_in_its_own_container(client, image, compiled, tmp_path):
    """The compiled demo package (compiled inside the image), run by kfp's DockerRunner with the arguments `alignclip
    pipeline run` resolves for tests/demo_dag.py's settings: every task a container of the image, as on a cluster
    (a task's command replaces the entrypoint); uid 1000, read-only root, no network. The MLflow store (sqlite) and
    the artifacts live under the pipeline root, the one folder DockerRunner mounts. Then tests/demo_dag.py's checks
    (the SubprocessRunner runs the same DAG only where no Docker daemon is reachable)."""
    root = writable_dir(tmp_path / "kfp")
    db = root / "mlflow.db"
    arguments = demo_dag.pipeline_arguments(f"sqlite:///{db}")
    script = textwrap.dedent(f"""
        from kfp import components, local
        local.init(
            runner=local.DockerRunner(user={USER!r}, read_only=True, tmpfs={TMPFS!r}, network_mode="none",
                                      entrypoint=[], working_dir={str(root)!r}),
            pipeline_root={str(root)!r}, raise_on_error=True)
        pipeline = components.load_component_from_file({str(compiled / 'demo.yaml')!r})
        pipeline(**{arguments!r})
        """)
    env = dict(os.environ, ALIGNCLIP_LOG_LEVEL="WARNING")
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.time()
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    # each task ran in a container of the image (DockerRunner prints the image it found for every task)
    cells = len(arguments["train_grid"])
    assert done.stdout.count(f"Found image '{IMAGE}'") == 4 + 2 * cells == 8, done.stdout[-2000:]
    print(f"demo DAG in containers: {time.time() - started:.0f} s")
    runs = demo_dag.check_runs(root, db, expected_commit())  # provenance from the image's label
    assert {run.data.tags["image"] for run in runs.values()} == {IMAGE}
    # the train tasks' outputs (<run>/for-loop-1-iteration-N/train/model/), written by uid 1000 under the pipeline
    # root, one log row per step; the evaluate tasks' results and the MLflow artifact store hold copies
    logs = [p for p in root.rglob("train_log.csv") if p.parent.name == "model" and p.parent.parent.name == "train"]
    assert len(logs) == cells and all(len(p.read_text().splitlines()) == 1 + 4 for p in logs)
    assert {p.read_bytes() for p in (root / "mlruns").rglob("train_log.csv")} >= {p.read_bytes() for p in logs}
    summaries = [json.loads(p.read_text()) for p in root.rglob("train.json")]
    assert {(s["settings"]["steps"], s["settings"]["model"]) for s in summaries} == {(4, "tiny")}
    assert {p.stat().st_uid for p in root.rglob("model.pt")} == {1000}


# --- the MLflow server image of infra/ ---------------------------------------------------------------------------


def rendered_mlflow(overlay: str = "dev") -> tuple[dict, dict, dict]:
    from tests.test_infra import render

    docs = render(overlay)
    deployment = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-auth")
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "mlflow-users")
    return deployment["spec"]["template"]["spec"]["containers"][0], config, job["spec"]["template"]["spec"]["containers"][0]


class ContainerProcess:
    """A container seen as wait_http's process: poll() is its exit code once it has stopped, else None."""

    def __init__(self, container):
        self.container = container
        self.returncode = None

    def poll(self):
        self.container.reload()
        if self.container.status in ("exited", "dead"):
            self.returncode = self.container.attrs["State"]["ExitCode"]
        return self.returncode


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + b64encode(f"{user}:{password}".encode()).decode()}


def status_of(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_mlflow_server_image_runs_the_manifest_with_authentication(client, tmp_path):
    """The server container runs the Deployment's command, args and environment (service names pointed at
    servers on 127.0.0.1): PostgreSQL through PGUSER/PGPASSWORD, basic-auth users in the same database, /health
    open, the API closed without a login; the users Job's script creates the pipelines' user."""
    make("mlflow-image", tmp_path, MLFLOW_IMAGE=MLFLOW_IMAGE)
    container, config, job = rendered_mlflow()
    port = free_port()
    secrets = {"POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": "pg-password", "admin": ("admin", "admin-password-1"),
               "pipeline": ("pipeline", "pipeline-password-1")}
    import sqlalchemy

    with postgres_server() as server_uri:  # trust authentication: any password; the driver must still get the user
        pg_port = re.search(r":(\d+)/", server_uri).group(1)
        with sqlalchemy.create_engine(server_uri, isolation_level="AUTOCOMMIT").connect() as connection:
            connection.execute(sqlalchemy.text("CREATE DATABASE mlflow"))  # what POSTGRES_DB does in the StatefulSet
        backend = server_uri.rsplit("/", 1)[0] + "/mlflow"
        config_dir = tmp_path / "mlflow-auth"
        config_dir.mkdir()
        (config_dir / "basic_auth.ini").write_text(config["data"]["basic_auth.ini"].replace("postgres:5432", f"127.0.0.1:{pg_port}"))
        config_dir.chmod(0o755)
        env = {}
        for item in container["env"]:
            if "value" in item:
                env[item["name"]] = item["value"].replace("postgres:5432", f"127.0.0.1:{pg_port}")
        env.update(PGUSER=secrets["POSTGRES_USER"], PGPASSWORD=secrets["POSTGRES_PASSWORD"],
                   MLFLOW_AUTH_ADMIN_USERNAME=secrets["admin"][0], MLFLOW_AUTH_ADMIN_PASSWORD=secrets["admin"][1],
                   MLFLOW_FLASK_SERVER_SECRET_KEY="csrf-signing-key")
        assert set(env) >= {e["name"] for e in container["env"]}  # every variable of the Deployment is set
        args = [a for a in container["args"] if not a.startswith(("--host", "--port", "--allowed-hosts", "--artifacts-destination"))]
        args += ["--host=127.0.0.1", f"--port={port}", f"--allowed-hosts=127.0.0.1:{port}",
                 "--artifacts-destination=/tmp/artifacts", "--workers=1"]
        assert "--app-name=basic-auth" in args
        server = client.containers.run(
            MLFLOW_IMAGE, args, entrypoint=container["command"], user=USER, read_only=True, tmpfs={"/tmp": "rw,mode=1777"},
            network_mode="host", environment=env, detach=True,
            volumes={str(config_dir): {"bind": str(Path(env["MLFLOW_AUTH_CONFIG_PATH"]).parent), "mode": "ro"}},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_http(url + "/health", timeout=180, process=ContainerProcess(server))
            except TimeoutError:
                pytest.fail(server.logs().decode()[-4000:])
            assert status_of(url + "/health") == 200
            # the manifest turns MLflow 3's job runner off (eight more processes, 30 s of CPU per start)
            commands = [" ".join(process) for process in server.top()["Processes"]]
            assert commands and not [c for c in commands if "jobs._job_runner" in c or "huey" in c], commands
            search = url + "/api/2.0/mlflow/experiments/search?max_results=10"
            assert status_of(search) == 401
            assert status_of(search, basic("admin", "wrong")) == 401
            assert status_of(search, basic(*secrets["admin"])) == 200
            # the users Job's own script, run in the same image against this server
            script = job["args"][0].replace("http://mlflow:5000", url)
            job_env = {"MLFLOW_TRACKING_USERNAME": secrets["admin"][0], "MLFLOW_TRACKING_PASSWORD": secrets["admin"][1],
                       "PIPELINE_USERNAME": secrets["pipeline"][0], "PIPELINE_PASSWORD": secrets["pipeline"][1], "HOME": "/tmp"}
            for attempt in ("created", "updated"):  # idempotent: a second run resets the password
                out = client.containers.run(MLFLOW_IMAGE, [script], entrypoint=job["command"], user=USER, read_only=True,
                                            tmpfs={"/tmp": "rw,mode=1777"}, network_mode="host", environment=job_env, remove=True)
                assert attempt in out.decode()
            assert status_of(search, basic(*secrets["pipeline"])) == 200
            # a pipeline task's client, with the pipelines' credentials from the environment
            done = subprocess.run(
                [sys.executable, "-c", "import mlflow; mlflow.set_experiment('auth-check'); run = mlflow.start_run(); "
                 "mlflow.log_metric('x', 1.0); mlflow.end_run(); print(run.info.run_id)"],
                env=dict(os.environ, MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME=secrets["pipeline"][0],
                         MLFLOW_TRACKING_PASSWORD=secrets["pipeline"][1]),
                capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-3000:]
        finally:
            server.remove(force=True)
        # the auth tables live beside the tracking tables in the one database, with their own migration table
        with sqlalchemy.create_engine(backend).connect() as connection:
            tables = set(sqlalchemy.inspect(connection).get_table_names())
        assert {"users", "experiments", "alembic_version", "alembic_version_auth"} <= tables
