"""The package layout is the data flow: who may import whom, checked on the source with ``ast``.

engine -> bridge -> Kafka -> streams (worker) -> Cassandra -> api, each stage reading only the
shared contract (``schemas``) and the neutral helpers (``kit``), never another stage's modules.
``docs/architecture.md`` ("Package map") is the same table in prose. Every import counts: at
module level, inside functions (lazy imports) and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ALL = frozenset({"schemas", "kit", "engine", "bridge", "streams", "api", "audit", "bench", "stack", "ohs"})

# package -> the first-party packages it may import (besides itself), and why.
ALLOWED: dict[str, frozenset[str]] = {
    # The contract (events, Avro, feed frames, checkpoint, tables, symbols): every stage reads it, so it reads none.
    "schemas": frozenset(),
    # Logging, build version, CQL cluster factory: below everything, so anything may use it.
    "kit": frozenset(),
    # The first stage: produces the contract's events, logs through kit.
    "engine": frozenset({"schemas", "kit"}),
    # Reads the engine's feed as wire frames (schemas.wire), never the engine's modules.
    "bridge": frozenset({"schemas", "kit"}),
    # The worker reads Kafka records (schemas.codec) and the bridge's checkpoint (schemas.checkpoint).
    "streams": frozenset({"schemas", "kit"}),
    # Reads the worker's tables through schemas.tables, the symbols through schemas.symbols.
    "api": frozenset({"schemas", "kit"}),
    # Checks the journal, Kafka and Cassandra against each other: reads each stage's own formats and settings.
    "audit": frozenset({"schemas", "engine", "bridge", "streams"}),
    # Drives the real stages (engine core, worker sink, stack processes) to measure them.
    "bench": frozenset({"schemas", "kit", "engine", "streams", "stack"}),
    # Starts local servers from jars: independent of the pipeline.
    "stack": frozenset(),
    # The command line: wires every package's commands together, so it may import all of them.
    "ohs": ALL - {"ohs"},
}

# The pure core: deterministic matching and the contract it emits, standard library only.
PURE = frozenset(
    {
        "engine.core",
        "engine.batch",
        "engine.book",
        "engine.ledger",
        "engine.commands",
        "engine.reference",
        "engine.interfaces",
        "schemas.events",
        "schemas.symbols",
    }
)

# C builds with a Python fallback (pyproject.toml's optional ext-modules): the pure core may use one
# only where it imports it inside ``try`` with ``except ImportError`` and goes on in Python without
# it; tests/unit/schemas/test_native.py proves both give the same results.
OPTIONAL_NATIVE = frozenset({"schemas._avroc"})

# Run as a script in other virtualenvs (``ohs bench drivers``): nothing of the project is there.
STANDALONE = frozenset({"bench.drivers"})


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path, module: str) -> Iterator[str]:
    """Every module ``path`` imports, absolute (``from a import b`` is ``a.b`` when b is a module)."""
    yield from _imports_in(ast.walk(ast.parse(path.read_text(), str(path))), path, module)


def _imports_in(nodes: Iterable[ast.AST], path: Path, module: str) -> Iterator[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target
            for alias in node.names:
                if _is_module(f"{target}.{alias.name}"):
                    yield f"{target}.{alias.name}"


def guarded_imports(path: Path, module: str) -> frozenset[str]:
    """The modules ``path`` imports inside a ``try`` whose handler catches ImportError."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            out.update(_imports_in((n for stmt in node.body for n in ast.walk(stmt)), path, module))
    return frozenset(out)


@cache
def module_imports() -> Mapping[str, frozenset[str]]:
    """First-party module -> the modules it imports."""
    out: dict[str, frozenset[str]] = {}
    for pkg in sorted(ALL):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            module = _module_name(path)
            out[module] = frozenset(imports_of(path, module))
    return out


