"""One exception root per package, and ``retriable`` declared on every class (issue 17).

Every public exception class a first-party module defines subclasses its package's root, and
says as a class attribute (a bool, never set per instance) whether trying again can help.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil

import pytest

from api.errors import ApiError
from audit.core import AuditError
from bench.errors import BenchError
from bridge.errors import BridgeError
from engine.interfaces import EngineError
from schemas.errors import SchemaError
from stack.errors import StackError
from streams.errors import StreamsError

ROOTS: dict[str, type[Exception]] = {
    "engine": EngineError,
    "bridge": BridgeError,
    "streams": StreamsError,
    "api": ApiError,
    "schemas": SchemaError,
    "audit": AuditError,
    "bench": BenchError,
    "stack": StackError,
}
NO_EXCEPTIONS = ("kit", "ohs")
"""Packages that define no exception of their own (kit's helpers raise their callers' errors)."""

OUTSIDE_THE_ROOT = {
    "bench.drivers.FormatError": "runs as a script in other virtualenvs: imports nothing of the project",
}
"""Public classes allowed outside their package's root, and why (they still declare ``retriable``)."""


def _modules(package: str) -> list[str]:
    pkg = importlib.import_module(package)
    # __main__ modules run their program when imported.
    return [package] + [
        m.name for m in pkgutil.walk_packages(pkg.__path__, f"{package}.") if not m.name.endswith("__main__")
    ]


def _exceptions(package: str) -> list[type[BaseException]]:
    found = []
    for name in _modules(package):
        module = importlib.import_module(name)
        for value in vars(module).values():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == name:
                found.append(value)
    return found


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_every_package_is_covered():
    assert set(ROOTS) | set(NO_EXCEPTIONS) == {
        "schemas", "kit", "engine", "bridge", "streams", "api", "audit", "bench", "stack", "ohs",
    }  # fmt: skip


@pytest.mark.parametrize("package", NO_EXCEPTIONS)
def test_packages_without_a_root_define_no_exception(package):
    assert [_qualname(c) for c in _exceptions(package) if not c.__name__.startswith("_")] == []


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_each_root_lives_in_its_package_and_declares_retriable(package):
    root = ROOTS[package]
    assert root.__module__.split(".")[0] == package
    assert "retriable" in vars(root)
    assert type(vars(root)["retriable"]) is bool


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_every_public_exception_subclasses_its_package_root(package):
    public = [c for c in _exceptions(package) if not c.__name__.startswith("_")]
    assert public, f"{package} defines no exception: move it to NO_EXCEPTIONS"
    stray = [_qualname(c) for c in public if not issubclass(c, ROOTS[package]) and _qualname(c) not in OUTSIDE_THE_ROOT]
    assert stray == []


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_retriable_is_a_bool_class_attribute_on_every_public_exception(package):
    for cls in _exceptions(package):
        if cls.__name__.startswith("_"):
            continue  # private control flow (_Abandoned, _Reassign, _NeverStarted, _OneLineUsageError)
        assert "retriable" in vars(cls), f"{_qualname(cls)} must declare retriable itself"
        assert type(vars(cls)["retriable"]) is bool, _qualname(cls)


def test_retriable_is_never_set_per_instance():
    """The constructors take no ``retriable`` flag; an instance reads its class's."""
    from bridge.errors import BridgeUnavailable
    from schemas.codec import CodecError, RegistryUnavailable

    with pytest.raises(TypeError):
        BridgeError("x", retriable=True)  # type: ignore[call-arg]
    assert "retriable" not in vars(BridgeUnavailable("down"))
    assert BridgeUnavailable("down").retriable is True
    assert RegistryUnavailable("http://registry").retriable is True
    assert RegistryUnavailable("http://registry").reason == "registry_unavailable"
    assert CodecError("bad_magic").retriable is False


def test_old_names_keep_their_builtin_bases():
    """Callers catching ValueError (or RuntimeError) still catch these."""
    from api.auth import TokenError
    from bench.raw import RawBenchError
    from engine.gateway import RequestError
    from schemas.checkpoint import CheckpointError
    from schemas.stdavro import AvroError
    from schemas.wire import WireError
    from streams.state import StateError

    for cls in (TokenError, RequestError, CheckpointError, AvroError, WireError, StateError):
        assert issubclass(cls, ValueError), cls
    assert issubclass(RawBenchError, RuntimeError)


def test_what_is_retriable():
    from api.errors import StorageUnavailable
    from engine.client import EngineClientError, EngineTimeout
    from streams.ceiling import CheckpointUnavailable
    from streams.errors import SinkRejected, SinkUnavailable
    from streams.lag import GroupNotFound, KafkaUnreachable
    from streams.processor import ProcessorStop

    retriable = {SinkUnavailable, CheckpointUnavailable, KafkaUnreachable, StorageUnavailable, EngineTimeout}
    final = {SinkRejected, ProcessorStop, GroupNotFound, EngineClientError, *ROOTS.values()}
    assert {c for c in retriable | final if c.retriable} == retriable


def test_no_code_sets_retriable_on_an_instance_or_passes_it_as_a_flag():
    """``x.retriable = ...`` or ``SomeError(..., retriable=...)`` anywhere in the packages would
    decide per instance what the class must say."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    found = []
    for package in [*ROOTS, *NO_EXCEPTIONS]:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                targets = node.targets if isinstance(node, ast.Assign) else []
                if isinstance(node, ast.AnnAssign | ast.AugAssign):
                    targets = [node.target]
                if any(isinstance(t, ast.Attribute) and t.attr == "retriable" for t in targets):
                    found.append(f"{path.relative_to(root)}:{node.lineno} sets .retriable")
                if isinstance(node, ast.Call) and any(k.arg == "retriable" for k in node.keywords):
                    found.append(f"{path.relative_to(root)}:{node.lineno} passes retriable=")
                if isinstance(node, ast.arg) and node.arg == "retriable":
                    found.append(f"{path.relative_to(root)}:{node.lineno} takes a retriable parameter")
    assert found == []
