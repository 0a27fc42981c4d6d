"""The profile summary of ``ohs bench e2e --profile``: py-spy's collapsed stacks per component."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from bench.profile import component_of, py_spy, start, summarize


def test_components_are_top_level_packages_and_stdlib_modules():
    assert component_of("faust/agents/agent.py") == "faust"
    assert component_of("asyncio/base_events.py") == "stdlib:asyncio"
    assert component_of("json/encoder.py") == "stdlib:json"
    assert component_of("streams/app.py") == "streams"
    assert component_of("/x/.venv/lib/python3.11/site-packages/aiokafka/consumer/fetcher.py") == "aiokafka"
    assert component_of("<string>") == "other"


def test_self_and_inclusive_shares(tmp_path):
    stacks = tmp_path / "w.txt"
    stacks.write_text(
        "run (streams/app.py:10);prepare (streams/processor.py:20);decode (schemas/codec.py:5) 6\n"
        "run (streams/app.py:10);prepare (streams/processor.py:21) 2\n"
        "run (streams/app.py:10);_run_once (asyncio/base_events.py:1900);select (selectors.py:468) 2\n"
        "garbage line without a count\n"
    )
    s = summarize(stacks, top=10)
    assert s["samples"] == 10
    assert s["self_share_by_component"] == {"schemas": 0.6, "streams": 0.2, "stdlib:selectors": 0.2}
    assert s["top_self_functions"][0] == ["decode (schemas: codec.py)", 0.6]
    inclusive = dict(s["top_inclusive_functions"])
    assert inclusive["run (streams: app.py)"] == 1.0
    assert inclusive["prepare (streams: processor.py)"] == 0.8  # two lines of one function, counted once
    assert "_run_once (stdlib:asyncio: base_events.py)" not in inclusive  # not ours: on every sample anyway


@pytest.mark.skipif(py_spy() is None, reason="py-spy (a dev dependency) is not installed")
def test_a_real_py_spy_record_is_summarized(tmp_path):
    """Against the real tool: its output format is what ``summarize`` reads."""
    busy = subprocess.Popen(
        [sys.executable, "-c", "import json, time\nt = time.time()\nwhile time.time() - t < 20: json.dumps([1] * 50)"]
    )
    try:
        time.sleep(0.5)
        out = tmp_path / "busy.txt"
        spy = start(busy.pid, out, 2)
        assert spy is not None
        assert spy.wait(60) == 0
        s = summarize(out)
    finally:
        busy.kill()
        busy.wait()
    assert s["samples"] > 0, json.dumps(s)
    assert "stdlib:json" in s["self_share_by_component"], json.dumps(s)
