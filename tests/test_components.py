"""Unit tests of the KFP components (alignclip_kfp.components): each component's Python function is called directly,
as a task's executor calls it, with kfp's own artifact types on small files, without a KFP runner. The `alignclip`
CLI call is replaced by a stand-in that records the command and writes what that stage writes, so what is checked
is the component's own work: the command it builds, the environment it gives it, and what it makes of the stage's
outputs (inlined images, metrics, the report's input tree). The CLI stages themselves have their own tests; the
whole DAG runs in tests/test_pipeline.py. The runtime's SIGTERM forwarding runs a real child process."""

import base64
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("kfp")

from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model  # noqa: E402

from alignclip import artifacts  # noqa: E402
from alignclip_kfp.components import runtime, stages  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))  # any bytes: the components inline files, they do not parse them


class FakeCLI:
    """Stands in for ``runtime.run_cli``: records (args, env) and writes each stage's outputs."""

    def __init__(self, write=None):
        self.calls = []
        self.write = write or (lambda args: None)

    def __call__(self, *args, env=None):
        self.calls.append(([str(a) for a in args], env))
        self.write([str(a) for a in args])


@pytest.fixture
def cli(monkeypatch):
    def install(write=None):
        fake = FakeCLI(write)
        monkeypatch.setattr(runtime, "run_cli", fake)
        return fake

    return install


@pytest.fixture
def parent_run(tmp_path):
    path = tmp_path / "parent-run"
    path.write_text("run-123\n")  # as start_run writes it (a trailing newline must not reach the id)
    return Artifact(uri=str(path))


def test_the_functions_tested_are_the_compiled_components():
    built = stages.build_components("registry.example/alignclip:test")
    for function in stages.FUNCTIONS:
        assert getattr(built, function.__name__).python_func is function


def test_start_run_without_tracking_hands_on_an_empty_run_id(tmp_path):
    run = Artifact(uri=str(tmp_path / "run"))
    stages.start_run(experiment="e", tracking_uri="", run_name="kfp demo", params_json="{}", run=run, kfp_run_id="k")
    assert (tmp_path / "run").read_text() == "" and run.metadata == {"run_id": ""}


