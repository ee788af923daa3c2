"""The import graph, read statically (ast, imports inside functions included): no cycles,
and every module imports only its own layer and those below it (``LAYERS``): the core never
imports ray, optuna, the actors, the driver, the service or the tuner."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ssdiff_ray", "actors", "tuning")  # the installed top-level names

# The layers, lowest first: a module imports its own layer and those it lists, nothing else.
# core: ssdiff_ray without its Ray side (plain functions and classes, testable without Ray);
# actors: the Ray actor classes; driver: Ray on the driver (session, run, round loop, jobs);
# service: the HTTP service on Ray Serve; tuning: Optuna studies; shell: api and cli.
LAYERS = {
    "core": {"core"},
    "actors": {"core"},
    "driver": {"core", "actors"},
    "service": {"core", "driver"},
    "tuning": {"core", "driver"},
    "shell": {"core", "actors", "driver", "service", "tuning"},
}
# third-party names a layer must never import
BANNED = {"core": {"ray", "optuna"}, "actors": {"optuna"}, "driver": {"optuna"},
          "service": {"optuna"}, "tuning": set(), "shell": set()}
# service modules on Ray Serve; its other modules (request, offload, profile, generator)
# serve without Ray and belong to the core
SERVICE_ON_RAY = {"ssdiff_ray.service.app", "ssdiff_ray.service.cli", "ssdiff_ray.service.loadtest"}


def layer(mod: str) -> str | None:
    """The layer of a project module, None for a third-party name."""
    if mod in ("ssdiff_ray.api", "ssdiff_ray.cli"):
        return "shell"
    if mod == "ssdiff_ray.driver" or mod.startswith("ssdiff_ray.driver."):
        return "driver"
    if mod in SERVICE_ON_RAY:
        return "service"
    top = mod.split(".")[0]
    return {"ssdiff_ray": "core", "actors": "actors", "tuning": "tuning"}.get(top)


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
        own = layer(mod)
        for d in sorted(deps):
            other = layer(d)
            if other is None and d.split(".")[0] in BANNED[own]:
                bad.append(f"{mod} -> {d}")
            elif other is not None and other != own and other not in LAYERS[own]:
                bad.append(f"{mod} -> {d} ({own} may not import {other})")
    return bad


def test_no_import_cycles():
    assert find_cycle(import_graph(ROOT)) is None


def test_no_forbidden_imports():
    assert forbidden_edges(import_graph(ROOT)) == []


def test_graph_covers_the_packages_and_function_level_imports():
    g = import_graph(ROOT)
    assert {"ssdiff_ray.config", "actors.client_pool", "ssdiff_ray.driver.federation",
            "tuning.study", "ssdiff_ray.service.app"} <= set(g)
    # ssdiff_ray.cli imports the tuner inside a function: it must be seen
    assert "tuning.cli" in g["ssdiff_ray.cli"]
    assert {layer(m) for m in g} == set(LAYERS)


def test_installed_top_level_names(tmp_path):
    """pyproject.toml installs exactly the card's three import names."""
    import tomllib

    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert found["find"]["include"] == [f"{p}*" for p in PACKAGES]
    dirs = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert dirs == set(PACKAGES)


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
    (planted / "ssdiff_ray" / "d.py").write_text("import actors.x\nimport tuning\n")
    assert set(forbidden_edges(import_graph(planted, ("ssdiff_ray",)))) == {
        "ssdiff_ray.sub.c -> ray", "ssdiff_ray.d -> actors.x (core may not import actors)",
        "ssdiff_ray.d -> tuning (core may not import tuning)"}
    (planted / "ssdiff_ray" / "sub" / "c.py").write_text("def g():\n    pass\n")
    assert find_cycle(import_graph(planted, ("ssdiff_ray",))) is None
