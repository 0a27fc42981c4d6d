"""The engine's hot path makes no reference cycles: the engine process's collector policy rests on it.

The engine collects its young generation only every ``OHS_ENGINE_GC_THRESHOLD0`` allocations and
freezes what start-up made (``kit.runtime.tune_gc``): reference counting frees every object that
executing, journaling and publishing a command makes, so the cyclic collector only walks live
state, and collecting rarely costs no memory. A change that made the hot path build cycles would
let garbage wait for those rare collections; this test finds it first. It runs in a fresh
interpreter: what other tests' libraries leave behind (a database driver's threads) is not the
engine's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

_CHECK = textwrap.dedent(
    """
    import gc, json, sys, uuid
    from pathlib import Path

    import zmq

    from engine.core import Engine
    from engine.service import EngineService
    from engine.settings import EngineSettings
    from engine.simulator import stamped_flow

    tag = uuid.uuid4().hex
    ends = {f"{k}_endpoint": f"inproc://{k}-{tag}" for k in ("feed", "replay", "gateway")}
    settings = EngineSettings(_env_file=None, journal_dir=Path(sys.argv[1]), fsync="never", **ends)
    # The simulator's seeded flow: orders, crossing orders, cancels, invalid orders, withdrawals.
    commands = stamped_flow(settings.symbol_specs(), 200, 5_000, seed=7)
    service = EngineService(settings, zmq.Context.instance())
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage, not freed
    accepted = 0
    for i in range(0, len(commands), 500):
        accepted += sum(r.accepted for r in service.submit(commands[i : i + 500]))
    core = Engine(settings.symbol_specs(), 2)
    for c in commands:
        core.execute(c)
    gc.collect()
    found = sorted({type(o).__name__ for o in gc.garbage})
    print(json.dumps({"accepted": accepted, "events": service.stats.events, "garbage": found}))
    """
)


def _run(tmp_path: Path, code: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "journal")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_executing_journaling_and_publishing_leave_no_cyclic_garbage(tmp_path: Path) -> None:
    got = _run(tmp_path, _CHECK)
    assert got["accepted"] and got["events"] > 5_000  # type: ignore[operator]
    assert got["garbage"] == [], f"cyclic garbage of types {got['garbage']}"


def test_the_check_sees_a_cycle_when_there_is_one(tmp_path: Path) -> None:
    # The same check, with a cycle made where the service submits: it must be found.
    cyclic = _CHECK.replace("accepted += sum(", "loop = []; loop.append(loop)\n    accepted += sum(", 1)
    assert cyclic != _CHECK
    assert "list" in _run(tmp_path, cyclic)["garbage"]  # type: ignore[operator]
