"""The compiled KFP package, and the whole DAG run by kfp's local runner with the MLflow store checked after."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from alignclip_kfp import client as kfp_client
from alignclip.config import ConfigError
from alignclip_kfp.client import cluster_settings, compile_pipeline
from tests import demo_dag
from tests.kfp_package import package_docs
from tests.servers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    cluster = cluster_settings("nvidia.com/gpu", 1, ["cloud.google.com/gke-accelerator=nvidia-h100-80gb"], ["nvidia.com/gpu:NoSchedule"], 3,
                               image="registry.example/alignclip:1.2.3", max_parallelism=3)
    compile_pipeline("demo", path, cluster)
    spec, platform = package_docs(path)
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"], path.read_text()


def test_tasks_and_edges(compiled):
    spec, _, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    # the loop's task name is kfp's to choose: find it by what it is, the one task iterating over a parameter
    (loop_name,) = [name for name, task in tasks.items() if "parameterIterator" in task]
    assert set(tasks) == {"start-run", "prepare", "similarity", loop_name, "report"}
    assert "prepare" in tasks["similarity"]["dependentTasks"]
    loop = tasks[loop_name]
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("train_grid")
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"train", "evaluate"}
    train_inputs = inner["train"]["inputs"]["artifacts"]
    assert train_inputs["matrix"]["componentInputArtifact"].endswith("similarity-matrix")
    assert inner["evaluate"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "train"
    # fan-in: the report collects every evaluation of the loop
    report = tasks["report"]["inputs"]
    assert report["artifacts"]["results"]["taskOutputArtifact"]["producerTask"] == loop_name
    assert report["artifacts"]["models"]["taskOutputArtifact"]["producerTask"] == loop_name
    assert report["parameters"]["accuracies"]["taskOutputParameter"]["producerTask"] == loop_name


def test_parameters_are_the_resolved_settings(compiled):
    from alignclip.config import resolve
    from alignclip_kfp.arguments import pipeline_arguments

    spec, _, _ = compiled
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    defaults = {name: p.get("defaultValue") for name, p in parameters.items()}
    assert defaults == pipeline_arguments("demo", resolve("demo"))  # the compiled defaults are what a run gets
    assert "train_grid" in defaults  # methods x test_domains x seeds
    assert "optimiser steps" in parameters["train_steps"]["description"]  # the schema's help text


def test_gpu_requests_retries_and_scheduling(compiled):
    spec, executors, _ = compiled
    for name in ("exec-train", "exec-evaluate"):
        resources = spec["deploymentSpec"]["executors"][name]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert resources["accelerator"]["resourceCount"] == "1"
        assert resources["resourceCpuRequest"] == "16" and resources["resourceMemoryRequest"] == "32G"
        assert resources["resourceCpuLimit"] == "16"  # the cgroup quota that sizes the DataLoader workers (auto)
        platform = executors[name]
        assert platform["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
        assert platform["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert platform["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
        assert platform["emptyDirMounts"][0]["medium"] == "Memory"
    (loop_task,) = [t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
    loop = spec["components"][loop_task["componentRef"]["name"]]["dag"]["tasks"]
    assert loop["train"]["retryPolicy"]["maxRetryCount"] == 3
    assert loop["evaluate"]["retryPolicy"] == loop["train"]["retryPolicy"]  # a preempted evaluate pod is retried too
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-prepare"]["container"].get("resources", {})


def test_no_gpus_drops_the_default_gpu_node_selector_and_toleration(tmp_path):
    # --gpus 0 is for a cluster without GPU nodes: the GPU defaults would keep train/evaluate Pending there.
    def scheduling(cluster):
        path = compile_pipeline("demo", tmp_path / "p.yaml", cluster)
        spec, platform = package_docs(path)
        executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
        return [(executors[n].get("nodeSelector"), executors[n].get("tolerations")) for n in ("exec-train", "exec-evaluate")]

    assert scheduling(cluster_settings(gpus=0)) == [(None, None)] * 2
    # explicit ones still apply
    explicit = scheduling(cluster_settings(gpus=0, node_selector=["pool=cpu"], tolerations=["dedicated=ml"]))
    assert explicit == [({"labels": {"pool": "cpu"}}, [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}])] * 2


def test_secrets_come_from_kubernetes_secrets(compiled):
    _, executors, text = compiled
    for name in ("exec-train", "exec-evaluate", "exec-prepare", "exec-report"):
        secrets = {s["secretName"]: [k["envVar"] for k in s["keyToEnv"]] for s in executors[name]["secretAsEnv"]}
        assert secrets["alignclip-s3"] == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
        assert "MLFLOW_TRACKING_PASSWORD" in secrets["alignclip-mlflow"]
    assert "testing" not in text and "password:" not in text.lower()


# The paper's setting per family (model, recipe, lr, length, batch per domain, held-out domains, seeds), written out
# from the paper (A.1) and the released scripts' values that recipes.py cites
PAPER_SETTING = {
    "domain_shift": ("office_home", "domain_shift/office_home", 1e-5, 5000, 0, 36, ["Art", "Clipart", "Product", "Real World"]),
    "wild": ("office_home", "wild/office_home", 3e-6, 5000, 0, 36, ["Art", "Clipart", "Product", "Real World"]),
    # trainopenclass.sh:43 --epochs 1 and trainimagenet.sh:15-21 (main.py's 10), each x main.py's 500 iterations
    "base2new": ("oxford_pets", "base2new/oxford_pets", 5e-6, 500, 0, 36, [""]),
    "imagenet": ("imagenet", "imagenet", 5e-6, 5000, 0, 36, [""]),
}


@pytest.mark.parametrize("family", sorted(PAPER_SETTING))
def test_each_family_compiles_with_the_papers_setting(family, tmp_path):
    dataset, recipe, lr, steps, epochs, batch, domains = PAPER_SETTING[family]
    path = compile_pipeline(family, tmp_path / f"{family}.yaml")
    spec = package_docs(path)[0]
    d = {name: p.get("defaultValue") for name, p in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert (d["data_dataset"], d["model_name"], d["model_pretrained"], d["train_recipe"]) == (dataset, "vit-b-16", "openai", recipe)
    assert (d["train_lr"], d["train_steps"], d["train_epochs"], d["train_batch_size"]) == (lr, steps, epochs, batch)
    cells = [(c["method"], c["test_domain"], c.get("seed")) for c in d["train_grid"]]
    # zero-shot trains nothing and is deterministic: one cell per held-out domain, no seed (issue 19)
    assert sorted(cells, key=str) == sorted([("zeroshot", dom, None) for dom in domains]
                                            + [(m, dom, s) for m in ("erm", "clipood", "alignclip") for dom in domains for s in (0, 1, 2)], key=str)
    assert d["mlflow_experiment"] == {"domain_shift": "domain-shift", "wild": "in-the-wild", "base2new": "base-to-new", "imagenet": "imagenet-variants"}[family]


def test_task_settings_name_their_caller_without_inspecting_the_stack(tmp_path, monkeypatch):
    """kfp's container check takes inspect.stack() in every task setting (alignclip_pipeline.caller_names_from_frames):
    compiling takes none, writes the same bytes as with kfp's own check, and the check still refuses a task without
    a container, naming the setting. Mutation: compiling outside the context manager fails the count."""
    import contextlib
    import inspect

    from kfp import dsl

    from alignclip_kfp.pipelines import alignclip_pipeline

    calls, stack = [], inspect.stack
    monkeypatch.setattr(inspect, "stack", lambda *a, **k: calls.append(1) or stack(*a, **k))
    ours = compile_pipeline("demo", tmp_path / "ours.yaml").read_bytes()
    assert calls == []
    monkeypatch.setattr(alignclip_pipeline, "caller_names_from_frames", contextlib.nullcontext)
    assert compile_pipeline("demo", tmp_path / "kfps.yaml").read_bytes() == ours and len(calls) > 20
    monkeypatch.undo()

    @dsl.pipeline
    def inner():
        alignclip_pipeline.build_components("any/image:1").start_run(experiment="e", tracking_uri="", run_name="r", params_json="{}")

    with alignclip_pipeline.caller_names_from_frames(), pytest.raises(ValueError, match="^set_cpu_request can only be used on single-step"):
        @dsl.pipeline
        def outer():
            inner().set_cpu_request("1")


@pytest.mark.slow  # compiles the `all` composite (every family): the costliest compile
def test_the_all_pipeline_can_turn_tracking_on(tmp_path):
    path = compile_pipeline("all", tmp_path / "all.yaml", values={"mlflow_tracking_uri": "http://mlflow.alignclip:5000"})
    spec = package_docs(path)[0]
    assert spec["root"]["inputDefinitions"]["parameters"]["mlflow_tracking_uri"]["defaultValue"] == "http://mlflow.alignclip:5000"
    tasks = spec["root"]["dag"]["tasks"]
    assert len(tasks) == 19  # every dataset of tables 1-4 (test_all_runs_every_dataset_of_the_papers_tables)
    for task in tasks.values():
        assert task["inputs"]["parameters"]["mlflow_tracking_uri"]["componentInputParameter"] == "mlflow_tracking_uri"


def test_caching_parallelism_image_and_s3_endpoint(compiled):
    spec, executors, _ = compiled
    tasks = spec["root"]["dag"]["tasks"]
    (loop_name,) = [name for name, task in tasks.items() if "parameterIterator" in task]
    caching = {name: task.get("cachingOptions", {}).get("enableCache", False) for name, task in tasks.items() if name != loop_name}
    assert caching == {"start-run": False, "prepare": True, "similarity": True, "report": False}
    loop = spec["components"][tasks[loop_name]["componentRef"]["name"]]["dag"]["tasks"]
    assert not loop["train"].get("cachingOptions", {}).get("enableCache") and not loop["evaluate"].get("cachingOptions", {}).get("enableCache")
    assert tasks[loop_name]["iteratorPolicy"]["parallelismLimit"] == 3
    for name, executor in spec["deploymentSpec"]["executors"].items():
        assert executor["container"]["image"] == "registry.example/alignclip:1.2.3", name
        platform = executors[name]
        assert platform["configMapAsEnv"][0]["configMapName"] == "alignclip-pipeline-env"
        mapped = {k["envVar"] for k in platform["configMapAsEnv"][0]["keyToEnv"]}
        assert mapped == {"AWS_ENDPOINT_URL_S3", "ALIGNCLIP_CHECKPOINT_ROOT"}, name


class StubClient:
    """kfp.Client as `submit` uses it: records what it is given and compiles the pipeline it receives."""

    calls = []

    def __init__(self, host=None, **kwargs):
        self.host = host

    def create_run_from_pipeline_func(self, func, arguments, experiment_name=None, run_name=None, **kwargs):
        import tempfile

        from kfp import compiler

        with tempfile.TemporaryDirectory() as scratch:
            compiler.Compiler().compile(func, f"{scratch}/p.yaml")
            docs = package_docs(f"{scratch}/p.yaml")
        StubClient.calls.append({"host": self.host, "arguments": arguments, "experiment": experiment_name, "run_name": run_name, "docs": docs})
        return type("Run", (), {"run_id": "run-123"})()


def test_submit_sends_the_intended_arguments_and_cluster_settings(monkeypatch, capsys):
    import kfp

    from alignclip.cli import main

    monkeypatch.setattr(kfp, "Client", StubClient)
    monkeypatch.setattr(kfp_client, "check_kfp_host", lambda host: host)  # kfp.example is not there to probe
    StubClient.calls.clear()
    monkeypatch.setattr(sys, "argv", [
        "alignclip", "pipeline", "submit", "domain_shift", "--host", "http://kfp.example:8080", "--dataset", "pacs",
        "--data-root", "s3://data/pacs", "--param", "train_seeds=0,1", "--param", "mlflow_tracking_uri=http://mlflow.alignclip:5000",
        "--image", "registry.example/alignclip:0.1.0", "--accelerator", "nvidia.com/gpu", "--gpus", "2",
        "--node-selector", "pool=h200", "--toleration", "dedicated=ml:NoExecute", "--cpu", "12", "--memory", "96G",
        "--max-parallelism", "4", "--run-name", "pacs-check"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0
    assert capsys.readouterr().out.splitlines()[0] == "http://kfp.example:8080/#/runs/details/run-123"
    (call,) = StubClient.calls
    assert (call["host"], call["experiment"], call["run_name"]) == ("http://kfp.example:8080", "domain-shift", "pacs-check")
    domains = ["art_painting", "cartoon", "photo", "sketch"]
    assert call["arguments"] == {
        "data_dataset": "pacs", "data_root": "s3://data/pacs", "data_protocol": "domainbed", "data_holdout_fraction": 0.2,
        "data_trial_seed": 0, "data_shots": 16, "data_templates": "paper", "data_class_names": "paper",
        "data_listing": "sorted", "data_test_split": "holdout", "model_name": "vit-b-16", "model_pretrained": "openai",
        "train_recipe": "domain_shift/pacs", "train_formulation": "paper",
        # zero-shot once per held-out domain (no seed), each trained method once per seed; no selection grid here
        "train_grid": [cell for d in domains for cell in
                       [{"method": "zeroshot", "test_domain": d, "hparams": {}, "name": "zeroshot"}]
                       + [{"method": m, "test_domain": d, "seed": s, "hparams": {}, "name": m} for m in ("erm", "clipood", "alignclip") for s in (0, 1)]],
        "train_seeds": [0, 1], "train_steps": 5000, "train_epochs": 0, "train_batch_size": 36, "train_lr": 5e-6, "train_hflip": True,
        "mlflow_tracking_uri": "http://mlflow.alignclip:5000", "mlflow_experiment": "domain-shift",
    }
    spec, platform = call["docs"]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert train["image"] == "registry.example/alignclip:0.1.0"
    accelerator = train["resources"]["accelerator"]
    assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "2")
    assert (train["resources"]["resourceCpuRequest"], train["resources"]["resourceMemoryRequest"]) == ("12", "96G")
    assert train["resources"]["resourceCpuLimit"] == "12"
    assert executors["exec-train"]["nodeSelector"]["labels"] == {"pool": "h200"}
    assert executors["exec-train"]["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}]
    (loop_task,) = [t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
    assert loop_task["iteratorPolicy"]["parallelismLimit"] == 4


@pytest.mark.parametrize("case", ["refused", "malformed", "silent"])
def test_submit_to_an_unreachable_host_is_one_line_in_seconds(case):
    # kfp.Client alone ends in a urllib3 traceback, or waits without end on a host that never answers
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel accepts the connection; nothing ever answers
        host, expected = {
            "refused": (f"http://127.0.0.1:{free_port()}", "Connection refused"),
            "malformed": ("http://kfp:port", "not a URL"),
            "silent": (f"http://127.0.0.1:{silent.getsockname()[1]}", "no answer within 5 s"),
        }[case]
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "alignclip", "pipeline", "submit", "domain_shift", "--host", host,
                               "--image", "ghcr.io/me/alignclip:1"], capture_output=True, text=True, timeout=60)
        took = time.monotonic() - start
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"error: --host {host}: ") and expected in lines[0], lines[0]
    assert took < 30  # the interpreter and kfp's import, plus at most the 5 s probe


def test_the_host_probe_leaves_http_answers_to_kfp_but_not_a_down_api():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(int(self.path.split("/")[1]))  # /404/apis/v2beta1/healthz answers 404
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        # 401/404: e.g. a sign-in proxy in front of the API, which kfp may hold a token for
        assert kfp_client.check_kfp_host(f"{base}/404/") == f"{base}/404"
        with pytest.raises(ConfigError, match="answered HTTP 503"):
            kfp_client.check_kfp_host(f"{base}/503")
    finally:
        server.shutdown()
        server.server_close()


def test_dry_run_prints_every_task(capsys):
    from alignclip.cli import main

    sys_argv = ["alignclip", "pipeline", "run", "wild", "--dry-run", "--param", "train_methods=alignclip", "--param", "train_seeds=0"]
    old, sys.argv = sys.argv, sys_argv
    try:
        with pytest.raises(SystemExit):
            main()
    finally:
        sys.argv = old
    lines = capsys.readouterr().out.splitlines()
    trains = [line for line in lines if line.startswith("train ")]
    assert len(trains) == 4 and "--test-domain 'Real World'" in trains[-1] and "--lr 3e-06" in trains[-1]
    assert sum(line.startswith("evaluate ") for line in lines) == 4 and lines[2].startswith("prepare: alignclip prepare office_home")
    # the first task and the last: the MLflow parent run (none without a tracking URI) and the report
    assert lines[1] == "mlflow parent: none (mlflow_tracking_uri is empty: no tracking)"
    assert lines[-1] == "report: alignclip report <collected results> <report> --prepared-dir <prepared> --similarity-dir <matrix>"


@pytest.mark.slow  # compiles the `all` composite (every family): the costliest compile
def test_every_family_compiles_with_its_protocol(tmp_path):
    from alignclip.protocols import PROTOCOLS

    expected = {"domain_shift": "domainbed", "imagenet": "imagenet", "base2new": "base2new", "wild": "wild"}
    for family, protocol in expected.items():
        spec = package_docs(compile_pipeline(family, tmp_path / f"{family}.yaml"))[0]
        assert spec["pipelineInfo"]["name"] == f"alignclip-{family.replace('_', '-')}"
        defaults = spec["root"]["inputDefinitions"]["parameters"]
        assert defaults["data_protocol"]["defaultValue"] == protocol and protocol in PROTOCOLS
        assert {"prepare", "similarity", "report"} <= set(spec["root"]["dag"]["tasks"])
    spec = package_docs(compile_pipeline("all", tmp_path / "all.yaml"))[0]
    protocols = {t["inputs"]["parameters"]["data_protocol"]["runtimeValue"]["constant"] for t in spec["root"]["dag"]["tasks"].values()}
    assert protocols == set(expected.values())  # every family, one sub-pipeline per dataset


@pytest.mark.slow
@pytest.mark.skipif(demo_dag.docker_unavailable() is None, reason="a Docker daemon is reachable: the demo DAG runs in "
                    "containers (tests/test_image.py), with the same settings and checks (tests/demo_dag.py)")
def test_local_runner_runs_the_whole_dag_and_mlflow_holds_the_runs(tmp_path):
    """`alignclip pipeline run demo` (kfp's SubprocessRunner) with tests/demo_dag.py's settings; its checks."""
    from pathlib import Path

    from alignclip.tracking import provenance

    db = tmp_path / "mlflow.db"
    env = dict(os.environ, ALIGNCLIP_LOG_LEVEL="WARNING", HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "alignclip", "pipeline", "run", "demo", "--pipeline-root", str(tmp_path / "kfp"),
           "--params-file", os.path.join(ROOT, "params.yaml"), *demo_dag.param_options(f"sqlite:///{db}")]
    # cwd: a sqlite tracking store keeps artifacts in ./mlruns of the working directory
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    demo_dag.check_runs(tmp_path / "kfp", db, provenance.checkout_commit(Path(ROOT)))  # HEAD, -dirty when changed


def test_the_demo_dags_settings_are_what_pipeline_run_resolves(capsys):
    """tests/demo_dag.py's arguments for the compiled package (the DockerRunner DAG) are those `alignclip pipeline
    run` resolves from the same options (the SubprocessRunner DAG): both runners run one DAG."""
    from alignclip.cli import main

    old, sys.argv = sys.argv, ["alignclip", "pipeline", "run", "demo", "--dry-run", "--params-file",
                               os.path.join(ROOT, "params.yaml"), *demo_dag.param_options("sqlite:///x.db")]
    try:
        with pytest.raises(SystemExit) as done:
            main()
    finally:
        sys.argv = old
    assert done.value.code in (0, None)
    printed = json.loads(capsys.readouterr().out.splitlines()[0].split(": ", 1)[1])
    from alignclip_kfp.arguments import pipeline_arguments

    assert pipeline_arguments("demo", printed) == demo_dag.pipeline_arguments("sqlite:///x.db")
    cells = demo_dag.pipeline_arguments("")["train_grid"]
    assert sorted((c["method"], c["test_domain"]) for c in cells) == [(demo_dag.VARIANT, d) for d in demo_dag.DOMAINS]


def test_backbones_runs_fig5_as_one_pipeline(tmp_path):
    """Paper fig. 5: zero-shot, CLIPood and AlignCLIP with CLIP-RN50 and ViT-B/32 on Office-Home, domain shift and
    unseen classes: one package, one sub-pipeline per (backbone, protocol), each compiled with its own defaults."""
    from alignclip.config import COMPOSITES

    spec = package_docs(compile_pipeline("backbones", tmp_path / "backbones.yaml"))[0]
    assert spec["pipelineInfo"]["name"] == "alignclip-backbones"
    assert len(spec["root"]["dag"]["tasks"]) == 4
    seen = set()
    for family in COMPOSITES["backbones"].families:
        sub = package_docs(compile_pipeline(family, tmp_path / f"{family}.yaml"))[0]
        d = {name: p.get("defaultValue") for name, p in sub["root"]["inputDefinitions"]["parameters"].items()}
        seen.add((d["model_name"], d["data_protocol"]))
        assert (d["data_dataset"], d["model_pretrained"], d["mlflow_experiment"]) == ("office_home", "openai", "other-backbones")
        assert d["train_recipe"] == {"domainbed": "domain_shift/office_home", "wild": "wild/office_home"}[d["data_protocol"]]
        assert {c["method"] for c in d["train_grid"]} == {"zeroshot", "clipood", "alignclip"}
    assert seen == {(m, p) for m in ("rn50", "vit-b-32") for p in ("domainbed", "wild")}


def test_a_local_data_root_is_named_before_a_cluster_run_and_embedded_shows_its_build():
    """`data/rotated_digits` (the demo's DVC root) does not exist in a pod: compile/submit say so. With `embedded`
    the dry run shows what the prepare task really runs: the build into its artifact, then prepare on it."""
    def dry(*extra):
        return subprocess.run([sys.executable, "-m", "alignclip", "pipeline", "submit", "demo", "--dry-run", *extra],
                              capture_output=True, text=True)

    local = dry()
    assert local.returncode == 0 and "data.root 'data/rotated_digits' is a path on this machine" in local.stderr
    embedded = dry("--data-root", "embedded")
    assert embedded.returncode == 0 and "path on this machine" not in embedded.stderr
    prepare = [line for line in embedded.stdout.splitlines() if line.startswith("prepare:")]
    assert prepare[0] == "prepare: alignclip data digits <prepared>/images"
    assert prepare[1].startswith("prepare: alignclip prepare rotated_digits <prepared>/images <prepared> ")
    assert "path on this machine" not in dry("--data-root", "s3://bucket/digits").stderr


# the paper's tables, written out from the paper (tables 1-4) independently of alignclip/config.py
TABLES = {
    "domainbed": {"pacs", "vlcs", "office_home", "terra_incognita", "domain_net"},
    "base2new": {"imagenet", "caltech101", "oxford_pets", "stanford_cars", "flowers102", "food101", "fgvc_aircraft",
                 "sun397", "dtd", "eurosat", "ucf101"},
    "imagenet": {"imagenet"},
    "wild": {"office_home", "domain_net"},
}


def _sub_pipelines(spec):
    """Root tasks of a composite: name -> (constant inputs, parallelism limit of its grid loop, dependencies)."""
    found = {}
    for name, task in spec["root"]["dag"]["tasks"].items():
        inputs = {k: v["runtimeValue"]["constant"] for k, v in task["inputs"]["parameters"].items() if "runtimeValue" in v}
        inner = spec["components"][task["componentRef"]["name"]]["dag"]["tasks"]
        (loop,) = [t for t in inner.values() if "parameterIterator" in t]
        found[name] = (inputs, loop["iteratorPolicy"]["parallelismLimit"], task.get("dependentTasks", []), task.get("triggerPolicy"))
    return found


@pytest.mark.slow  # compiles the `all` composite (every family): the costliest compile
def test_all_runs_every_dataset_of_the_papers_tables_under_one_data_prefix(tmp_path, capsys):
    from alignclip.cli import main

    out = tmp_path / "all.yaml"
    old, sys.argv = sys.argv, ["alignclip", "pipeline", "compile", "all", "-o", str(out), "--data-root", "s3://bucket/prefix/"]
    try:
        with pytest.raises(SystemExit) as done:
            main()
    finally:
        sys.argv = old
    assert done.value.code == 0, capsys.readouterr()
    subs = _sub_pipelines(package_docs(out)[0])
    seen = {}
    for inputs, _, _, _ in subs.values():
        seen.setdefault(inputs["data_protocol"], set()).add(inputs["data_dataset"])
        assert inputs["data_root"] == f"s3://bucket/prefix/{inputs['data_dataset']}"
    assert seen == TABLES and len(subs) == sum(len(v) for v in TABLES.values())


# `all` compiles every family: slow (make test); the backbones composite proves the same rule in the fast tier
@pytest.mark.parametrize("composite, budget", [pytest.param("all", 1, marks=pytest.mark.slow), pytest.param("all", 8, marks=pytest.mark.slow), ("backbones", 3)])
def test_a_composite_never_allows_more_gpu_pods_at_once_than_max_parallelism(composite, budget, tmp_path):
    """Sub-pipelines form chains (each after the previous, failed or not); chains run at once. The most GPU pods at
    once is the sum over chains of the largest grid parallelism in each: at most the budget."""
    path = compile_pipeline(composite, tmp_path / "c.yaml", cluster_settings(max_parallelism=budget))
    subs = _sub_pipelines(package_docs(path)[0])
    dependants = {}
    for name, (_, _, after, trigger) in subs.items():
        assert len(after) <= 1  # a chain: one predecessor at most ...
        for previous in after:
            dependants.setdefault(previous, []).append(name)
            assert trigger == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}  # a failed benchmark does not stop the rest
    assert all(len(v) == 1 for v in dependants.values())  # ... and one successor at most
    heads = [name for name, (_, _, after, _) in subs.items() if not after]
    widest = 0
    for head in heads:
        chain, name = [], head
        while name:
            chain.append(name)
            name = (dependants.get(name) or [None])[0]
        widest += max(subs[n][1] for n in chain)
    assert sum(1 for _ in heads) >= 1 and widest <= budget
    assert widest == budget or len(subs) < budget  # the budget is used, not wasted


def test_gpu_tasks_have_no_default_node_selector_and_shm_is_half_the_memory(tmp_path):
    def gpu_executors(cluster):
        path = compile_pipeline("demo", tmp_path / "p.yaml", cluster)
        _, platform = package_docs(path)
        executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        return [executors[n] for n in ("exec-train", "exec-evaluate")]

    for executor in gpu_executors(cluster_settings()):
        assert "nodeSelector" not in executor  # the nvidia.com/gpu request places the pod
        assert executor["emptyDirMounts"][0]["sizeLimit"] == "16G"  # half of the default 32G
    for memory, shm in (("64Gi", "32Gi"), ("90G", "45G"), ("3G", f"{int(1.5e9 // 2**20)}Mi")):
        assert [e["emptyDirMounts"][0]["sizeLimit"] for e in gpu_executors(cluster_settings(memory=memory))] == [shm] * 2


class FollowedClient(StubClient):
    """kfp.Client whose run goes through scripted states (``get_run``), as `submit --wait` polls it."""

    script = []

    def get_run(self, run_id):
        assert run_id == "run-123"
        state, tasks = FollowedClient.script.pop(0)
        task = lambda i, name, st: type("Task", (), {"task_id": str(i), "display_name": name, "state": st, "create_time": str(i)})()  # noqa: E731
        details = type("Details", (), {"task_details": [task(i, n, st) for i, (n, st) in enumerate(tasks)]})()
        return type("Run", (), {"state": state, "run_details": details})()


@pytest.mark.parametrize("final, code", [("SUCCEEDED", 0), ("FAILED", 1)])
def test_submit_wait_follows_the_run_and_exits_with_its_result(final, code, monkeypatch, capsys):
    import kfp

    from alignclip.cli import main

    monkeypatch.setattr(kfp, "Client", FollowedClient)
    monkeypatch.setattr(kfp_client, "check_kfp_host", lambda host: host)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    FollowedClient.script = [
        ("PENDING", []),
        ("RUNNING", [("prepare", "RUNNING")]),
        ("RUNNING", [("prepare", "SUCCEEDED"), ("train", "RUNNING")]),
        ("RUNNING", [("prepare", "SUCCEEDED"), ("train", "RUNNING")]),  # no change: nothing printed
        (final, [("prepare", "SUCCEEDED"), ("train", final)]),
    ]
    monkeypatch.setattr(sys, "argv", ["alignclip", "pipeline", "submit", "demo", "--host", "http://kfp.example:8080",
                                      "--data-root", "embedded", "--image", "registry.example/alignclip:0.1.0", "--wait"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == code
    assert capsys.readouterr().out.splitlines() == [
        "http://kfp.example:8080/#/runs/details/run-123", "  prepare: RUNNING", "  prepare: SUCCEEDED",
        "  train: RUNNING", f"  train: {final}", f"run run-123: {final}"]
    assert FollowedClient.script == []


def test_follow_gives_up_when_the_api_stops_answering():
    class Gone:
        def get_run(self, run_id):
            raise ConnectionError("port-forward closed")

    lines = []
    assert kfp_client.follow_run(Gone(), "r", lines.append, poll_s=0, sleep=lambda s: None, attempts=3) == 2
    assert lines == ["run r: the KFP API stopped answering (port-forward closed); the run goes on"]
