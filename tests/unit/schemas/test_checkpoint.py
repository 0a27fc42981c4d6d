"""The checkpoint record and the seq ceiling lease, in isolation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.checkpoint import CeilingLease, Checkpoint, CheckpointError


def test_a_checkpoint_round_trips_and_an_old_record_reads_its_watermark_as_the_ceiling():
    cp = Checkpoint(epoch=1_700_000_000_000_000, watermark=41, ceiling=100_041)
    assert Checkpoint.from_bytes(cp.to_bytes()) == cp
    assert cp.to_bytes() == b'{"epoch":1700000000000000,"watermark":41,"ceiling":100041}'
    assert Checkpoint.from_bytes(b'{"epoch": 7, "watermark": 12}') == Checkpoint(7, 12, 12)
    assert Checkpoint.from_bytes(b'{"epoch":7,"watermark":1,"ceiling":5,"future":"x"}') == Checkpoint(7, 1, 5)


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"epoch": 1}',
        b'{"epoch": -1, "watermark": 0}',
        b'{"epoch": true, "watermark": 0}',
        b'{"epoch": 1, "watermark": 1.5}',
        b'{"epoch": 1, "watermark": "3"}',
        b'{"epoch": 18446744073709551616, "watermark": 0}',
        b'{"epoch": 1, "watermark": 10, "ceiling": 9}',
        b'{"epoch": 1, "watermark": 0, "pad": "' + b"x" * 5000 + b'"}',
    ],
)
def test_anything_else_is_not_a_checkpoint(value):
    with pytest.raises(CheckpointError):
        Checkpoint.from_bytes(value)


def test_the_lease_is_renewed_at_half_way_and_seqs_wait_for_the_acknowledgement():
    lease = CeilingLease(lease=100)
    assert not lease.allows(1)
    assert lease.renewal(0) == 100  # a fresh epoch: ask before the first record
    assert lease.renewal(3) is None  # already requested, not yet acknowledged
    assert not lease.allows(1)
    lease.on_ack(100)
    assert lease.allows(100) and not lease.allows(101)
    assert lease.renewal(50) is None  # at half-way: not yet
    assert lease.renewal(51) == 151  # past half-way: renew ahead of need
    assert lease.allows(100) and not lease.allows(101)
    lease.on_ack(151)
    assert lease.allows(151)


def test_a_failed_renewal_is_asked_again_and_the_ceiling_never_goes_down():
    lease = CeilingLease(lease=10, acked=20)
    assert lease.requested == 20
    assert lease.renewal(16) == 26
    lease.on_failure(26)
    assert lease.requested == 20 and lease.renewal(16) == 26
    lease.on_ack(26)
    lease.on_ack(22)  # a late acknowledgement of an older write
    assert lease.acked == 26
    lease.on_failure(22)  # an older write failing changes nothing
    assert lease.requested == 26


def test_a_lease_below_two_seqs_is_refused():
    with pytest.raises(ValueError):
        CeilingLease(lease=1)


@settings(deadline=None)  # behaviour, not speed
@given(
    lease=st.integers(2, 50),
    steps=st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["ack", "fail", "none"])), max_size=80),
)
def test_a_bridge_driving_the_lease_never_produces_above_an_acknowledged_ceiling(lease, steps):
    """A model of the bridge: received grows, ready seqs are produced only while allowed, writes
    are acknowledged or fail in order. Produced seqs are always covered, in order, and a stream
    whose writes eventually succeed always drains."""
    lc = CeilingLease(lease=lease)
    received, produced, written = 0, 0, []
    for grow, outcome in steps:
        received += grow
        ceiling = lc.renewal(received)
        if ceiling is not None:
            written.append(ceiling)
        if written and outcome != "none":
            c = written.pop(0)
            lc.on_ack(c) if outcome == "ack" else lc.on_failure(c)
        while produced < received and lc.allows(produced + 1):
            produced += 1
        assert produced <= lc.acked
        assert lc.requested >= lc.acked
    for _ in range(3):  # Kafka back: every write succeeds
        ceiling = lc.renewal(received)
        for c in [*written, *([ceiling] if ceiling else [])]:
            lc.on_ack(c)
        written = []
    assert lc.allows(received)
