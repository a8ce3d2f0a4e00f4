"""Selection grids: list-valued settings of train.grid expand into cells with their hparams, zero-shot runs once per
held-out domain (config, KFP), and DVC's stages depend only on what they read (issue 21.4)."""

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.kfp_package import package_docs

from alignclip.config import ConfigError, cell_dir, cell_name, grid, parse_entry, resolve

ROOT = Path(__file__).resolve().parent.parent


def _params(tmp_path, train: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"test_domains": ["rotated_0", "rotated_75"], "seeds": [0, 1], **train}}))
    return path


def test_a_params_files_grid_expands_into_cells_with_their_hparams(tmp_path):
    path = _params(tmp_path, {"methods": ["zeroshot", "erm", "alignclip[aal=false]"],
                              "grid": {"erm": {"lr": [0.001, 0.003]}, "alignclip[aal=false]": {"lr": [0.01], "sls_weight": [0.5, 2]}}})
    cells = grid(resolve(None, path))
    # written out independently: per domain, zero-shot once, then each entry's combinations x seeds
    expected = []
    for domain in ("rotated_0", "rotated_75"):
        expected.append(("zeroshot", domain, None, {}))
        expected += [("erm", domain, s, {"lr": lr}) for lr in (0.001, 0.003) for s in (0, 1)]
        expected += [("alignclip[aal=false]", domain, s, {"lr": 0.01, "sls_weight": w}) for w in (0.5, 2) for s in (0, 1)]
    assert [(c["method"], c["test_domain"], c.get("seed"), c["hparams"]) for c in cells] == expected
    names = {c["name"] for c in cells}
    assert names == {"zeroshot", "erm[lr=0.001]", "erm[lr=0.003]", "alignclip[aal=false,lr=0.01,sls_weight=0.5]",
                     "alignclip[aal=false,lr=0.01,sls_weight=2]"}
    # folder names carry the varied values; zero-shot has no seed
    assert cell_dir(cells[0]) == "zeroshot-rotated_0" and cell_dir(cells[1]) == "erm[lr=0.001]-rotated_0-s0"
    assert len({cell_dir(c) for c in cells}) == len(cells)
    # a name reads back as the entry's method and all its switches
    assert parse_entry(cell_name("alignclip+release", {"lr": 0.001}))[1] == {"lr": 0.001}


