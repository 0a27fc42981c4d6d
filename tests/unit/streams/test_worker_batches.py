"""The worker's batch loops process every event Contiguity admitted, whatever the assignment
says by the time they get to it: an admitted event is counted as taken, so a partition given
back to this worker would not take it again. (The trades agent filtered its batch by a second
look at the assignment, after an await: a rebalance in between lost 452 fills in a CI run.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_PROBE = r"""
import asyncio, json
from types import SimpleNamespace as NS
import streams.app as a
from streams.processor import BatchResult

class Ev:
    def __init__(self, topic, partition, offset):
        self.message = NS(tp=(topic, partition), topic=topic, partition=partition, offset=offset,
                          key=b"7", value=b"v", headers=None)
        self.acked = False
    def ack(self):
        self.acked = True

class Processor:
    def __init__(self):
        self.records = []
    async def process(self, records):
        self.records += [(r.partition, r.offset) for r in records]
        return BatchResult(applied=len(records)), {}

class Committer:
    def __init__(self):
        self.offsets = {}
    def request(self, offsets, deliveries=()):
        self.offsets.update({f"{tp[0]}/{tp[1]}": o for tp, o in offsets.items()})

async def main():
    committed = {("t", 0): 10, ("t", 1): 5}
    a.fa.committed_offset = lambda app: committed.get
    sought = []
    async def seek_back(app, tp, offset):
        sought.append([tp[1], offset])
        return offset
    a.fa.seek_back = seek_back
    guard = a.fa.Contiguity()
    # p0 from its committed offset 10; p1 skips 5 (sought back); p2 is not this worker's.
    events = [Ev("t", 0, 10), Ev("t", 0, 11), Ev("t", 1, 6), Ev("t", 2, 3), Ev("t", 0, 9)]
    taken = await a._contiguous(guard, events, {("t", 0), ("t", 1)})
    out = {
        "taken": [[e.message.partition, e.message.offset] for e in taken],
        "acked": [[e.message.partition, e.message.offset] for e in events if e.acked],
        "sought": sought,
    }
    # The assignment changes (a rebalance) before the admitted events are processed.
    a.fa.assignment = lambda app: set()
    processor, committer = Processor(), Committer()
    await a._apply_trades(processor, committer, taken)
    out["processed"] = processor.records
    out["committed"] = committer.offsets
    out["all_acked"] = all(e.acked for e in taken)
    print(json.dumps(out))

asyncio.run(main())
"""


def test_contiguous_hands_on_admitted_events_and_trades_process_all_of_them(tmp_path: Path) -> None:
    env = {**os.environ, "OHS_WORKER_STORE": "memory://", "OHS_WORKER_DATA_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["taken"] == [[0, 10], [0, 11]]
    # Not owned (p2), skipped ahead of (p1 at 6 while 5 is next) or taken before (p0 at 9): acked, never taken.
    assert sorted(got["acked"]) == [[0, 9], [1, 6], [2, 3]]
    assert got["sought"] == [[1, 5]]
    assert got["processed"] == [[0, 10], [0, 11]]
    assert got["committed"] == {"t/0": 12}
    assert got["all_acked"] is True


_TAKE_PROBE = r"""
import asyncio, json
from types import SimpleNamespace as NS
import streams.app as a

async def main():
    committed = {("t", 0): 10, ("t", 1): 5}
    a.fa.committed_offset = lambda app: committed.get
    a.fa.assignment = lambda app: {("t", 0), ("t", 1)}
    # p0 was taken to its end (12); p1's backlog 5-8 was fetched (the consumer is at its end, 9)
    # and never reached the queue.
    a.fa.fetched_ends = lambda stream: {("t", 0): 12, ("t", 1): 9}
    sought = []
    async def seek_back(app, tp, offset):
        sought.append([tp[1], offset])
        return offset
    a.fa.seek_back = seek_back
    calls = []
    async def take_available(stream, max_events, skipped=None):
        calls.append(len(sought))
        if len(calls) == 1:
            await asyncio.sleep(60)  # the queue stays empty: _take gives up after retry_s
        return ["the records sought back"]
    a.fa.take_available = take_available
    guard = a.fa.Contiguity(retry_s=0.05)
    guard.admit([NS(message=NS(tp=("t", 0), offset=o)) for o in (10, 11)], committed.get)
    got = await asyncio.wait_for(a._take(guard, NS()), 30)
    print(json.dumps({"got": got, "sought": sought, "calls": calls}))

asyncio.run(main())
"""


def test_take_seeks_back_a_partition_fetched_to_its_end_whose_records_never_came(tmp_path: Path) -> None:
    """A restarted worker's whole backlog of a partition was fetched and never reached the queue
    (no later record showed the gap: the CI failure of ee54af2). Once the queue has been empty
    for ``retry_s``, the batch loop seeks that partition back to its next offset, and only it."""
    env = {**os.environ, "OHS_WORKER_STORE": "memory://", "OHS_WORKER_DATA_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", _TAKE_PROBE], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["sought"] == [[1, 5]], "p1 from its committed offset; p0 was taken to its end"
    assert got["calls"] == [0, 1] and got["got"] == ["the records sought back"]
