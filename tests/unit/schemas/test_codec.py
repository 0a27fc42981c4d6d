"""Avro single-object encoding: round trips, fingerprints, evolution, and every error code."""

from __future__ import annotations

import copy
import io
import json
import struct

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import codec
from schemas.codec import SCHEMA_DIR, CodecError, decode, encode, event_type_of
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

longs = st.integers(min_value=-(2**63), max_value=2**63 - 1)
text = st.text(max_size=20)
emitted_reject = st.sampled_from([r for r in RejectReason if r is not RejectReason.OTHER])
emitted_balance = st.sampled_from([r for r in BalanceReason if r is not BalanceReason.OTHER])

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
    emitted_reject,
    *[longs] * 6,
)
trades = st.builds(Trade, *[longs] * 4, text, *[longs] * 3, st.sampled_from(Side), *[longs] * 6)
balance_updates = st.builds(BalanceUpdate, *[longs] * 4, text, *[longs] * 4, emitted_balance, longs)

SAMPLES = {
    "OrderUpdate": OrderUpdate(
        7,
        42,
        1_700_000_000_000_000_000,
        9,
        "cid-1",
        1001,
        "BTC-USD",
        Side.BUY,
        OrderType.LIMIT,
        TimeInForce.GTC,
        100,
        10,
        0,
        4,
        6,
        400,
        OrderStatus.PARTIALLY_FILLED,
        RejectReason.NONE,
        4,
        100,
        3,
        1_700_000_000_000_000_000,
        1_700_000_000_000_000_500,
        0,
    ),
    "Trade": Trade(7, 43, 1, 3, "BTC-USD", 100, 4, 400, Side.SELL, 9, 10, 1001, 1002, 1, 0),
    "BalanceUpdate": BalanceUpdate(7, 44, 1, 1001, "USD", 9_000, 600, -1000, 1000, BalanceReason.ORDER_LOCK, 9),
}


@settings(max_examples=200)
@given(event=st.one_of(order_updates, trades, balance_updates))
def test_every_event_round_trips(event):
    data = encode(event)
    assert data[:2] == b"\xc3\x01"
    assert decode(data) == event
    assert encode(decode(data)) == data  # deterministic bytes


def _crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO straight from the Avro specification, independent of fastavro."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for b in data:
        fp = (fp >> 8) ^ table[(fp ^ b) & 0xFF]
    return fp


def _canonical(schema) -> str:
    """Parsing Canonical Form for our schemas (records, enums, primitives), per the spec."""
    if isinstance(schema, str):
        return json.dumps(schema)
    if schema["type"] == "record":
        fields = ",".join(
            '{"name":%s,"type":%s}' % (json.dumps(f["name"]), _canonical(f["type"])) for f in schema["fields"]
        )
        full = schema["name"] if "." in schema["name"] else f"{schema['namespace']}.{schema['name']}"
        return '{"name":%s,"type":"record","fields":[%s]}' % (json.dumps(full), fields)
    if schema["type"] == "enum":
        full = f"exchange.orders.v1.{schema['name']}"
        return '{"name":%s,"type":"enum","symbols":%s}' % (
            json.dumps(full),
            json.dumps(schema["symbols"]).replace(" ", ""),
        )
    raise AssertionError(schema)


@pytest.mark.parametrize("name", ["OrderUpdate", "Trade", "BalanceUpdate"])
def test_header_carries_the_little_endian_crc64_of_the_canonical_form(name):
    schema = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
    expected = _crc64_avro(_canonical(schema).encode())
    assert encode(SAMPLES[name])[2:10] == struct.pack("<Q", expected)


def test_an_old_reader_reads_a_newer_writer_with_an_added_field(tmp_path):
    current = json.loads((SCHEMA_DIR / "OrderUpdate.avsc").read_text())
    newer = copy.deepcopy(current)
    newer["fields"].append({"name": "venue", "type": "string", "default": "main"})
    (tmp_path / "history").mkdir()
    (tmp_path / "OrderUpdate.avsc").write_text(json.dumps(current))
    (tmp_path / "history" / "OrderUpdate.v2.avsc").write_text(json.dumps(newer))
    readers, writers = codec.load_schemas(tmp_path)
    fp_new = codec.fingerprint_of(newer)
    assert fp_new in writers

    event = SAMPLES["OrderUpdate"]
    record = {k: (v.value if hasattr(v, "value") else v) for k, v in codec.decode_dict(encode(event))[1].items()}
    record["venue"] = "other"
    buf = io.BytesIO()
    buf.write(struct.pack("<2sQ", b"\xc3\x01", fp_new))
    schemaless_writer(buf, parse_schema(newer), record)
    data = buf.getvalue()
    # What codec.decode does for a known newer writer: resolve into the current reader.
    body = io.BytesIO(data[10:])
    old_view = schemaless_reader(body, writers[fp_new].parsed, readers["OrderUpdate"])
    assert "venue" not in old_view and old_view["order_id"] == event.order_id

    # And a newer reader reads what we write today, filling the default.
    new_view = schemaless_reader(io.BytesIO(encode(event)[10:]), parse_schema(current), parse_schema(newer))
    assert new_view["venue"] == "main" and new_view["seq"] == event.seq


def test_a_new_enum_symbol_reads_as_other_for_an_old_reader():
    current = json.loads((SCHEMA_DIR / "BalanceUpdate.avsc").read_text())
    newer = copy.deepcopy(current)
    reason = next(f for f in newer["fields"] if f["name"] == "reason")
    reason["type"]["symbols"].append("INTEREST")
    event = SAMPLES["BalanceUpdate"]
    record = {k: (v.value if hasattr(v, "value") else v) for k, v in codec.decode_dict(encode(event))[1].items()}
    record["reason"] = "INTEREST"
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(newer), record)
    buf.seek(0)
    assert schemaless_reader(buf, parse_schema(newer), parse_schema(current))["reason"] == "OTHER"


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda d: d[:5], "truncated"),
        (lambda d: d[:-3], "truncated"),
        (lambda d: b"\x00\x01" + d[2:], "bad_magic"),
        (lambda d: d[:2] + b"\xff" * 8 + d[10:], "unknown_fingerprint"),
        (lambda d: d + b"\x00\x00", "trailing_bytes"),
        # side (an enum) with index -64: bytes that no amount of padding makes valid
        (lambda d: d[:10] + b"\x00" * 6 + b"\x7f" + b"\x00" * 40, "undecodable"),
    ],
)
def test_bad_payloads_raise_a_reason_code(mangle, reason):
    data = encode(SAMPLES["OrderUpdate"])
    with pytest.raises(CodecError) as info:
        decode(mangle(data))
    assert info.value.reason == reason


@settings(max_examples=300)
@given(garbage=st.binary(max_size=200))
def test_garbage_never_escapes_as_anything_but_codec_error(garbage):
    try:
        decode(garbage)
    except CodecError as exc:
        assert exc.reason in {
            "truncated",
            "bad_magic",
            "unknown_fingerprint",
            "trailing_bytes",
            "undecodable",
        }


def test_event_type_from_fingerprint():
    assert event_type_of(encode(SAMPLES["Trade"])).name == "TRADE"
