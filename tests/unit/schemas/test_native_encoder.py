"""The optional C encoder (schemas/_avroc.c) writes exactly the entries the Python encoder writes,
and hands back (None) every batch it must not encode, which Python then encodes, markers included.

Without the build these tests skip, unless OHS_REQUIRE_NATIVE=1 (CI sets it: there the build must
not fail unnoticed)."""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core import Engine
from engine.settings import EngineSettings
from engine.simulator import stamped_flow
from schemas import wire
from schemas.events import (
    BalanceReason,
    BalanceUpdate,
    OrderStatus,
    OrderType,
    OrderUpdate,
    RejectReason,
    Side,
    TimeInForce,
    Trade,
)
from tests.unit.schemas.test_stdavro import EDGES, events, text

try:
    from schemas import _avroc
except ImportError:
    _avroc = None

if _avroc is None:
    if os.environ.get("OHS_REQUIRE_NATIVE") == "1":
        raise RuntimeError("schemas._avroc was not built (OHS_REQUIRE_NATIVE=1): see the pip install output")
    pytest.skip("schemas._avroc was not built (no C compiler or Python headers)", allow_module_level=True)

native = _avroc.encode_entries


def python_entries(evs):
    was = wire.use_native(False)
    try:
        return wire.encode_events(evs)
    finally:
        wire.use_native(was)


def test_the_seeded_flow_encodes_to_the_same_bytes():
    specs = EngineSettings(_env_file=None).symbol_specs()
    engine = Engine(specs, 1_796_000_000_000_000)
    batches = [engine.execute(c).events for c in stamped_flow(specs, 200, 3_000, seed=7)]
    batches = [b for b in batches if b]
    assert sum(map(len, batches)) > 10_000
    assert {type(e) for b in batches for e in b} == {OrderUpdate, Trade, BalanceUpdate}
    for b in batches:
        out = native(b)
        assert out is not None
        assert (out, None) == python_entries(b)
        assert wire.encode_events(b) == (out, None)  # the default path is the C one


# Header fields must be non-negative for the fast path; the long fields take any long.
keys = st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([e for e in EDGES if e >= 0]))
longs = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from(EDGES))
publishable = st.one_of(
    st.builds(
        OrderUpdate,
        keys,
        keys,
        longs,
        longs,
        text,
        keys,
        text,
        st.sampled_from(Side),
        st.sampled_from(OrderType),
        st.sampled_from(TimeInForce),
        *[longs] * 6,
        st.sampled_from(OrderStatus),
        st.sampled_from([r for r in RejectReason if r is not RejectReason.OTHER]),
        *[longs] * 7,
    ),
    st.builds(
        Trade,
        keys,
        keys,
        *[longs] * 2,
        text,
        *[longs] * 3,
        st.sampled_from(Side),
        *[longs] * 2,
        keys,
        keys,
        longs,
        longs,
    ),
    st.builds(
        BalanceUpdate,
        keys,
        keys,
        longs,
        keys,
        text,
        *[longs] * 4,
        st.sampled_from([r for r in BalanceReason if r is not BalanceReason.OTHER]),
        longs,
    ),
)


@settings(max_examples=400, deadline=None)
@given(evs=st.lists(publishable, min_size=1, max_size=8))
def test_any_publishable_batch_gives_the_python_bytes(evs):
    out = native(evs)
    assert out is not None
    assert (out, None) == python_entries(evs)


def _engine_numbered(ev):
    """Epoch and seq as the engine numbers events (never negative: even the Python encoder's
    marker needs them in the header's unsigned fields)."""
    return dataclasses.replace(ev, epoch=abs(ev.epoch), seq=abs(ev.seq))


@settings(max_examples=300, deadline=None)
@given(evs=st.lists(st.one_of(events.map(_engine_numbered), publishable), min_size=1, max_size=6))
def test_any_batch_whatever_path_gives_the_python_result(evs):
    """``events`` holds negative header keys and longs beyond what the header's unsigned fields
    take: the C encoder declines those batches."""
    assert wire.encode_events(evs) == python_entries(evs)


GOOD = BalanceUpdate(1, 2, 3, 4, "USD", 5, 6, 7, 8, BalanceReason.DEPOSIT, 0)


@pytest.mark.parametrize(
    "change",
    [
        {"available": 2**63},  # beyond a long
        {"available": -(2**63) - 1},
        {"user_id": -1},  # a header key is unsigned
        {"seq": 2**63},  # beyond a long, though the header could carry it
        {"asset": "\ud800"},  # not UTF-8 encodable
        {"asset": "x" * 9000},  # over MAX_EVENT_BYTES: a marker
        {"available": True},  # not exactly an int: Python decides
        {"available": "5"},
        {"asset": 5},
        {"reason": Side.BUY},  # a member of another enum
    ],
)
def test_what_the_fast_path_declines_python_encodes_or_marks(change):
    bad = dataclasses.replace(GOOD, **change)
    batch = [GOOD, bad, dataclasses.replace(GOOD, seq=3)]
    assert native(batch) is None
    assert native([GOOD]) is not None
    assert wire.encode_events(batch) == python_entries(batch)


def test_an_unknown_object_and_a_non_sequence():
    assert native([GOOD, object()]) is None
    assert native([]) == b""
    with pytest.raises(TypeError):
        native(5)


def test_use_native_switches_the_path():
    assert wire.use_native(False) is False
    try:
        assert wire._native is None
    finally:
        assert wire.use_native(True) is True
    assert wire._native is native