def package_graph(modules: Mapping[str, frozenset[str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in modules.items():
        src = module.split(".")[0]
        graph.setdefault(src, set()).update(t.split(".")[0] for t in targets if t.split(".")[0] in ALL)
        graph[src].discard(src)
    return graph


def forbidden(modules: Mapping[str, frozenset[str]], allowed: Mapping[str, frozenset[str]]) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in modules.items()
        for target in targets
        if (dst := target.split(".")[0]) in ALL
        and dst != (src := module.split(".")[0])
        and dst not in allowed.get(src, frozenset())
    )


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def impure(
    modules: Mapping[str, frozenset[str]], pure: frozenset[str], fallbacks: Mapping[str, frozenset[str]] | None = None
) -> list[str]:
    """Imports of the pure modules that are neither the standard library nor another pure module,
    nor an optional C build the module imports with a fallback (``fallbacks``: module -> those)."""
    fallbacks = fallbacks or {}
    return sorted(
        f"{module} imports {target}"
        for module in pure
        for target in modules[module]
        if target.split(".")[0] not in sys.stdlib_module_names
        and target not in pure
        and target != "schemas"
        and target not in fallbacks.get(module, frozenset()) & OPTIONAL_NATIVE
    )


# ------------------------------------------------------------------------------------- the rules
def test_every_package_is_in_the_map():
    found = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert found == ALL == set(ALLOWED), "a top-level package must be given its place in ALLOWED"


def test_each_package_imports_only_what_the_map_allows():
    assert forbidden(module_imports(), ALLOWED) == []


def test_the_packages_import_no_cycle():
    assert find_cycle(package_graph(module_imports())) is None


def test_the_pure_core_imports_only_the_standard_library():
    fallbacks = {}
    for module in PURE:
        path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
        fallbacks[module] = guarded_imports(path, module)
    assert impure(module_imports(), PURE, fallbacks) == []


def test_standalone_scripts_import_nothing_of_the_project():
    modules = module_imports()
    assert [f"{m} imports {t}" for m in STANDALONE for t in modules[m] if t.split(".")[0] in ALL] == []


def test_the_map_is_no_looser_than_the_code():
    """An allowance nothing uses any more is removed, so the map stays the real one (ohs excepted)."""
    graph = package_graph(module_imports())
    unused = {pkg: sorted(ALLOWED[pkg] - graph.get(pkg, set())) for pkg in ALLOWED if pkg != "ohs"}
    assert {pkg: extra for pkg, extra in unused.items() if extra} == {}


def test_pyproject_installs_and_type_checks_every_package():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = conf["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in include} == ALL
    assert set(conf["tool"]["mypy"]["files"]) == ALL
    assert "jvm/*.java" in conf["tool"]["setuptools"]["package-data"]["bench"]


# ------------------------------------------------------------------- the checks can fail at all
def test_the_checks_catch_what_they_are_for():
    modules = {
        "api.routes": frozenset({"streams.state", "schemas.events"}),
        "engine.core": frozenset({"engine.book", "pydantic", "schemas.codec"}),
        "engine.book": frozenset({"dataclasses"}),
        "streams.sink": frozenset({"api.models"}),
    }
    assert forbidden(modules, ALLOWED) == [
        "api.routes imports streams.state",
        "streams.sink imports api.models",
    ]
    assert find_cycle(package_graph(modules)) == ["api", "streams", "api"]
    assert impure(modules, frozenset({"engine.core", "engine.book"})) == [
        "engine.core imports pydantic",
        "engine.core imports schemas.codec",
    ]
    native = {"engine.core": frozenset({"schemas._avroc"})}
    assert impure(native, frozenset({"engine.core"})) == ["engine.core imports schemas._avroc"]
    assert impure(native, frozenset({"engine.core"}), fallbacks=native) == []


@pytest.mark.parametrize(
    ("source", "want"),
    [
        ("try:\n    from schemas._avroc import f\nexcept ImportError:\n    f = None", {"schemas._avroc"}),
        ("try:\n    import schemas._avroc\nexcept (ImportError, OSError):\n    pass", set()),  # not a plain handler
        ("from schemas._avroc import f", set()),
        ("try:\n    from schemas._avroc import f\nexcept ValueError:\n    pass", set()),
    ],
)
def test_an_optional_build_counts_only_when_imported_with_a_fallback(tmp_path, source, want):
    path = tmp_path / "core.py"
    path.write_text(source)
    assert guarded_imports(path, "engine.core") == want


@pytest.mark.parametrize(
    ("source", "want"),
    [
        ("import engine.core", {"engine.core"}),
        ("from schemas import stdavro", {"schemas", "schemas.stdavro"}),
        ("def f():\n    from streams.sink import connect", {"streams.sink"}),
        ("from .settings import X", {"bridge.settings"}),
    ],
)
def test_imports_are_read_wherever_they_are(tmp_path, source, want):
    path = tmp_path / "service.py"
    path.write_text(source)
    assert set(imports_of(path, "bridge.service")) == want
