"""The package's shape, read from its source (ast), nothing imported: no import cycle (function-level imports
included) and no function longer than ``MAX_FUNCTION_LINES``. Both checks also run on small made-up packages, so
that each can be seen to fail."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "alignclip"
MAX_FUNCTION_LINES = 60

# Known offenders a change may list while it is being fixed (empty now): anything not listed fails the tests, and an
# entry that no longer offends fails test_the_allow_lists_name_only_what_still_offends, so the lists only shrink.
ALLOWED_LONG_FUNCTIONS: set[str] = set()  # empty since the merge of every part of issue 22
ALLOWED_CYCLE_EDGES: set[tuple[str, str]] = set()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imported_modules(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules that ``name``'s source imports, anywhere in it (function bodies included).
    ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module, else ``pkg``."""
    prefix = name.split(".")[0]  # the package: imports of anything else are not edges
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a non-module c: its module
                target = target.rpartition(".")[0]
            if target and target.split(".")[0] == prefix and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    found = modules(root)
    known = set(found)
    return {
        name: imported_modules(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known)
        for name, path in found.items()
    }


def cycles(graph: dict[str, set[str]], allowed_edges: set[tuple[str, str]] = frozenset()) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted; allowed edges dropped."""
    graph = {a: {b for b in bs if (a, b) not in allowed_edges and b in graph} for a, bs in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def function_lengths(root: Path) -> dict[str, int]:
    """``module:qualified.name`` -> lines from ``def`` to the function's last line (docstring included,
    decorators not) of every function and method."""
    lengths: dict[str, int] = {}
    for name, path in modules(root).items():
        tree = ast.parse(path.read_text(), str(path))

        def walk(node: ast.AST, qualname: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    inner = f"{qualname}.{child.name}" if qualname else child.name
                    lengths[f"{name}:{inner}"] = child.end_lineno - child.lineno + 1
                    walk(child, inner)
                elif isinstance(child, ast.ClassDef):
                    walk(child, f"{qualname}.{child.name}" if qualname else child.name)
                else:
                    walk(child, qualname)

        walk(tree, "")
    return lengths


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    return {name: n for name, n in function_lengths(root).items() if n > limit}


# -- the package ---------------------------------------------------------------------------------------------------


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "alignclip.train" in graph and "alignclip.objective" in graph["alignclip.train"]  # the graph is read
    assert cycles(graph, ALLOWED_CYCLE_EDGES) == []


def test_no_function_in_the_package_is_longer_than_the_limit():
    lengths = function_lengths(PACKAGE)
    assert "alignclip.train:cosine_lr" in lengths and "alignclip.train:LogWindow.write" in lengths
    offenders = {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES and name not in ALLOWED_LONG_FUNCTIONS}
    assert offenders == {}, f"functions over {MAX_FUNCTION_LINES} lines: {offenders}"


def test_the_allow_lists_name_only_what_still_offends():
    """An entry whose function got short (or whose edge is gone) is removed, so the list can only shrink."""
    lengths = function_lengths(PACKAGE)
    stale = {name for name in ALLOWED_LONG_FUNCTIONS if lengths.get(name, 0) <= MAX_FUNCTION_LINES}
    graph = import_graph(PACKAGE)
    gone = {(a, b) for a, b in ALLOWED_CYCLE_EDGES if b not in graph.get(a, set())}
    assert stale == set() and gone == set()


# -- the checks themselves, on made-up packages ---------------------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    root = _package(tmp_path, {
        "a.py": "from pkg import b\n",
        "b.py": "def f():\n    from pkg.sub.c import g\n    return g\n",
        "sub/__init__.py": "",
        "sub/c.py": "def g():\n    from ..a import x\n",
        "d.py": "import pkg.a\nfrom pkg.sub import c\n",  # imports into the cycle, not part of it
    })
    graph = import_graph(root)
    assert graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.a", "pkg.sub.c"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert cycles(graph, {("pkg.sub.c", "pkg.a")}) == []


def test_a_long_function_is_found_and_a_short_one_is_not(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    method_body = body.replace("    x", "        x")
    root = _package(tmp_path, {
        "m.py": f"def exactly():\n{body}\n\nclass K:\n    def longer(self):\n{method_body}        pass\n",
    })
    assert function_lengths(root)["pkg.m:exactly"] == MAX_FUNCTION_LINES
    assert long_functions(root) == {"pkg.m:K.longer": MAX_FUNCTION_LINES + 1}
