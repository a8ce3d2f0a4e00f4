"""The one configuration model: params.yaml is the schema rendered, one precedence rule, bad settings end in one
line and exit 2 before any work, and a grid cell trains with the same settings via the CLI, DVC and KFP."""

import json
import os
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.kfp_package import package_docs

from alignclip.config import (
    BY_NAME, FAMILIES, GRID_KEYS, SIMILARITY_KEYS, TRAIN_KEYS, ZEROSHOT_KEYS, ConfigError, effective_train, grid, parse_assignments, render_params, resolve,
)

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args, capsys, cwd=None):
    """`alignclip ARGS` in this process through the entry point (`main`, the one that turns errors into a line)."""
    from alignclip.cli import main

    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["alignclip", *map(str, args)]
    try:
        if cwd:
            os.chdir(cwd)
        try:
            main()
            code = 0
        except SystemExit as done:
            code = done.code or 0
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    out, err = capsys.readouterr()
    return code, out, err


# -- the schema and params.yaml -------------------------------------------------------------------------------------


def test_params_yaml_is_the_schema_rendered_for_the_demo():
    assert (ROOT / "params.yaml").read_text() == render_params(resolve("demo"))


def test_params_yaml_reads_back_as_the_demo_settings():
    from alignclip.config import load_params_file

    values = resolve("demo")
    assert load_params_file(ROOT / "params.yaml") == {k: v for k, v in values.items() if not BY_NAME[k].kfp_only}


def test_lists_accept_json_and_comma_separated_forms():
    assert parse_assignments(["train_methods=erm"])["train_methods"] == ["erm"]  # not the letters e, r, m
    assert parse_assignments(['train.test_domains=["Art", "Real World"]']) == parse_assignments(["train_test_domains=Art,Real World"])
    assert parse_assignments(["train_seeds=[0, 1]"])["train_seeds"] == parse_assignments(["train_seeds=0,1"])["train_seeds"] == [0, 1]
    with pytest.raises(ConfigError, match="malformed JSON list"):
        parse_assignments(["train_seeds=[0, 1"])
    with pytest.raises(ConfigError, match="train.seeds=.x.: expected an integer"):
        parse_assignments(["train_seeds=0,x"])


def test_type_errors_read_as_english():
    with pytest.raises(ConfigError, match="train.steps='abc': expected an integer$"):
        parse_assignments(["train_steps=abc"])
    with pytest.raises(ConfigError, match="train.lr='fast': expected a number$"):
        parse_assignments(["train_lr=fast"])
    with pytest.raises(ConfigError, match="train.seeds=3: expected a list of integers"):
        resolve("demo", overrides={"train_seeds": 3})


# -- precedence: method defaults < recipe < family < params file < explicit -----------------------------------------


def test_family_defaults_are_the_papers_setting_for_the_dataset():
    values = resolve("domain_shift")
    # domain_shift/office_home of the released scripts: lr 1e-5, 10 epochs x 500 iterations, 36 images per domain
    assert effective_train(values) == {"recipe": "domain_shift/office_home", "lr": 1e-5, "batch_size": 36, "steps": 5000,
                                       "epochs": None, "iters_per_epoch": None, "hflip": True,
                                       "method_switches": {"margin_alpha": 0.3, "bma_beta": 0.5}, "shots": None}
    assert values["model_name"] == "vit-b-16" and values["model_pretrained"] == "openai"
    assert values["train_methods"] == ["zeroshot", "erm", "clipood", "alignclip"] and values["train_seeds"] == [0, 1, 2]
    assert values["train_test_domains"] == ["Art", "Clipart", "Product", "Real World"]


def test_choosing_a_dataset_brings_its_domains_and_recipe():
    values = resolve("domain_shift", overrides={"data_dataset": "pacs", "data_root": "s3://bucket/pacs"})
    assert values["train_recipe"] == "domain_shift/pacs"
    assert values["train_test_domains"] == ["art_painting", "cartoon", "photo", "sketch"]
    assert len(grid(values)) == 4 * (1 + 3 * 3)  # zero-shot once per held-out domain, the others per seed
    assert resolve("domain_shift", overrides={"data_dataset": "vlcs"})["data_root"] == "s3://alignclip-data/vlcs"  # not office_home's
    wild = resolve("wild", overrides={"data_dataset": "domain_net"})
    assert wild["train_recipe"] == "wild/domain_net" and len(wild["train_test_domains"]) == 6
    pets = resolve(None, overrides={"data_dataset": "eurosat"})
    assert pets["data_protocol"] == "base2new" and pets["train_recipe"] == "base2new/eurosat" and pets["train_test_domains"] == [""]