def test_start_run_opens_the_parent_run_left_running_with_the_kfp_run_id(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = Artifact(uri=str(tmp_path / "run"))
    params = {"dataset": "rotated_digits", "protocol": "domainbed", "model": "tiny"}
    stages.start_run(experiment="components", tracking_uri=uri, run_name="kfp demo: rotated_digits (domainbed)",
                     params_json=json.dumps(params), run=run, kfp_run_id="kfp-run-7")
    run_id = (tmp_path / "run").read_text()
    assert run_id and run.metadata == {"run_id": run_id}
    opened = MlflowClient(uri).get_run(run_id)
    assert opened.info.status == "RUNNING"  # the report ends it
    assert opened.info.run_name == "kfp demo: rotated_digits (domainbed)"
    assert {k: opened.data.tags[k] for k in ("orchestrator", "kfp_run_id")} == {"orchestrator": "kfp", "kfp_run_id": "kfp-run-7"}
    assert {k: opened.data.params[k] for k in params} == params


PREPARE = dict(dataset="rotated_digits", protocol="domainbed", holdout_fraction=0.2, trial_seed=3, shots=0,
               seeds=[0, 1], templates="paper", class_names="paper", listing="sorted")


def _prepare_tail(root, out):
    return ["prepare", "rotated_digits", root, out, "--protocol", "domainbed", "--holdout-fraction", "0.2",
            "--trial-seed", "3", "--shots", "0", "--templates", "paper", "--class-names", "paper", "--listing",
            "sorted", "--seed", "0", "--seed", "1"]


def test_prepare_builds_embedded_digits_inside_its_artifact_then_prepares_them(cli, tmp_path):
    fake = cli()
    prepared = Dataset(uri=str(tmp_path / "prepared"))
    stages.prepare(root="embedded", prepared=prepared, **PREPARE)
    images = f"{tmp_path}/prepared/images"
    assert [args for args, _ in fake.calls] == [["data", "digits", images], _prepare_tail(images, str(tmp_path / "prepared"))]
    assert prepared.metadata == {"dataset": "rotated_digits"}


def test_prepare_reads_a_given_root_as_it_is(cli, tmp_path):
    fake = cli()
    stages.prepare(root="s3://bucket/rotated digits", prepared=Dataset(uri=str(tmp_path / "p")), **PREPARE)
    assert [args for args, _ in fake.calls] == [_prepare_tail("s3://bucket/rotated digits", str(tmp_path / "p"))]


def _writes(name, content, out_at=2):
    """A stage that writes ``name`` into its output folder, the ``out_at``-th argument of its command."""

    def write(args):
        os.makedirs(args[out_at], exist_ok=True)
        with open(os.path.join(args[out_at], name), "wb" if isinstance(content, bytes) else "w") as handle:
            handle.write(content)

    return write


def test_similarity_runs_in_the_parent_run_and_inlines_its_heatmap(cli, tmp_path, parent_run):
    fake = cli(_writes(artifacts.SIMILARITY_HEATMAP, PNG))
    matrix, heatmap = Artifact(uri=str(tmp_path / "matrix")), Markdown(uri=str(tmp_path / "heatmap.md"))
    stages.similarity(prepared=Dataset(uri="/prep"), model_name="vit-b-16", pretrained="openai", experiment="exp",
                      tracking_uri="http://mlflow:5000", parent_run=parent_run, matrix=matrix, heatmap=heatmap)
    ((args, env),) = fake.calls
    assert args == ["similarity", "/prep", str(tmp_path / "matrix"), "--model", "vit-b-16", "--pretrained", "openai"]
    assert (env["ALIGNCLIP_PARENT_RUN_ID"], env["ALIGNCLIP_EXPERIMENT"], env["MLFLOW_TRACKING_URI"]) == ("run-123", "exp", "http://mlflow:5000")
    shown = (tmp_path / "heatmap.md").read_text()
    assert shown == f"# Class similarity\n\n![similarity](data:image/png;base64,{base64.b64encode(PNG).decode()})\n"
    assert base64.b64decode(shown.split("base64,")[1].split(")")[0]) == PNG


TRAIN = dict(formulation="paper", recipe="demo", steps=5, epochs=0, batch_size=8, lr=3e-4, hflip=True,
             model_name="tiny", pretrained="none", experiment="exp", tracking_uri="")


def test_train_runs_its_cell_with_every_setting_explicit_and_labels_the_model(cli, tmp_path, parent_run):
    fake = cli()
    cell = {"method": "alignclip", "test_domain": "rotated_30", "seed": 1, "hparams": {"lr": 0.001}, "name": "alignclip[lr=0.001]"}
    model = Model(uri=str(tmp_path / "model"))
    stages.train(prepared=Dataset(uri="/prep"), matrix=Artifact(uri="/matrix"), cell=cell, parent_run=parent_run,
                 model=model, **TRAIN)
    ((args, env),) = fake.calls
    assert args == ["train", "/prep", str(tmp_path / "model"), "--method", "alignclip", "--seed", "1",
                    "--hparam", "lr=0.001", "--formulation", "paper", "--model", "tiny", "--pretrained", "none",
                    "--no-progress", "--similarity", "/matrix/similarity.pt", "--num-workers", "auto",
                    "--recipe", "demo", "--batch-size", "8", "--hflip", "--steps", "5",  # lr: the cell's --hparam alone
                    "--test-domain", "rotated_30"]
    assert env["ALIGNCLIP_PARENT_RUN_ID"] == "run-123"
    assert env.get("MLFLOW_TRACKING_URI") == os.environ.get("MLFLOW_TRACKING_URI")  # no URI given: none imposed
    assert model.metadata == {"method": "alignclip", "test_domain": "rotated_30", "seed": "1",
                              "hparams": "{'lr': 0.001}", "name": "alignclip[lr=0.001]"}


def test_train_of_a_zero_shot_cell_passes_no_training_setting_and_epochs_replace_steps(cli, tmp_path, parent_run):
    fake = cli()
    zeroshot = {"method": "zeroshot", "test_domain": "rotated_30", "hparams": {}, "name": "zeroshot"}
    erm = {"method": "erm", "test_domain": "", "seed": 0, "hparams": {}, "name": "erm"}
    for cell in (zeroshot, erm):
        stages.train(prepared=Dataset(uri="/prep"), matrix=Artifact(uri="/m"), cell=cell, parent_run=parent_run,
                     model=Model(uri=str(tmp_path / cell["name"])), **{**TRAIN, "steps": 0, "epochs": 2})
    (zero_args, _), (erm_args, _) = fake.calls
    assert zero_args[-2:] == ["--test-domain", "rotated_30"]
    assert not {"--recipe", "--lr", "--batch-size", "--steps", "--epochs", "--seed"} & set(zero_args)
    assert erm_args[erm_args.index("--hflip") + 1:] == ["--epochs", "2"]  # no held-out domain: none passed


def _cell_model(folder, accuracy):
    """A trained cell's model artifact as train leaves it."""
    folder.mkdir(parents=True)
    (folder / artifacts.MODEL).write_bytes(b"weights " + str(accuracy).encode())
    (folder / artifacts.TRAIN_SUMMARY).write_text(json.dumps({"accuracy": accuracy}))
    (folder / artifacts.TRAIN_LOG).write_text("step,loss\n1,0.5\n")
    return Model(uri=str(folder))


def test_evaluate_logs_every_view_and_derived_metric_and_returns_the_headline(cli, tmp_path, parent_run):
    summary = {"protocol": "base2new", "views": {"base": {"accuracy": 80.0}, "new": {"accuracy": 60.0}},
               "headline": {"metric": "H", "value": 2 * 80.0 * 60.0 / (80.0 + 60.0)}}
    fake = cli(_writes(artifacts.METRICS, json.dumps(summary), out_at=3))
    model = _cell_model(tmp_path / "model", 70.0)
    metrics, results = Metrics(uri=str(tmp_path / "metrics")), Artifact(uri=str(tmp_path / "results"))
    headline = stages.evaluate(prepared=Dataset(uri="/prep"), model=model, test_split="test", experiment="exp",
                               tracking_uri="", parent_run=parent_run, metrics=metrics, results=results)
    ((args, _),) = fake.calls
    assert args == ["evaluate", "/prep", str(tmp_path / "model" / artifacts.MODEL), str(tmp_path / "results"),
                    "--test-split", "test", "--num-workers", "auto"]
    # H: the harmonic mean of base and new, written out here
    assert metrics.metadata == pytest.approx({"base_acc_pct": 80.0, "new_acc_pct": 60.0, "H_pct": 2 * 80 * 60 / 140})
    assert headline == pytest.approx(68.5714286)
    for name in (artifacts.TRAIN_SUMMARY, artifacts.TRAIN_LOG):  # the report reads them beside the metrics
        assert (tmp_path / "results" / name).read_bytes() == (tmp_path / "model" / name).read_bytes()


def test_evaluate_returns_nan_when_the_headline_view_had_no_images(cli, tmp_path, parent_run):
    summary = {"protocol": "domainbed", "views": {"test": {"accuracy": 50.0}}, "headline": None}
    cli(_writes(artifacts.METRICS, json.dumps(summary), out_at=3))
    headline = stages.evaluate(prepared=Dataset(uri="/prep"), model=_cell_model(tmp_path / "model", 1.0),
                               test_split="test", experiment="exp", tracking_uri="", parent_run=parent_run,
                               metrics=Metrics(uri=str(tmp_path / "m")), results=Artifact(uri=str(tmp_path / "r")))
    assert math.isnan(headline)


def test_report_links_every_checkpoint_inlines_the_figures_and_averages_the_accuracies(cli, tmp_path, parent_run):
    models = [_cell_model(tmp_path / f"model{i}", acc) for i, acc in enumerate((70.0, 90.0))]
    results = []
    for i in range(2):
        (tmp_path / f"results{i}").mkdir()
        (tmp_path / f"results{i}" / artifacts.METRICS).write_text(json.dumps({"cell": i}))
        results.append(Artifact(uri=str(tmp_path / f"results{i}")))
    seen = {}

    def write(args):
        collected, out = args[1], args[2]
        for i in range(2):  # the tree the report reads: results copied, checkpoints linked, summaries copied
            seen[i] = (json.loads(open(f"{collected}/results/{i:03d}/{artifacts.METRICS}").read()),
                       os.readlink(f"{collected}/models/{i:03d}/{artifacts.MODEL}"),
                       open(f"{collected}/models/{i:03d}/{artifacts.TRAIN_SUMMARY}").read())
        os.makedirs(out)
        open(os.path.join(out, "accuracy.png"), "wb").write(PNG)
        open(os.path.join(out, artifacts.REPORT_PAGE), "w").write("<h1>r</h1><img src='accuracy.png'>")
        open(os.path.join(out, artifacts.REPORT_MARKDOWN), "w").write("| method | acc |\n")

    fake = cli(write)
    page, tables, bundle = HTML(uri=str(tmp_path / "page.html")), Markdown(uri=str(tmp_path / "t.md")), Artifact(uri=str(tmp_path / "bundle"))
    stages.report(results=results, models=models, accuracies=[70.0, 90.0], prepared=Dataset(uri="/prep"),
                  matrix=Artifact(uri="/matrix"), experiment="exp", tracking_uri="", parent_run=parent_run,
                  page=page, tables=tables, bundle=bundle)
    ((args, env),) = fake.calls
    assert args[0] == "report" and args[2] == f"{tmp_path}/bundle/report"
    assert args[3:] == ["--prepared-dir", "/prep", "--similarity-dir", "/matrix"] and env["ALIGNCLIP_PARENT_RUN_ID"] == "run-123"
    for i in range(2):
        assert seen[i] == ({"cell": i}, str(tmp_path / f"model{i}" / artifacts.MODEL),
                           (tmp_path / f"model{i}" / artifacts.TRAIN_SUMMARY).read_text())
    assert (tmp_path / "page.html").read_text() == f"<h1>r</h1><img src='data:image/png;base64,{base64.b64encode(PNG).decode()}'>"
    assert (tmp_path / "t.md").read_text() == "| method | acc |\n"
    assert bundle.metadata == {"mean_accuracy": 80.0}
    assert not os.path.exists(args[1])  # the scratch tree is gone (the local runner left one per run in /tmp)


def test_task_env_carries_the_parent_run_and_the_tracking_server(tmp_path, parent_run):
    env = runtime.task_env(parent_run.path, "exp", "http://mlflow:5000")
    assert (env["ALIGNCLIP_PARENT_RUN_ID"], env["ALIGNCLIP_EXPERIMENT"], env["MLFLOW_TRACKING_URI"]) == ("run-123", "exp", "http://mlflow:5000")
    assert env["PATH"] == os.environ["PATH"]  # the rest of the task's environment (credentials, endpoints) goes on


def test_run_cli_fails_the_task_with_the_stages_exit_code():
    with pytest.raises(subprocess.CalledProcessError) as failed:
        runtime.run_cli("no-such-command")
    assert failed.value.returncode == 2 and failed.value.cmd[1:4] == ["-m", "alignclip", "no-such-command"]


def test_the_pods_sigterm_reaches_the_stage(tmp_path):
    """Kubernetes stops a pod with SIGTERM to the task's process: the stage (the child) must hear it, to write its
    resume checkpoint. Run in a fresh interpreter: the test sends SIGTERM to that process, not to pytest."""
    heard, ready = tmp_path / "heard", tmp_path / "ready"
    child = textwrap.dedent(f"""
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: (open({str(heard)!r}, "w").write("SIGTERM"), sys.exit(3)))
        task = os.getppid()
        open({str(ready)!r}, "w").close()
        while os.getppid() == task:  # until the signal comes, or the task is gone without passing it on
            time.sleep(0.05)
    """)
    task = textwrap.dedent(f"""
        import os, signal, subprocess, sys, threading, time
        from alignclip_kfp.components.runtime import run_forwarding_sigterm

        def stop_the_pod():
            while not os.path.exists({str(ready)!r}):
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=stop_the_pod, daemon=True).start()
        try:
            run_forwarding_sigterm([sys.executable, "-c", {child!r}])
        except subprocess.CalledProcessError as err:
            print("exit", err.returncode, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    """)
    with open(tmp_path / "out", "w") as out:  # not a pipe: an orphaned child holding it would keep run() waiting
        done = subprocess.run([sys.executable, "-c", task], stdout=out, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert done.returncode == 0, (tmp_path / "out").read_text()
    assert heard.read_text() == "SIGTERM"
    assert (tmp_path / "out").read_text().split() == ["exit", "3", "True"]  # the child's code fails the task; the handler is restored