@pytest.mark.parametrize("train, message", [
    ({"methods": ["erm"], "grid": {"clipood": {"lr": [0.1]}}}, "not an entry of train.methods"),
    ({"methods": ["erm"], "grid": {"erm": {"lrr": [0.1]}}}, "lrr"),
    ({"methods": ["erm"], "grid": {"erm": {"lr": ["fast"]}}}, "train.lr='fast'"),
    ({"methods": ["zeroshot"], "grid": {"zeroshot": {"lr": [0.1]}}}, "trains nothing"),
    ({"methods": ["alignclip[aal=maybe]"]}, "aal"),
])
def test_bad_grids_are_one_line_naming_the_key(tmp_path, train, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        resolve(None, _params(tmp_path, train))


def test_zero_shot_runs_once_per_held_out_domain_in_every_compiled_family(tmp_path):
    from alignclip.config import FAMILIES
    from alignclip_kfp.client import cluster_settings, compile_pipeline

    for family in ("demo", "domain_shift", "wild"):
        values = resolve(family)
        path = compile_pipeline(family, tmp_path / f"{family}.yaml", cluster_settings(image="r.example/a:t"), values)
        spec = package_docs(path)[0]
        cells = spec["root"]["inputDefinitions"]["parameters"]["train_grid"]["defaultValue"]
        zero = [c for c in cells if c["method"] == "zeroshot"]
        assert sorted(c["test_domain"] for c in zero) == sorted(values["train_test_domains"]), family
        assert all("seed" not in c and c["hparams"] == {} for c in zero)
        trained = [c for c in cells if c["method"] != "zeroshot"]
        combos = sum(len(list(itertools.product(*(FAMILIES[family].defaults.get("train_grid", {}).get(m, {}).values() or [[None]]))))
                     for m in values["train_methods"] if m != "zeroshot")
        assert len(trained) == combos * len(values["train_test_domains"]) * len(values["train_seeds"]), family


def _dvc_project(tmp_path: Path) -> Path:
    """dvc.yaml and params.yaml with every stage recorded as done (`dvc commit` over placeholder outputs)."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, project / name)
    (project / ".dvc").mkdir()
    (project / ".dvc" / "config").write_text("[core]\n    no_scm = True\n")
    for dep in ("data/x", "alignclip/pretrain.py", "alignclip/resources/model_configs/alignclip-tiny.json"):
        (project / dep).parent.mkdir(parents=True, exist_ok=True)
        (project / dep).write_text("x")
    params = yaml.safe_load((project / "params.yaml").read_text())["train"]
    outs = ["outputs/prepared", "outputs/pretrained", "outputs/similarity", "outputs/report"]
    outs += [f"outputs/runs/{d}/zeroshot" for d in params["test_domains"]]
    outs += [f"outputs/runs/{d}/s{s}" for d in params["test_domains"] for s in params["seeds"]]
    for out in outs:
        (project / out).mkdir(parents=True)
        (project / out / "f").write_text("x")
    for d in params["test_domains"]:
        for s in params["seeds"]:
            (project / "outputs" / "scores").mkdir(exist_ok=True)
            (project / "outputs" / "scores" / f"{d}-s{s}.json").write_text("{}")
    (project / "outputs" / "report_scores.json").write_text("{}")  # the report stage's metrics file
    for png in ("outputs/report/training_curves.png", "outputs/similarity/similarity.png"):
        (project / png).write_text("x")
    dvc = [str(Path(sys.executable).parent / "dvc")]
    subprocess.run(dvc + ["commit", "-f", "-q"], cwd=project, check=True)
    return project


def _would_run(project: Path, edit) -> set[str]:
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(edit(text))
    dvc = [str(Path(sys.executable).parent / "dvc")]
    out = subprocess.run(dvc + ["repro", "--dry"], cwd=project, check=True, capture_output=True, text=True).stdout
    (project / "params.yaml").write_text(text)
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def test_dvc_reruns_only_the_stages_that_read_a_changed_setting(tmp_path):
    project = _dvc_project(tmp_path)
    assert _would_run(project, lambda t: t) == set()
    # issue 21.4: a training setting re-runs the trained groups, no zero-shot stage
    steps = _would_run(project, lambda t: t.replace("  steps: null", "  steps: 50"))
    assert steps and all(s.startswith("train@") for s in steps)
    # a new seed of a DomainBed demo: its trained groups only, no prepare (and no zero-shot)
    seeded = _would_run(project, lambda t: t.replace("  seeds: [0, 1, 2]", "  seeds: [0, 1, 2, 3]"))
    assert seeded == {"train@rotated_0-3", "train@rotated_75-3"}
    # the test split is read by zero-shot and trained cells alike
    split = _would_run(project, lambda t: t.replace("  test_split: full", "  test_split: holdout"))
    assert {"zeroshot@zeroshot-rotated_0", "zeroshot@zeroshot-rotated_75"} <= split and "prepare" not in split


def test_dvc_lock_is_not_git_ignored():
    """DVC refuses a git-ignored dvc.lock: `dvc repro` (make demo), `dvc metrics show` and `dvc status` stop with
    "'dvc.lock' is git-ignored" in a clone of this repository."""
    if shutil.which("git") is None or subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-v", "dvc.lock"], cwd=ROOT, capture_output=True, text=True)
    assert ignored.returncode == 1, f"dvc.lock is git-ignored by {ignored.stdout.strip()}"


def test_the_grid_decodes_the_dataset_once_before_its_cells_run(digits_prepared, tmp_path, monkeypatch):
    """run_cells preloads the prepared images (shared by the forked cells) when it runs more than one cell."""
    from alignclip import cells as cells_module
    from alignclip.data import images
    from alignclip.data.prepare import load_prepared

    manifest, meta = load_prepared(digits_prepared)
    expected = {images.image_path(meta, p) for p in manifest["path"]}
    seen = []
    monkeypatch.setattr(cells_module, "_run_cell", lambda job: (seen.append(set(images._SHARED)), (job[0], {}))[1])
    values = resolve(None, _params(tmp_path, {"methods": ["erm"], "grid": {"erm": {"lr": [0.001, 0.003]}}}))
    chosen = cells_module.select_cells(values, ["rotated_0"], [0], "trained")
    images.clear_preloaded()
    try:
        scores = cells_module.run_cells(values, digits_prepared, tmp_path / "runs", chosen, run_command=None, jobs="1")
        assert set(scores) == {"erm[lr=0.001]-rotated_0-s0", "erm[lr=0.003]-rotated_0-s0"}
        assert seen == [expected, expected]
        images.clear_preloaded()
        cells_module.run_cells(values, digits_prepared, tmp_path / "one", chosen[:1], run_command=None, jobs="1")  # one cell: no preload
        assert seen[-1] == set()
    finally:
        images.clear_preloaded()
