"""The import graph, read statically (ast, imports inside functions included): no cycles,
and the core never imports the Ray layer, the tuner, ray or optuna."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ssdiff_ray", "actors", "driver", "tuning", "service")
OUTER_SHELL = {"ssdiff_ray.api", "ssdiff_ray.cli"}  # start Ray and call the actors
# importer prefix -> top-level names it must never import
FORBIDDEN = {
    "ssdiff_ray": {"ray", "optuna", "actors", "driver", "tuning", "service"},
    "actors": {"optuna", "driver", "tuning"},
    "driver": {"optuna", "tuning"},
    "service": {"optuna", "actors", "driver", "tuning"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> every module or package it imports (anywhere in its file)."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                # "from pkg import mod" imports the submodule pkg.mod
                deps.update(f"{node.module}.{a.name}" for a in node.names
                            if f"{node.module}.{a.name}" in files)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle among the graph's own modules, as a path, or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if d not in graph or d == m:
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def forbidden_edges(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        if mod in OUTER_SHELL:
            continue
        banned = FORBIDDEN.get(mod.split(".")[0], set())
        bad += [f"{mod} -> {d}" for d in sorted(deps) if d.split(".")[0] in banned]
    return bad


def test_no_import_cycles():
    assert find_cycle(import_graph(ROOT)) is None


def test_no_forbidden_imports():
    assert forbidden_edges(import_graph(ROOT)) == []


def test_graph_covers_the_packages_and_function_level_imports():
    g = import_graph(ROOT)
    assert {"ssdiff_ray.config", "actors.client_pool", "driver.federation", "tuning.study",
            "service.app"} <= set(g)
    # ssdiff_ray.api imports the round loop inside run(): it must be seen
    assert "driver.federation" in g["ssdiff_ray.api"]


@pytest.fixture
def planted(tmp_path):
    """A copy-free tree of three modules; a cycle and a forbidden edge are planted."""
    pkg = tmp_path / "ssdiff_ray"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from ssdiff_ray import b\n")
    (pkg / "b.py").write_text("def f():\n    from ssdiff_ray.sub import c\n")
    (pkg / "sub" / "c.py").write_text("def g():\n    import ssdiff_ray.a\n    import ray\n")
    return tmp_path


def test_a_planted_cycle_inside_functions_is_found(planted):
    g = import_graph(planted, ("ssdiff_ray",))
    assert find_cycle(g) == ["ssdiff_ray.a", "ssdiff_ray.b", "ssdiff_ray.sub.c", "ssdiff_ray.a"]
    assert forbidden_edges(g) == ["ssdiff_ray.sub.c -> ray"]
    (planted / "ssdiff_ray" / "sub" / "c.py").write_text("def g():\n    pass\n")
    assert find_cycle(import_graph(planted, ("ssdiff_ray",))) is None
