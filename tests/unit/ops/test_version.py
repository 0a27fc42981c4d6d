"""``ohs --version`` and the ``ohs_build_info`` every process exports."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

from prometheus_client import CollectorRegistry, generate_latest

from kit import version


def test_the_version_is_the_installed_distributions(monkeypatch):
    version.build_version.cache_clear()
    monkeypatch.delenv("OHS_BUILD_VERSION", raising=False)
    try:
        assert version.build_version() == metadata.version(version.DISTRIBUTION)
        version.build_version.cache_clear()
        monkeypatch.setenv("OHS_BUILD_VERSION", "1.2.3+g1234abc")
        assert version.build_version() == "1.2.3+g1234abc"
    finally:
        version.build_version.cache_clear()


def test_ohs_version_prints_it_and_imports_nothing_heavy():
    code = (
        "import sys; from ohs.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit as e:\n    assert e.code in (0, None)\n"
        "names = ('confluent_kafka', 'cassandra', 'faust', 'prometheus_client')\n"
        "heavy = sorted(m for m in names if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    first, last = proc.stdout.splitlines()[0], proc.stdout.splitlines()[-1]
    assert first == f"ohs {version.build_version()}"
    assert last == "HEAVY []"


def test_build_info_is_one_gauge_with_a_series_per_component():
    registry = CollectorRegistry()
    version.register_build_info("worker", registry)
    version.register_build_info("bridge", registry)
    text = generate_latest(registry).decode()
    v = version.build_version()
    assert f'ohs_build_info{{component="worker",version="{v}"}} 1.0' in text
    assert f'ohs_build_info{{component="bridge",version="{v}"}} 1.0' in text
    assert text.count("# TYPE ohs_build_info gauge") == 1
