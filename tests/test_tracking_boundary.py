"""The tracking package is the only importer of MLflow (issue 22): a static scan (ast) of every module of
`alignclip/`, and of the imports between the package's own modules, which must form no cycle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alignclip"
TRACKING = PACKAGE / "tracking"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at any depth (the package imports mlflow inside functions)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in ("import_module", "__import__"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_the_scan_sees_imports_inside_functions_and_from_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from mlflow.entities import Param\n\nimport mlflow.pytorch as mp\n"
                      "import importlib\nimportlib.import_module('mlflow')\n")
    assert sorted(m for _, m in imported_modules(sample) if m.split(".")[0] == "mlflow") == [
        "mlflow", "mlflow.entities", "mlflow.entities.Param", "mlflow.pytorch"]


def test_mlflow_is_imported_only_inside_the_tracking_package():
    outside = [f"{path.relative_to(ROOT)}:{line}: {module}"
               for path in sorted(PACKAGE.rglob("*.py")) if TRACKING not in path.parents
               for line, module in imported_modules(path) if module.split(".")[0] == "mlflow"]
    assert outside == [], "mlflow imported outside alignclip/tracking/ (call alignclip.tracking instead):\n" + "\n".join(outside)
    assert any(m.split(".")[0] == "mlflow" for path in TRACKING.glob("*.py") for _, m in imported_modules(path))


def test_the_tracking_modules_import_each_other_without_a_cycle():
    modules = {f"alignclip.tracking.{p.stem}": p for p in TRACKING.glob("*.py") if p.stem != "__init__"}
    edges = {name: {m for _, m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}
    # a submodule importing the package itself (`from alignclip.tracking import x`) would go through __init__,
    # which imports every submodule: that is a cycle too
    through_init = [name for name, path in modules.items()
                    if any(m == "alignclip.tracking" for _, m in imported_modules(path))]
    assert through_init == []
    order, done = [], set()
    while len(done) < len(edges):
        ready = sorted(n for n in edges if n not in done and edges[n] <= done)
        assert ready, f"import cycle among {sorted(set(edges) - done)}: {edges}"
        order += ready
        done |= set(ready)
    assert order.index("alignclip.tracking.client") < order.index("alignclip.tracking.runs")