def test_another_dataset_replaces_what_the_family_chose_for_its_own(capsys):
    # demo holds out two of RotatedDigits' domains with its recipe; PACS brings its four and its benchmark recipe
    code, out, err = run_cli(["config", "show", "demo", "--dataset", "pacs"], capsys)
    assert code == 0, err
    shown = yaml.safe_load(out)["train"]
    assert shown["test_domains"] == ["art_painting", "cartoon", "photo", "sketch"] and shown["recipe"] == "domain_shift/pacs"
    # the family's seeds and methods are not bound to its dataset; its selection grid (lr values for the demo
    # recipe's scale) is, so PACS trains its recipe's one setting per method
    assert shown["seeds"] == FAMILIES["demo"].defaults["train_seeds"] and shown["methods"] == FAMILIES["demo"].defaults["train_methods"]
    assert shown["grid"] == {} and shown["steps"] is None
    # what the user sets still wins, from the command line or a params file
    values = resolve("demo", overrides={"data_dataset": "pacs", "train_test_domains": "sketch", "train_recipe": "demo"})
    assert values["train_test_domains"] == ["sketch"] and values["train_recipe"] == "demo"
    assert resolve("demo", overrides={"data_dataset": "rotated_digits"})["train_test_domains"] == ["rotated_0", "rotated_75"]


def test_config_show_without_a_family_prints_the_schema_defaults(capsys):
    from alignclip.data.digits import ANGLES, domain_name
    from alignclip.data.registry import DATASETS

    # the registry names the domains `alignclip data digits` builds, so the default dataset resolves with no family
    assert DATASETS["rotated_digits"].domains == tuple(domain_name(a) for a in ANGLES)
    code, out, err = run_cli(["config", "show"], capsys)
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["data"]["dataset"] == "rotated_digits" and shown["model"]["name"] == "tiny"
    assert shown["train"]["test_domains"] == [domain_name(a) for a in ANGLES]
    assert shown["train"]["seeds"] == BY_NAME["train_seeds"].default  # no family's values


def test_params_file_beats_the_family_and_explicit_values_beat_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  lr: 2.0e-5\n  steps: 300\nmodel:\n  name: vit-b-32\n")
    values = resolve("domain_shift", path)
    train = effective_train(values)
    assert (train["lr"], train["steps"], train["batch_size"], values["model_name"]) == (2e-5, 300, 36, "vit-b-32")
    values = resolve("domain_shift", path, {"train_lr": "3e-5"})
    assert effective_train(values)["lr"] == 3e-5 and effective_train(values)["steps"] == 300


def test_unset_is_not_zero():
    assert effective_train(resolve("wild"))["steps"] == 5000  # unset: the recipe's 10 x 500
    with pytest.raises(ConfigError, match="train.steps=0: expected at least 1"):
        resolve("wild", overrides={"train_steps": 0})
    base2new = effective_train(resolve("base2new"))
    # the authors' trainopenclass.sh: OxfordPets --epochs 1 x main.py's 500 iterations, every base image
    assert (base2new["steps"], base2new["epochs"], base2new["iters_per_epoch"], base2new["shots"]) == (500, None, None, 0)
    assert effective_train(resolve("base2new", overrides={"train_steps": 40}))["epochs"] is None


def test_params_file_errors_name_the_file_and_the_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key train.stepz; expected one of train.recipe, "):
        resolve("demo", bad)
    bad.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.steps='many': expected an integer"):
        resolve("demo", bad)
    bad.write_text("trainer:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'trainer'"):
        resolve("demo", bad)


# -- bad input: one line, exit 2, before any work ---------------------------------------------------------------------


