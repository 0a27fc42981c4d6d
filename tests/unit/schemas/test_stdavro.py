"""schemas.stdavro (the engine's stdlib encoder) gives fastavro's bytes for every event, reads them back,
and knows the same writer schemas by the same fingerprints."""

from __future__ import annotations

import dataclasses
import io

import pytest
from fastavro import schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import codec, stdavro
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

LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
# Edges of every varint length, both signs, and the long's ends.
EDGES = sorted(
    {0, 1, -1, 63, 64, -64, -65, LONG_MIN, LONG_MAX}
    | {s * (2**k + d) for k in range(6, 63, 7) for d in (-1, 0) for s in (1, -1)}
)
longs = st.one_of(st.integers(LONG_MIN, LONG_MAX), st.sampled_from(EDGES), st.integers(-2000, 20000))
text = st.text(max_size=40)
rejects = st.sampled_from([r for r in RejectReason if r is not RejectReason.OTHER])
balance_reasons = st.sampled_from([r for r in BalanceReason if r is not BalanceReason.OTHER])

order_updates = st.builds(
    OrderUpdate,
    *[longs] * 4,
    text,
    longs,
    text,
    st.sampled_from(Side),
    st.sampled_from(OrderType),
    st.sampled_from(TimeInForce),
    *[longs] * 6,
    st.sampled_from(OrderStatus),
    rejects,
    *[longs] * 7,
)
trades = st.builds(Trade, *[longs] * 4, text, *[longs] * 3, st.sampled_from(Side), *[longs] * 6)
balance_updates = st.builds(BalanceUpdate, *[longs] * 4, text, *[longs] * 4, balance_reasons, longs)
events = st.one_of(order_updates, trades, balance_updates)


@settings(max_examples=600, deadline=None)
@given(ev=events)
def test_the_same_bytes_as_fastavro_and_back(ev):
    data = stdavro.encode(ev)
    assert data == codec.encode(ev)
    assert stdavro.decode(data) == ev == codec.decode(data)


def test_the_fingerprints_are_fastavros_for_every_writer():
    ours = {fp: (w.name, w.current) for fp, w in stdavro.writers().items()}
    # codec's writers as loaded from the .avsc files: its live table also learns writers at run time
    # (the registry tests add newer ones), stdavro's does not.
    theirs = {fp: w.name for fp, w in codec.load_schemas()[1].items()}
    assert {fp: name for fp, (name, _) in ours.items()} == theirs
    assert {name: fp for fp, (name, current) in ours.items() if current} == codec._CURRENT_FP
    for cls in (OrderUpdate, Trade, BalanceUpdate):
        assert stdavro.current_fingerprint(cls) == codec._CURRENT_FP[cls.__name__]


def test_crc64_avro_of_the_specification_vectors():
    # The empty input is the algorithm's seed; "a" and a canonical schema fingerprint as fastavro computes them.
    from fastavro.schema import fingerprint

    assert stdavro.crc64_avro(b"") == 0xC15D213AA4D7A795
    for text_ in ('"int"', '{"type":"fixed","name":"x","size":16}', "a"):
        want = int.from_bytes(bytes.fromhex(fingerprint(text_, "CRC-64-AVRO")), "little")
        assert stdavro.crc64_avro(text_.encode()) == want


def test_an_older_writer_encodes_what_it_has_and_decodes_with_defaults():
    (v1,) = [w for w in stdavro.writers().values() if w.name == "OrderUpdate" and not w.current]
    ev = OrderUpdate(7, 42, 1, 9, "c", 1001, "BTC-USD", Side.BUY, OrderType.LIMIT, TimeInForce.GTC,
                     100, 10, 0, 4, 6, 400, OrderStatus.PARTIALLY_FILLED, RejectReason.NONE,
                     4, 100, 3, 1, 2, 0, 17)  # fmt: skip
    old = v1.encode(ev)
    assert stdavro.writer_of(old) is v1 and old[2:10] != stdavro.encode(ev)[2:10]
    buf = io.BytesIO()
    _schema, _header, names, enums = codec._ENCODERS[OrderUpdate]
    record = {n: (getattr(ev, n).value if n in enums else getattr(ev, n)) for n in names}
    schemaless_writer(buf, codec._WRITERS[v1.fingerprint].parsed, record)  # fastavro with the old schema
    assert old[10:] == buf.getvalue()
    assert stdavro.decode(old) == dataclasses.replace(ev, user_seq=0)
    # A symbol the old writer lacks cannot be written with it.
    with pytest.raises(KeyError):
        v1.encode(dataclasses.replace(ev, reason=RejectReason.INVALID_CLIENT_ORDER_ID))


@pytest.mark.parametrize(
    "change, error",
    [({"seq": 2**63}, OverflowError), ({"user_id": -(2**63) - 1}, OverflowError), ({"symbol": "\ud800"}, UnicodeError)],
)
def test_what_no_long_or_utf8_string_can_carry_raises(change, error):
    ev = BalanceUpdate(1, 2, 3, 4, "USD", 5, 6, 7, 8, BalanceReason.DEPOSIT, 0)
    key = "asset" if "symbol" in change else next(iter(change))
    with pytest.raises(error):
        stdavro.encode(dataclasses.replace(ev, **{key: next(iter(change.values()))}))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc3\x01", b"\xc3\x01" + b"\xee" * 8, b"xx" + b"\x00" * 20],
    ids=["empty", "magic", "unknown-fingerprint", "bad-magic"],
)
def test_bytes_that_are_not_a_record_are_an_avro_error(data):
    with pytest.raises(stdavro.AvroError):
        stdavro.decode(data)


def test_truncated_and_trailing_bytes_are_an_avro_error():
    good = stdavro.encode(BalanceUpdate(1, 2, 3, 4, "USD", 5, 6, 7, 8, BalanceReason.DEPOSIT, 0))
    for bad in (good[:-1], good + b"\x00", good[:12] + b"\xff" * 11):
        with pytest.raises(stdavro.AvroError):
            stdavro.decode(bad)
