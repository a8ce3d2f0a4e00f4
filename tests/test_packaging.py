"""The distribution: the core library imports no kfp, and a wheel installed into a clean virtual environment carries
the KFP layer (alignclip_kfp) and compiles every pipeline family without the source tree."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", ALIGNCLIP_LOG_LEVEL="WARNING")


def test_the_core_library_imports_no_kfp():
    """Every module of the library, then the KFP layer's kfp-free parts (the client, the argument builder, the
    tasks' runtime): kfp stays unimported, and the library alone never loads alignclip_kfp."""
    code = ("import importlib, pkgutil, sys, alignclip;"
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(alignclip.__path__, 'alignclip.') if m.name != 'alignclip.__main__'];"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kfp', 'alignclip_kfp')));"
            "import alignclip_kfp.client, alignclip_kfp.arguments, alignclip_kfp.components.runtime;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kfp'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
    assert done.stdout.split() == ["[]", "[]"], done.stdout


def _imports(path: Path):
    """(imported top-level package, whether at module level) of each import statement of a source file."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    nested = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(function) if node is not function}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            yield name.split(".")[0], id(node) not in nested


KFP_LAYER = ("alignclip_kfp", "components", "pipelines")  # the folders of the installed package alignclip_kfp


def test_kfp_is_imported_only_by_the_kfp_layer_which_the_library_loads_only_in_pipeline_commands():
    where_kfp, where_layer = [], []
    for path in sorted(ROOT.glob("alignclip/**/*.py")):
        for package, top in _imports(path):
            if package == "kfp":
                where_kfp.append(str(path.relative_to(ROOT)))
            elif package == "alignclip_kfp" and (path.name != "cli.py" or top):
                where_layer.append(str(path.relative_to(ROOT)))
    assert where_kfp == [] and where_layer == []
    users = {str(p.relative_to(ROOT)) for folder in KFP_LAYER for p in ROOT.glob(f"{folder}/**/*.py")
             if any(package == "kfp" for package, _ in _imports(p))}
    assert users == {"alignclip_kfp/client.py", "components/stages.py", "pipelines/alignclip_pipeline.py"}


def test_every_function_of_the_kfp_layer_fits_in_60_lines():
    import ast

    long = []
    for folder in KFP_LAYER:
        for path in sorted(ROOT.glob(f"{folder}/**/*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject.toml lists the packages (the KFP layer's folders are mapped, so no automatic discovery): a new
    alignclip subpackage must be added there, or the installed package (the image) lacks it."""
    import tomllib

    from setuptools import find_packages

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = setuptools["packages"]
    found = ["alignclip"] + [f"alignclip.{p}" for p in find_packages(str(ROOT / "alignclip"))]
    assert sorted(p for p in listed if p.startswith("alignclip.") or p == "alignclip") == sorted(found)
    # the KFP layer: its own folder and the mapped ones (components/, pipelines/), with their subpackages
    mapped = {"alignclip_kfp": "alignclip_kfp", **setuptools["package-dir"]}
    found = [f"{name}.{p}" for name, folder in mapped.items() for p in find_packages(str(ROOT / folder))] + list(mapped)
    assert sorted(p for p in listed if p.split(".")[0] == "alignclip_kfp") == sorted(found)


@pytest.mark.slow
def test_a_wheel_in_a_clean_venv_compiles_every_family(tmp_path):
    # build from the files git would ship (tracked and new, not ignored): no build/ or .egg-info in the checkout
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "src"
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, env=ENV)
    (wheel,) = (tmp_path / "dist").glob("alignclip-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(source)) for p in (source / "alignclip").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped <= names, sorted(shipped - names)[:5]  # every module and resource (model configs, paper numbers)
    assert {"alignclip_kfp/__init__.py", "alignclip_kfp/client.py", "alignclip_kfp/arguments.py", "alignclip_kfp/components/stages.py",
            "alignclip_kfp/components/runtime.py", "alignclip_kfp/pipelines/alignclip_pipeline.py"} <= names

    # a fresh venv (no system site-packages) with the wheel; the locked dependencies are this environment's, made
    # visible by a .pth line (a .pth in a plain folder on sys.path is not processed, so the editable install of
    # the checkout stays invisible)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True, capture_output=True, env=ENV)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "locked-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import alignclip, alignclip_kfp.pipelines.alignclip_pipeline as p; print(alignclip.__file__); print(p.__file__)"],
                           capture_output=True, text=True, cwd=work, env=ENV, check=True).stdout.split()
    assert all(path.startswith(str(venv)) for path in where), where
    for family in ("demo", "domain_shift", "imagenet", "base2new", "wild", "all"):
        done = subprocess.run([str(venv / "bin" / "alignclip"), "pipeline", "compile", family, "-o", f"{family}.yaml", "--image", "registry.example/alignclip:test"],
                              capture_output=True, text=True, cwd=work, env=ENV)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "pipelineInfo" in (work / f"{family}.yaml").read_text()