BAD = [
    (["train", "{prep}", "{tmp}/o", "--steps", "-5", "--dry-run"], "train.steps=-5: expected at least 1"),
    (["train", "{prep}", "{tmp}/o", "--batch-size", "100000", "--dry-run"], "train.batch_size=100000: expected at most 4096"),
    (["train", "{prep}", "{tmp}/o", "--set", "aligned_layers=abc", "--dry-run"], "--set aligned_layers='abc': expected an integer"),
    (["train", "{prep}", "{tmp}/o", "--set", "nosuch=1", "--dry-run"], "--set nosuch: unknown method switch"),
    (["train", "{prep}", "{tmp}/o", "--set", "tau=warm", "--dry-run"], "--set tau='warm': expected 'model' (the loaded CLIP's pre-trained temperature) or a positive number"),
    (["train", "{prep}", "{tmp}/o", "--set", "aal_tau=-1", "--dry-run"], "--set aal_tau=-1: expected 'model'"),
    (["prepare", "rotated_digits", "{tmp}", "{tmp}/p", "--template", "{0} {1}"], "expected exactly one {}"),
    (["prepare", "rotated_digits", "{tmp}", "{tmp}/p", "--template", "a photo"], "expected exactly one {}"),
    (["prepare", "rotated_digits", "{tmp}", "{tmp}/p", "--shots", "0"], "data.shots=0: expected at least 1"),
    (["prepare", "rotated_digits", "{tmp}", "{tmp}/afile"], "output folder {tmp}/afile is a file"),
    (["evaluate", "{prep}", "{tmp}/m.pt", "{tmp}/afile/sub"], "{tmp}/afile is a file, so the folder cannot be created"),
    (["pipeline", "compile", "domain_shift", "--param", "train_steps=-5"], "train.steps=-5: expected at least 1"),
    (["pipeline", "compile", "domain_shift", "--param", "train_methods=erm,alignclip+reelase"], "unknown method 'alignclip+reelase'"),
    (["pipeline", "compile", "domain_shift", "--param", "train_recipe=domain_shift/mnist"], "unknown recipe; expected one of paper, "),
    (["pipeline", "compile", "domain_shift", "--param", "train_batch_size=0"], "train.batch_size=0: expected at least 1"),
    (["pipeline", "compile", "domain_shift", "--param", "train_test_domains=Art,Mars"], "office_home has no domain 'Mars'"),
    (["pipeline", "compile", "nosuch"], "unknown pipeline family 'nosuch'"),
    (["pipeline", "submit", "domain_shift", "--dry-run", "--dataset", "pcas"], "unknown dataset 'pcas': expected one of caltech101, "),
    (["pipeline", "submit", "domain_shift", "--dry-run", "--dataset", "oxford_pets"],
     "dataset 'oxford_pets' supports base2new, not domainbed (family base2new)"),
    # -o names the package file: a folder gets no "pass --force" (which would not help)
    (["pipeline", "compile", "demo", "-o", "{tmp}"], "-o {tmp}: a directory; expected a .yaml file path"),
    (["pipeline", "compile", "demo", "-o", "{tmp}/afile/x.yaml"], "-o {tmp}/afile/x.yaml: folder {tmp}/afile is a file"),
    (["pipeline", "submit", "demo", "--param", "train_stepz=3"], "unknown setting 'train_stepz': expected one of data_dataset"),
    (["pipeline", "submit", "demo", "--params-file", "{tmp}/missing.yaml"], "params file {tmp}/missing.yaml not found"),
    (["pipeline", "submit", "domain_shift", "--host", "http://kfp:8080"], "is the built-in placeholder"),
    (["pipeline", "compile", "demo", "--toleration", "gpu:Sometimes"], "expected KEY[=VALUE][:EFFECT]"),
    (["pipeline", "compile", "demo", "--memory", "lots"], "--memory 'lots': expected a Kubernetes quantity"),
    (["--log-level", "verbose", "version"], "--log-level 'verbose': expected one of DEBUG"),
    (["report", "{tmp}/nope", "{tmp}/rep"], "results folder {tmp}/nope not found"),
    (["pipeline", "submit", "demo", "--dry-run", "--params-file", "{tmp}"], "params file {tmp} is a folder; expected a YAML file"),
    (["report", "{tmp}", "{tmp}/rep", "--similarity-dir", "{tmp}/nope"], "--similarity-dir {tmp}/nope: no similarity.pt there"),
    (["report", "{tmp}", "{tmp}/rep", "--prepared-dir", "{tmp}/nope"], "--prepared-dir {tmp}/nope: no meta.json there"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a[:3]) + " " + m[:30] for a, m in BAD])
