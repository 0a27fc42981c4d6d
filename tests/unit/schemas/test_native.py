"""The optional C build (schemas/_avroc.c): its encoder writes exactly the entries the Python
encoder writes, and hands back (None) every batch it must not encode, which Python then encodes,
markers included; its constructor builds the very objects the Python twin builds.

Without the build these tests skip, unless OHS_REQUIRE_NATIVE=1 (CI sets it: there the build must
not fail unnoticed)."""

from __future__ import annotations

import dataclasses
import gc
import pickle
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.commands import CommandResult
from engine.core import Engine
from engine.settings import EngineSettings
from engine.simulator import stamped_flow
from schemas import events as E
from schemas import wire
from schemas.events import fast_constructor, python_constructor
from tests.unit.optional_build import built
from tests.unit.schemas.test_stdavro import EDGES, events, text

_avroc = built("schemas._avroc")

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
    assert {type(e) for b in batches for e in b} == {E.OrderUpdate, E.Trade, E.BalanceUpdate}
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
        E.OrderUpdate,
        keys,
        keys,
        longs,
        longs,
        text,
        keys,
        text,
        st.sampled_from(E.Side),
        st.sampled_from(E.OrderType),
        st.sampled_from(E.TimeInForce),
        *[longs] * 6,
        st.sampled_from(E.OrderStatus),
        st.sampled_from([r for r in E.RejectReason if r is not E.RejectReason.OTHER]),
        *[longs] * 7,
    ),
    st.builds(
        E.Trade,
        keys,
        keys,
        *[longs] * 2,
        text,
        *[longs] * 3,
        st.sampled_from(E.Side),
        *[longs] * 2,
        keys,
        keys,
        longs,
        longs,
    ),
    st.builds(
        E.BalanceUpdate,
        keys,
        keys,
        longs,
        keys,
        text,
        *[longs] * 4,
        st.sampled_from([r for r in E.BalanceReason if r is not E.BalanceReason.OTHER]),
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


GOOD = E.BalanceUpdate(1, 2, 3, 4, "USD", 5, 6, 7, 8, E.BalanceReason.DEPOSIT, 0)


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
        {"reason": E.Side.BUY},  # a member of another enum
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


# ------------------------------------------------------------------------------- constructor
SAMPLES = [
    E.OrderUpdate(
        1,
        2,
        3,
        4,
        "c-1",
        5,
        "BTC-USD",
        E.Side.BUY,
        E.OrderType.LIMIT,
        E.TimeInForce.GTC,
        10,
        11,
        0,
        0,
        11,
        0,
        E.OrderStatus.NEW,
        E.RejectReason.NONE,
        0,
        0,
        0,
        3,
        3,
        0,
        1,
    ),
    E.Trade(1, 3, 4, 7, "BTC-USD", 10, 2, 20, E.Side.SELL, 8, 9, 5, 6, 1, 2),
    GOOD,
    CommandResult(True, E.RejectReason.NONE, 4, (GOOD,)),
]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_the_c_constructor_builds_what_the_class_and_the_python_twin_build(sample):
    cls = type(sample)
    values = [getattr(sample, f.name) for f in dataclasses.fields(cls)]
    built = fast_constructor(cls)
    assert type(built).__name__ == "SlotsConstructor"  # the C one is in use
    a, b = built(*values), python_constructor(cls)(*values)
    for ev in (a, b):
        assert type(ev) is cls
        assert ev == sample and hash(ev) == hash(sample) and repr(ev) == repr(sample)
        assert pickle.loads(pickle.dumps(ev)) == sample
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(ev, dataclasses.fields(cls)[0].name, 99)
        assert dataclasses.replace(ev) == sample


def test_the_c_constructor_takes_exactly_every_field_positionally():
    build = fast_constructor(E.BalanceUpdate)
    values = [getattr(GOOD, f.name) for f in dataclasses.fields(E.BalanceUpdate)]
    with pytest.raises(TypeError, match="exactly 11"):
        build(*values[:-1])
    with pytest.raises(TypeError, match="keywords"):
        build(*values[:-1], ref_id=0)


def test_the_c_constructor_refuses_what_is_not_a_slots_class():
    class Plain:
        pass

    with pytest.raises(ValueError):
        _avroc.slots_constructor(Plain, ("x",))
    with pytest.raises(ValueError, match="not an object slot"):
        _avroc.slots_constructor(E.BalanceUpdate, ("epoch", "nope"))
    with pytest.raises(ValueError, match="twice"):
        _avroc.slots_constructor(E.BalanceUpdate, ("epoch", "epoch"))


def test_the_c_constructor_holds_one_reference_per_slot_and_frees_it():
    build = fast_constructor(E.BalanceUpdate)
    asset = "".join(["U", "SD"])  # not interned: only this test refers to it
    before = sys.getrefcount(asset)
    built = [build(1, i, 3, 4, asset, 5, 6, 7, 8, E.BalanceReason.DEPOSIT, 0) for i in range(1000)]
    assert sys.getrefcount(asset) == before + 1000
    assert all(gc.is_tracked(b) for b in built[:10])  # found by the cycle collector like any instance
    del built
    assert sys.getrefcount(asset) == before
