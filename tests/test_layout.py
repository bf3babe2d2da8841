"""The library never imports the lab (issue 26): `recipe_dist/lab/` plugs its commands into the
CLI through an entry point, and every other module stands without it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "recipe_dist"


def lab_imports(path: Path) -> list[str]:
    """`file:line` of every import of recipe_dist.lab in `path` (absolute or relative)."""
    tree = ast.parse(path.read_text(), str(path))
    # The module's package, for resolving `from ..lab import x` against its own position.
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = [".".join([*base, node.module] if node.module else base)]
                if not node.module:  # `from .. import lab`
                    names += [f"{names[0]}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        if any(n == "recipe_dist.lab" or n.startswith("recipe_dist.lab.") for n in names):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
        if isinstance(node, ast.Call) and any(isinstance(a, ast.Constant) and isinstance(a.value, str)
                                              and a.value.startswith("recipe_dist.lab") for a in node.args):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} (by name)")
    return found


def test_no_module_outside_the_lab_imports_it():
    outside = [p for p in PACKAGE.rglob("*.py") if "lab" not in p.relative_to(PACKAGE).parts[:1]]
    assert len(outside) > 50  # the walk sees the library
    offenders = [hit for p in outside for hit in lab_imports(p)]
    assert offenders == []


def test_the_check_sees_each_form_of_import(tmp_path, monkeypatch):
    probe = PACKAGE / "defenses" / "_probe_lab_import.py"
    forms = ["import recipe_dist.lab.demo", "from recipe_dist.lab import cli", "from ..lab import demo", "from .. import lab",
             "importlib.import_module('recipe_dist.lab.defense')"]
    try:
        for form in forms:
            probe.write_text(form + "\n")
            assert lab_imports(probe), form
        probe.write_text("from ..labels import x\nimport recipe_dist.labs\n")
        assert lab_imports(probe) == []
    finally:
        probe.unlink(missing_ok=True)


def test_the_library_imports_and_the_lab_commands_plug_in():
    # A fresh interpreter: importing the whole CLI and running a product command's help loads no lab module.
    code = ("import sys, recipe_dist.cli as c\n"
            "assert {'demo', 'bench'} <= set(c.plugin_commands()), c.plugin_commands()\n"
            "assert not [m for m in sys.modules if m.startswith('recipe_dist.lab')]\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "recipe_dist", "bench"], capture_output=True, text=True)
    assert out.returncode == 2 and "defense" in out.stderr


def import_graph() -> dict[str, set[str]]:
    """module -> the recipe_dist modules it imports, function-level (lazy) imports included; a
    submodule's import of its own package (a registry decorator) is not an edge."""
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        package = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
                mod = f"{base}.{node.module}" if base and node.module else base or node.module or ""
                names = [mod, *(f"{mod}.{a.name}" for a in node.names)]
            else:
                continue
            for n in names:
                r = resolve(n) if n.startswith("recipe_dist") else ""
                if r and r != m and not m.startswith(r + "."):
                    graph[m].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert "recipe_dist.jobs" in graph["recipe_dist.attacks.common"]  # the walk sees relative imports
    assert "recipe_dist.head_fit" in graph["recipe_dist.cli"]  # and lazy ones
    assert cycles(graph) == []


def test_the_circle_check_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
