"""Package boundaries, read from the source (ast, nothing imported).

1. Privacy that holds: a ``_module`` (any dotted component with one leading underscore) is
   imported only from inside the package that holds it: ``ops._cli_run`` by ``ops.cli``, never
   by ``engine``, ``bench`` or a test. What another package needs is a public module.
2. No cycle between the top-level packages: the runtime packages depend on each other in one
   direction only (``state`` and ``ingest`` on ``engine``, ``ops`` on all three; ``engine``
   on none of them).

Every import counts, wherever it sits: module level, inside a function (a lazy import is
still a dependency) and under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the runtime packages, the ones that may not form a cycle (CONVENTIONS.md item 15)
RUNTIME = ("engine", "state", "ingest", "ops")
# everything scanned for privacy: the runtime plus what imports it
SCANNED = (*RUNTIME, "bench", "tests", "examples")


@dataclass(frozen=True)
class Import:
    """One imported module, as written in one file."""

    importer: str  # dotted module name of the importing file
    module: str  # dotted module name imported
    where: str  # path:line, for the failure message


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    p = ROOT.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _files() -> Iterator[Path]:
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if not any(part.startswith(".") for part in path.relative_to(ROOT).parts):
                yield path


def _imports(path: Path) -> Iterator[Import]:
    importer = _module_name(path)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(ROOT)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(importer, alias.name, f"{rel}:{node.lineno}")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            yield Import(importer, mod, f"{rel}:{node.lineno}")
            for alias in node.names:
                # `from ops import _cli_run` imports the module ops._cli_run
                sub = f"{mod}.{alias.name}"
                if _is_module(sub):
                    yield Import(importer, sub, f"{rel}:{node.lineno}")


def _all_imports() -> list[Import]:
    return [imp for path in _files() for imp in _imports(path)]


def _private_owner(module: str) -> str | None:
    """The package holding the first private component of *module*, or None if all public."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def privacy_violations(imports: list[Import]) -> list[str]:
    """Imports of a ``_module`` from outside the package that holds it."""
    out = []
    for imp in imports:
        if imp.module.split(".")[0] not in SCANNED:
            continue  # third-party and standard-library privacy is theirs
        owner = _private_owner(imp.module)
        if owner is not None and not _inside(imp.importer, owner):
            out.append(f"{imp.where}: {imp.importer} imports {imp.module} (private to {owner})")
    return out


def package_graph(imports: list[Import]) -> dict[str, dict[str, str]]:
    """Top-level runtime package -> package it imports -> one place where it does."""
    graph: dict[str, dict[str, str]] = {p: {} for p in RUNTIME}
    for imp in imports:
        src, dst = imp.importer.split(".")[0], imp.module.split(".")[0]
        if src in RUNTIME and dst in RUNTIME and src != dst:
            graph[src].setdefault(dst, imp.where)
    return graph


def package_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Every elementary cycle, each rotated to start at its smallest package (few nodes)."""
    cycles: set[tuple[str, ...]] = set()

    def walk(path: list[str]) -> None:
        for nxt in graph[path[-1]]:
            if nxt == path[0]:
                i = path.index(min(path))
                cycles.add(tuple(path[i:] + path[:i]))
            elif nxt not in path:
                walk([*path, nxt])

    for start in graph:
        walk([start])
    return [list(c) for c in sorted(cycles)]


def test_no_private_module_imported_from_outside_its_package() -> None:
    bad = privacy_violations(_all_imports())
    assert not bad, "private modules imported across packages:\n" + "\n".join(bad)


def test_no_cycle_between_top_level_packages() -> None:
    graph = package_graph(_all_imports())
    cycles = package_cycles(graph)
    lines = []
    for cycle in cycles:
        hops = zip(cycle, [*cycle[1:], cycle[0]], strict=True)
        lines.append(" -> ".join([*cycle, cycle[0]]))
        lines.extend(f"    {a} -> {b} at {graph[a][b]}" for a, b in hops)
    assert not cycles, "import cycles between packages:\n" + "\n".join(lines)


def test_engine_depends_on_no_other_runtime_package() -> None:
    # the direction chosen: state, ingest and ops build on the engine, never the reverse
    graph = package_graph(_all_imports())
    assert graph["engine"] == {}, graph["engine"]


def test_the_checks_can_fail() -> None:
    # the scanner sees real edges, and each rule fires on a made-up offending import
    graph = package_graph(_all_imports())
    assert "engine" in graph["state"] and "engine" in graph["ops"]
    bad = [
        Import("ops.worker", "engine._exec", "ops/worker/__init__.py:1"),
        Import("engine.local", "engine._exec", "engine/local.py:1"),  # inside: allowed
        Import("tests.unit.x", "ops._cli_run", "tests/unit/x.py:1"),
        Import("ops.worker", "concurrent.futures._base", "ops/worker/__init__.py:2"),  # not ours
    ]
    assert [v.split(":")[0] for v in privacy_violations(bad)] == [
        "ops/worker/__init__.py",
        "tests/unit/x.py",
    ]
    loop = [
        Import("engine.local", "state.blockstore", "engine/local.py:1"),
        Import("state.blockstore", "engine.executor", "state/blockstore.py:1"),
        Import("ops.worker", "engine", "ops/worker/__init__.py:1"),
    ]
    assert package_cycles(package_graph(loop)) == [["engine", "state"]]


def runtime_imports_of_tooling(imports: list[Import]) -> list[str]:
    """Imports of :mod:`ops.tools` from the runtime (``ops`` outside ``ops.tools``).

    ``ops.cli``, the ``dstream`` entry point, is the one place that may look the tooling
    up, and it does so only when it is installed (the image does not install it).
    """
    return [
        f"{i.where}: {i.importer} imports {i.module}"
        for i in imports
        if i.importer.startswith("ops.")
        and not i.importer.startswith("ops.tools")
        and i.importer != "ops.cli"
        and (i.module == "ops.tools" or i.module.startswith("ops.tools."))
    ]


def test_the_runtime_never_imports_the_tooling() -> None:
    assert not runtime_imports_of_tooling(_all_imports())
    made_up = [
        Import("ops.services", "ops.tools.devservices", "ops/services.py:1"),
        Import("ops.tools.demo", "ops.services", "ops/tools/demo.py:1"),
        Import("ops.cli", "ops.tools", "ops/cli.py:1"),
    ]
    assert runtime_imports_of_tooling(made_up) == [
        "ops/services.py:1: ops.services imports ops.tools.devservices"
    ]
