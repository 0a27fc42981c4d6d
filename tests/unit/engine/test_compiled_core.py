"""The optional compiled core (setup.py compiles engine.book, engine.ledger, engine.core and
engine.batch with mypyc): it gives exactly what its source gives, and a build made from other source never runs.

The rest of the unit suite (the differential property test against the reference engine, the
book's self-check after every command) runs whichever core is built; on CI that is the compiled
one (OHS_REQUIRE_NATIVE=1 makes a missing build fail here instead of skipping). These tests run
the source in child processes (OHS_ENGINE_PURE=1), so both are checked in one suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import engine

ROOT = Path(__file__).resolve().parents[3]
COMPILED = engine.core_build() == "compiled (mypyc)"

if not COMPILED and os.environ.get("OHS_REQUIRE_NATIVE") == "1":
    raise RuntimeError(f"the engine core is not compiled (OHS_REQUIRE_NATIVE=1): {engine.core_build()}")

needs_build = pytest.mark.skipif(not COMPILED, reason=f"the engine core is not compiled: {engine.core_build()}")

# Runs the simulator's seeded flow through the core that this process imports, and prints what it
# gave: every result, every event's encoded bytes (hashed), the final state and its self-check.
RUN_FLOW = """
import hashlib, json, sys
import engine
from engine.core import Engine
from engine.settings import EngineSettings
from engine.simulator import stamped_flow
from schemas import wire

specs = EngineSettings(_env_file=None).symbol_specs()
core = Engine(specs, 7, maker_fee_bps=10, taker_fee_bps=20, fee_account=999_999)
digest, results, events = hashlib.sha256(), [], 0
for cmd in stamped_flow(specs, 200, int(sys.argv[1]), seed=11):
    r = core.execute(cmd)
    results.append((r.accepted, r.reason.name, r.order_id))
    events += len(r.events)
    payload, markers = wire.encode_events(r.events)
    digest.update(payload)
    assert markers is None
digest.update(repr(results).encode())
print(json.dumps({
    "build": engine.core_build(), "events": events, "digest": digest.hexdigest(),
    "state": core.state_hash(), "problems": core.validate_internal_state() + core.check_invariants(),
}))
"""


def _run(code: str, *args: str, cwd: Path = ROOT, pure: bool = False) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "OHS_ENGINE_PURE"}
    if pure:
        env["OHS_ENGINE_PURE"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@needs_build
def test_the_compiled_core_gives_exactly_what_its_source_gives() -> None:
    compiled = _run(RUN_FLOW, "20000")
    source = _run(RUN_FLOW, "20000", pure=True)
    assert compiled["build"] == "compiled (mypyc)"
    assert source["build"] == "Python (OHS_ENGINE_PURE=1)"
    assert compiled["problems"] == [] and source["problems"] == []
    assert int(str(compiled["events"])) > 80_000, "the flow fills, cancels and expires: many events"
    assert {k: compiled[k] for k in ("events", "digest", "state")} == {
        k: source[k] for k in ("events", "digest", "state")
    }


WHICH = """
import json, engine, engine.core
print(json.dumps({"build": engine.core_build(), "file": engine.core.__file__}))
"""


def _copy_package(tmp_path: Path) -> Path:
    """A copy of the engine package, the build beside its source, imported ahead of the real one."""
    shutil.copytree(ROOT / "engine", tmp_path / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "engine"


@needs_build
def test_the_build_runs_while_its_source_is_unchanged(tmp_path: Path) -> None:
    _copy_package(tmp_path)
    got = _run(WHICH, cwd=tmp_path)
    assert got["build"] == "compiled (mypyc)"
    assert str(got["file"]).startswith(str(tmp_path)) and str(got["file"]).endswith(".so")


@needs_build
@pytest.mark.parametrize("module", ["book", "ledger", "core", "batch"])
def test_a_source_edited_since_the_build_runs_as_source(tmp_path: Path, module: str) -> None:
    package = _copy_package(tmp_path)
    with (package / f"{module}.py").open("a") as f:
        f.write("# an edit the build has not seen\n")
    got = _run(WHICH, cwd=tmp_path)
    rebuild = "`make venv` (or `pip install -e .`) rebuilds it"
    assert got["build"] == f"Python ({module}.py changed since it was compiled: {rebuild})"
    assert got["file"] == str(package / "core.py")


@needs_build
def test_a_missing_or_damaged_build_record_runs_the_source(tmp_path: Path) -> None:
    package = _copy_package(tmp_path)
    (package / "_core_build.json").write_text("{not json")
    got = _run(WHICH, cwd=tmp_path)
    assert str(got["build"]).startswith("Python (engine/_core_build.json is unreadable")
    assert str(got["file"]).endswith("core.py")
    (package / "_core_build.json").unlink()
    assert _run(WHICH, cwd=tmp_path)["build"] == "Python (not built)"


def test_the_source_runs_when_asked_whatever_is_built() -> None:
    got = _run(WHICH, pure=True)
    assert got["build"] == "Python (OHS_ENGINE_PURE=1)" and str(got["file"]).endswith("core.py")


def test_setup_compiles_the_modules_the_package_checks() -> None:
    """setup.py's list and engine.COMPILED_MODULES name the same files."""
    text = (ROOT / "setup.py").read_text()
    line = next(x for x in text.splitlines() if x.startswith("CORE = "))
    assert [f"engine.{Path(p).stem}" for p in json.loads(line.removeprefix("CORE = "))] == list(engine.COMPILED_MODULES)
