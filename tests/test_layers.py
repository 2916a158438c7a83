"""The package's rooms, and the one way their imports point.

Every module of poolwatch belongs to one room. A room imports only rooms on lower floors (rooms that
share a floor never import each other), and no module reaches itself again through its imports (a
circle). Imports are read from the source with ``ast``: at module level, inside functions and under
``if TYPE_CHECKING:`` alike, because a lazy or type-only import is a dependency all the same.

The source is found beside this file (``../poolwatch``), not through ``import poolwatch``, so the
test can be pointed at any checkout of the package by copying it there.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "poolwatch"

# Bottom first. What each floor is for:
FLOORS: tuple[tuple[str, ...], ...] = (
    ("poolwatch._log", "poolwatch._runtime"),  # swallow-and-count and log sinks | interpreter checks
    ("poolwatch._settings",),  # what poolwatch can be told
    ("poolwatch._record",),  # plain state: recorders, histograms, request context, events
    ("poolwatch._capture", "poolwatch._serve"),  # write records on the app's threads | read them
    # integrations at the edge: spans and the OpenTelemetry bridge | leak and query guards for tests
    ("poolwatch._otel", "poolwatch._guard"),
    # ties it all together | gunicorn's hooks | the pytest plugin (drives the guards)
    ("poolwatch._wiring", "poolwatch.gunicorn", "poolwatch.pytest_plugin"),
    ("poolwatch",),  # the public names
)
FLOOR_OF = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line})"


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name; a package's name stands for its __init__.py."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(node: ast.ImportFrom, source: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(source: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    """poolwatch modules that ``source`` imports, wherever the import statement is."""
    edges = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node, source, is_package)
            for alias in node.names:
                # ``from poolwatch._serve import probe`` imports the module ``probe``.
                submodule = f"{module}.{alias.name}"
                targets.append(submodule if submodule in modules else module)
        else:
            continue
        for target in targets:
            if target == "poolwatch" or target.startswith("poolwatch."):
                edges.append(Edge(source, target, node.lineno))
    return edges


def room_of(module: str) -> str | None:
    """The room a module is in: the longest room name that is the module or a package above it."""
    if module == "poolwatch":
        return "poolwatch"
    candidates = [room for room in FLOOR_OF if room != "poolwatch"]
    found = [room for room in candidates if module == room or module.startswith(room + ".")]
    return max(found, key=len) if found else None


def all_edges(package: Path = PACKAGE) -> list[Edge]:
    modules = module_names(package)
    return [edge for name, path in modules.items() for edge in imports_of(name, path, modules)]


def upward_edges(edges: list[Edge]) -> list[str]:
    problems = []
    for edge in edges:
        source, target = room_of(edge.source), room_of(edge.target)
        if source is None or target is None or source == target:
            continue
        if FLOOR_OF[target] >= FLOOR_OF[source]:
            how = "across its floor" if FLOOR_OF[target] == FLOOR_OF[source] else "up a floor"
            problems.append(f"{edge} points {how}: {source} may not import {target}")
    return problems


def circles(edges: list[Edge]) -> list[list[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if edge.source != edge.target:
            graph.setdefault(edge.source, set()).add(edge.target)
            graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = lowest[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                lowest[node] = min(lowest[node], lowest[successor])
            elif successor in on_stack:
                lowest[node] = min(lowest[node], index[successor])
        if lowest[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_is_in_a_room() -> None:
    homeless = [name for name in module_names() if room_of(name) is None]
    assert not homeless, f"modules in no room (add them to one in FLOORS): {homeless}"


def test_imports_point_down_the_floors() -> None:
    problems = upward_edges(all_edges())
    assert not problems, "imports that point the wrong way:\n" + "\n".join(problems)


def test_no_import_circles() -> None:
    found = circles(all_edges())
    assert not found, "modules that import each other (through any path): " + "; ".join(
        " <-> ".join(component) for component in found
    )


def test_a_rooms_package_imports_nothing() -> None:
    """Importing one module of a room must not drag in the rest of it."""
    for room in FLOOR_OF:
        if room == "poolwatch":
            continue
        init = PACKAGE / room.split(".", 1)[1] / "__init__.py"
        if init.exists():
            tree = ast.parse(init.read_text())
            assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], init


def test_the_checker_sees_a_circle_and_an_upward_import() -> None:
    """The checks themselves, on edges made up for the purpose."""
    made_up = [
        Edge("poolwatch._record.recorder", "poolwatch._capture.borrow_site", 1),
        Edge("poolwatch._capture.borrow_site", "poolwatch._record.recorder", 2),
        Edge("poolwatch._serve.health", "poolwatch._capture.sql", 3),
    ]
    assert circles(made_up) == [["poolwatch._capture.borrow_site", "poolwatch._record.recorder"]]
    problems = upward_edges(made_up)
    assert len(problems) == 2
    assert "up a floor" in problems[0] and "across its floor" in problems[1]


def test_gunicorns_master_loads_only_what_its_hooks_use() -> None:
    """``gunicorn -c python:poolwatch.gunicorn`` imports the package root first: that must not load
    the wiring, the hooks or SQLAlchemy into the master process."""
    code = (
        "import sys, poolwatch.gunicorn\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('poolwatch', 'sqlalchemy')))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent
    )
    loaded = result.stdout.split()
    assert loaded == [
        "poolwatch",
        "poolwatch._log",
        "poolwatch._serve",
        "poolwatch._serve.multiprocess",
        "poolwatch.gunicorn",
    ]


# Modules of _record and _serve that still import SQLAlchemy at run time (to be moved behind
# ``_record.source.PoolSource``): the server-limit reader takes a connection through SQLAlchemy.
STILL_SQLALCHEMY: set[str] = set()


def runtime_library_imports(path: Path) -> list[str]:
    """Imports of SQLAlchemy or a driver that run at import or call time (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(inner) for inner in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [n for n in names if n.split(".")[0] in ("sqlalchemy", "asyncpg", "psycopg", "psycopg_pool")]
    return found


def test_record_and_serve_import_no_pool_library_at_run_time() -> None:
    offenders = {
        name: runtime_library_imports(path)
        for name, path in module_names().items()
        if name.startswith(("poolwatch._record", "poolwatch._serve")) and name not in STILL_SQLALCHEMY
    }
    offenders = {name: found for name, found in offenders.items() if found}
    assert not offenders, f"_record/_serve modules importing a pool library at run time: {offenders}"


def test_the_library_import_check_sees_one(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import asyncpg\n"
        "def f():\n    from sqlalchemy.util import greenlet_spawn\n"
    )
    assert runtime_library_imports(module) == ["sqlalchemy.util"]