def test_bad_settings_end_in_one_line_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ALIGNCLIP_IMAGE", raising=False)
    (tmp_path / "afile").write_text("not a folder")
    fill = lambda text: text.replace("{tmp}", str(tmp_path)).replace("{prep}", str(tmp_path / "prep"))  # noqa: E731
    code, out, err = run_cli([fill(a) for a in args], capsys, cwd=tmp_path)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and fill(message) in lines[0], lines[0]
    assert not (tmp_path / "alignclip-pipeline.yaml").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; run as a user to check this")
def test_read_only_output_folder_is_refused_up_front(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    code, _, err = run_cli(["prepare", "rotated_digits", tmp_path, locked / "out"], capsys)
    assert code == 2 and f"{locked} is not writable" in err


def test_an_existing_package_is_not_overwritten_silently(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("mine")
    code, _, err = run_cli(["pipeline", "compile", "demo", "-o", tmp_path / "p.yaml"], capsys)
    assert code == 2 and "pass --force" in err and (tmp_path / "p.yaml").read_text() == "mine"


def test_a_package_path_in_missing_folders_creates_them(tmp_path, capsys):
    nested = tmp_path / "nodir" / "x" / "demo.yaml"
    code, out, err = run_cli(["pipeline", "compile", "demo", "-o", nested], capsys)
    assert code == 0 and f"compiled demo -> {nested}" in out, err
    assert package_docs(nested)[0]["pipelineInfo"]["name"] == "alignclip-demo"


# -- one grid cell, three runners ------------------------------------------------------------------------------------

# What each recipe trains with, from the released scripts (recipes.py cites them) and the paper's A.1
EXPECTED = {
    # the demo's last AlignCLIP cell: its selection grid's lr (the recipe's too)
    "demo": {"recipe": "demo", "lr": 0.001, "batch_size": 8, "steps": 40, "epochs": None, "hflip": False, "model": "tiny"},
    "domain_shift": {"recipe": "domain_shift/office_home", "lr": 1e-5, "batch_size": 36, "steps": 5000, "epochs": None, "hflip": True, "model": "vit-b-16"},
    "wild": {"recipe": "wild/office_home", "lr": 3e-6, "batch_size": 36, "steps": 5000, "epochs": None, "hflip": True, "model": "vit-b-16"},
    # the authors' trainopenclass.sh: 1 epoch x main.py's 500 iterations
    "base2new": {"recipe": "base2new/oxford_pets", "lr": 5e-6, "batch_size": 36, "steps": 500, "epochs": None, "hflip": True, "model": "vit-b-16"},
    # the authors' traindomainnet-wilds-2.sh: held-out sketch (target 5) trains 10 epochs x 500, not the 20 of targets 0-2
    "wild_domain_net": {"recipe": "wild/domain_net", "lr": 5e-6, "batch_size": 36, "steps": 5000, "epochs": None, "hflip": True, "model": "vit-b-16"},
    # a dataset of one's own with non-ASCII domain names: no benchmark recipe, so the paper's A.1 (5e-6, 36, 5000)
    "custom": {"recipe": "paper", "lr": 5e-6, "batch_size": 36, "steps": 5000, "epochs": None, "hflip": True, "model": "vit-b-16"},
}
CASES = {"custom": ("domain_shift", {"data_dataset": "my_kitchens", "train_test_domains": ["Küche", "Straße 2"]}),
         "wild_domain_net": ("wild", {"data_dataset": "domain_net"})}
PACKAGE_STEPS = {"wild_domain_net": 20 * 500}  # the package's default: the recipe's length; each cell carries its own


def _cli_command(values, cell):
    """What a user types: the cell and each setting the family chose, as options."""
    flags = {"model_name": "--model", "model_pretrained": "--pretrained", "train_recipe": "--recipe", "train_formulation": "--formulation",
             "train_steps": "--steps", "train_epochs": "--epochs", "train_batch_size": "--batch-size", "train_lr": "--lr"}
    cmd = ["train", "<prepared>", "<out>", "--method", cell["method"], "--seed", str(cell["seed"])]
    cmd += [f"--hparam={k}={v}" for k, v in cell["hparams"].items()]
    if cell["test_domain"]:
        cmd += ["--test-domain", cell["test_domain"]]
    for name, flag in flags.items():
        if values[name] is not None:
            cmd += [flag, str(values[name])]
    if values["train_hflip"] is not None:
        cmd.append("--hflip" if values["train_hflip"] else "--no-hflip")
    return cmd


def _dvc_command(values, cell, project):
    """The train stage command of the cell's (held-out domain, seed) group as DVC renders it from dvc.yaml and the
    family's params.yaml (`alignclip grid`: every trained cell of the group)."""
    from dvc.repo import Repo

    for name in ("dvc.yaml",):
        (project / name).write_text((ROOT / name).read_text())
    (project / "params.yaml").write_text(render_params(values))
    (project / ".dvc").mkdir(exist_ok=True)
    (project / ".dvc" / "config").write_text("[core]\n    no_scm = True\n")
    stages = {s.name: s for s in Repo(str(project)).index.stages}
    stage = stages[f"train@{cell['test_domain']}-{int(cell['seed'])}"]
    argv = shlex.split(stage.cmd)
    assert argv[0] == "alignclip"
    return argv[1:]


def _kfp_command(family, values, tmp_path, monkeypatch):
    """The command the compiled package's train task runs: its inputs wired from the package's parameter defaults
    into the component function (the code the task executes), with the CLI call captured."""
    import alignclip_kfp.components.runtime
    from alignclip_kfp.client import cluster_settings, compile_pipeline
    from alignclip_kfp.components import stages

    path = compile_pipeline(family, tmp_path / "p.yaml", cluster_settings(image="registry.example/alignclip:test"), values)
    spec = package_docs(path)[0]
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    (loop_task,) = [t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
    loop = spec["components"][loop_task["componentRef"]["name"]]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    (tmp_path / "run").write_text("")
    arguments = {}
    for name, source in loop.items():
        if "componentInputParameter" in source:
            channel = source["componentInputParameter"].replace("pipelinechannel--", "")
            arguments[name] = defaults[channel] if not channel.endswith("-loop-item") else None
    # the last held-out domain: Office-Home's "Real World" holds a space
    arguments["cell"] = next(c for c in reversed(defaults["train_grid"]) if c["method"] == "alignclip")
    artifact = lambda p: SimpleNamespace(path=str(p), metadata={})  # noqa: E731
    captured = []
    monkeypatch.setattr(alignclip_kfp.components.runtime, "run_cli", lambda *args, env=None: captured.append(list(args)))
    stages.train(prepared=artifact("<prepared>"), matrix=artifact("<matrix>"), parent_run=artifact(tmp_path / "run"),
                 model=artifact("<model>"), **arguments)
    return captured[0], arguments["cell"], defaults


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_a_grid_cell_trains_with_the_same_settings_via_cli_dvc_and_kfp(case, tmp_path, capsys, monkeypatch):
    family, overrides = CASES.get(case, (case, {}))
    values = resolve(family, overrides=overrides)
    kfp_cmd, cell, defaults = _kfp_command(family, values, tmp_path, monkeypatch)
    dvc_cmd = _dvc_command(values, cell, tmp_path)
    cli_cmd = _cli_command(values, cell)
    shown = {}
    for runner, cmd in (("cli", cli_cmd), ("dvc", dvc_cmd), ("kfp", kfp_cmd)):
        code, out, err = run_cli([*cmd, "--dry-run"], capsys, cwd=tmp_path)
        assert code == 0, (runner, err)
        shown[runner] = [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]
    # DVC's stage runs the cells of the group, this one among them
    assert len(shown["cli"]) == len(shown["kfp"]) == 1 and len(shown["dvc"]) == len(
        [c for c in grid(values) if (c["test_domain"], c.get("seed")) == (cell["test_domain"], cell["seed"])])
    assert shown["cli"][0] == shown["kfp"][0] and shown["kfp"][0] in shown["dvc"]
    shown = {runner: lines[0] for runner, lines in shown.items()}
    expected = EXPECTED[case]
    settings = shown["kfp"]
    assert {k: settings[k] for k in ("recipe", "lr", "batch_size", "steps", "epochs", "hflip", "model")} == expected
    assert (settings["method"], settings["seed"], settings["test_domain"] or "") == (cell["method"], cell["seed"], cell["test_domain"])
    assert settings["hparams"] == cell["hparams"] == ({"aal_weight": 1.0, "lr": 0.001} if case == "demo" else {})
    assert settings["test_domain"] == {"domain_shift": "Real World", "wild": "Real World", "custom": "Straße 2"}.get(case, settings["test_domain"])
    # the compiled package's defaults are those settings too
    assert (defaults["train_lr"], defaults["train_batch_size"], defaults["train_steps"], defaults["train_epochs"]) == (
        expected["lr"], expected["batch_size"], PACKAGE_STEPS.get(case, expected["steps"] or 0), expected["epochs"] or 0)


def test_dvc_stages_list_exactly_the_settings_they_read():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert sorted(stages["train"]["params"]) == sorted(GRID_KEYS)
    # the grid's seeds and domains are not among them: a new seed or domain only adds (domain, seed) groups
    assert not {"train.seeds", "train.test_domains"} & set(stages["train"]["params"])
    # zero-shot reads no training setting (issue 21.4: a new train.steps re-runs no zero-shot stage)
    assert sorted(stages["zeroshot"]["params"]) == sorted(ZEROSHOT_KEYS)
    assert not (set(TRAIN_KEYS) - {"model.name", "model.pretrained", "data.dataset", "data.protocol", "train.formulation"}) & set(ZEROSHOT_KEYS)
    used = {m for m in __import__("re").findall(r"\$\{((?:data|model|train)\.[a-z_]+)\}", stages["prepare"]["cmd"])}
    # the few-shot samples' seeds, not the training seeds: a new seed re-runs no DomainBed prepare
    assert used | {"data.sample_seeds"} == set(stages["prepare"]["params"])
    assert sorted(stages["similarity"]["params"]) == sorted(SIMILARITY_KEYS)


def test_families_are_data():
    for name, family in FAMILIES.items():
        assert set(family.defaults) <= set(BY_NAME), name
        resolve(name)  # each resolves to a valid configuration


def test_the_schemas_protocols_are_the_registry():
    from alignclip.config import PROTOCOLS
    from alignclip.protocols import PROTOCOLS as REGISTRY

    assert set(PROTOCOLS) == set(REGISTRY)


def test_a_batch_larger_than_a_training_domain_is_refused_not_clamped(digits_prepared, tmp_path):
    import pandas as pd

    from alignclip.train import TrainSettings, train

    manifest = pd.read_parquet(digits_prepared / "manifest.parquet")
    rows = manifest[(manifest["split"] == "train") & (manifest["domain"] != "rotated_0")]
    smallest = int(rows.groupby("domain").size().min())
    with pytest.raises(ValueError, match=rf"batch_size={smallest + 1} is larger than the smallest training stream \({smallest} images\)"):
        train(digits_prepared, tmp_path / "o", TrainSettings(method="erm", test_domain="rotated_0", steps=1, batch_size=smallest + 1, progress=False))
    assert not (tmp_path / "o" / "model.pt").exists()


def test_temperature_switches_take_model_a_number_or_none():
    from alignclip.config import check_method_switches

    assert check_method_switches({"tau": "model", "aal_tau": "model"}) == {"tau": "model", "aal_tau": "model"}
    assert check_method_switches({"tau": 0.01, "aal_tau": "none"}) == {"tau": 0.01, "aal_tau": None}
    assert check_method_switches({"aal_tau": None, "tau": 1}) == {"aal_tau": None, "tau": 1.0}
