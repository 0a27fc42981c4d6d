"""The collector settings every long-running process applies at its entry point (kit/runtime.py)."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from bridge.settings import BridgeSettings
from engine.settings import EngineSettings
from kit.runtime import GC_THRESHOLD0_DEFAULT, tune_gc
from streams.settings import WorkerSettings


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_the_first_threshold_is_raised_and_the_others_kept(restore_gc: None) -> None:
    gc.set_threshold(700, 11, 12)
    tune_gc(50_000, freeze=False)
    assert gc.get_threshold() == (50_000, 11, 12)


def test_what_exists_at_start_up_is_frozen_and_what_comes_later_is_not(restore_gc: None) -> None:
    gc.unfreeze()
    early = [object()]
    tune_gc(GC_THRESHOLD0_DEFAULT)
    frozen = gc.get_freeze_count()
    assert frozen > 0
    late = [[] for _ in range(1000)]
    assert gc.get_freeze_count() == frozen
    assert gc.is_tracked(late[0]) and early


class _Node:
    def __init__(self) -> None:
        self.other: object = self


def _dead_cycle() -> weakref.ref[_Node]:
    """A weak reference to a cycle nothing else refers to: only the collector can free it."""
    node = _Node()
    ref = weakref.ref(node)
    del node
    return ref


def test_garbage_of_start_up_is_collected_not_frozen(restore_gc: None) -> None:
    ref = _dead_cycle()
    tune_gc(GC_THRESHOLD0_DEFAULT)
    assert ref() is None, "a cycle that was already garbage was frozen (it would never be freed)"


def test_a_cycle_made_after_start_up_is_still_collected(restore_gc: None) -> None:
    """Raising the threshold defers collections; it must not stop them (nothing would free a cycle)."""
    tune_gc(GC_THRESHOLD0_DEFAULT)
    ref = _dead_cycle()
    assert ref() is not None  # a cycle: reference counting alone keeps it
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize(
    ("cls", "own"),
    [
        (EngineSettings, "OHS_ENGINE_GC_THRESHOLD0"),
        (BridgeSettings, "OHS_BRIDGE_GC_THRESHOLD0"),
        (WorkerSettings, "OHS_WORKER_GC_THRESHOLD0"),
    ],
)
def test_each_process_reads_its_own_threshold_or_the_shared_one(
    cls: type[EngineSettings | BridgeSettings | WorkerSettings], own: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cls(_env_file=None).gc_threshold0 == GC_THRESHOLD0_DEFAULT  # type: ignore[call-arg]
    monkeypatch.setenv("OHS_GC_THRESHOLD0", "20000")
    assert cls(_env_file=None).gc_threshold0 == 20_000  # type: ignore[call-arg]
    monkeypatch.setenv(own, "700")
    assert cls(_env_file=None).gc_threshold0 == 700  # type: ignore[call-arg]
    monkeypatch.setenv(own, "0")  # 0 would switch automatic collection off: refused
    with pytest.raises(ValidationError):
        cls(_env_file=None)  # type: ignore[call-arg]


_PROBE = "print('threshold', gc.get_threshold()[0], 'frozen', gc.get_freeze_count() > 0)"


@pytest.mark.parametrize(
    ("name", "code"),
    [
        (
            "BRIDGE",
            # Bridge.start would wait for Kafka: the probe stands in for it.
            "import bridge.service\n"
            f"def start(self, stop):\n    {_PROBE}\n    return False\n"
            "bridge.service.Bridge.start = start\n"
            "from bridge.cli import bridge\n"
            "bridge(args=[], standalone_mode=False)\n",
        ),
        (
            "ENGINE",
            # A real engine on a fresh journal; the probe runs in place of its serving loop.
            "import engine.service\n"
            f"def run(self, stop):\n    {_PROBE}\n"
            "engine.service.EngineService.run = run\n"
            "from engine.cli import engine\n"
            "engine(args=['run'], standalone_mode=False)\n",
        ),
    ],
    ids=["bridge", "engine"],
)
def test_the_entry_point_applies_the_setting(name: str, code: str, tmp_path: Path) -> None:
    """The process itself, not only the function: its start-up runs with the configured threshold."""
    env = {
        f"OHS_{name}_GC_THRESHOLD0": "12345",
        f"OHS_{name}_METRICS_PORT": "0",
        "OHS_ENGINE_JOURNAL_DIR": str(tmp_path / "journal"),
        "OHS_ENGINE_FEED_ENDPOINT": f"ipc://{tmp_path}/feed",
        "OHS_ENGINE_REPLAY_ENDPOINT": f"ipc://{tmp_path}/replay",
        "OHS_ENGINE_GATEWAY_ENDPOINT": f"ipc://{tmp_path}/gateway",
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-c", "import gc\n" + code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "threshold 12345 frozen True" in out.stdout, out.stderr[-2000:]
