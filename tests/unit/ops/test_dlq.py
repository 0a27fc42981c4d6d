"""streams.dlq without a broker: what a dead letter says, how it decodes, what may be re-driven."""

from __future__ import annotations

import struct

import pytest

from schemas.codec import encode
from schemas.events import OrderStatus, OrderType, OrderUpdate, RejectReason, Side, TimeInForce
from streams.dlq import Letter, decode_letter, frames_of, plan_redrive, refusal

EV = OrderUpdate(
    epoch=1_700_000_000_000_000, seq=77, ts_ns=1, order_id=5, client_order_id="", user_id=42, symbol="BTC-USD",
    side=Side.SELL, order_type=OrderType.LIMIT, time_in_force=TimeInForce.GTC, price=100, qty=3, quote_budget=0,
    filled_qty=0, remaining_qty=3, quote_filled=0, status=OrderStatus.NEW, reason=RejectReason.NONE, last_fill_qty=0,
    last_fill_price=0, trade_id=0, created_ns=1, updated_ns=1, expire_ns=0, user_seq=4,
)  # fmt: skip
WORKER = {"source": "worker", "reason": "beyond_ceiling", "topic": "orders.updates", "partition": "2", "offset": "17"}


def letter(value: bytes | None = None, key: bytes | None = b"42", **headers: str) -> Letter:
    return Letter(
        "orders.dlq",
        0,
        9,
        1.0,
        key,
        encode(EV) if value is None else value,
        tuple((k, v.encode()) for k, v in headers.items()),
    )


def framed(*frames: bytes) -> bytes:
    return struct.pack(">I", len(frames)) + b"".join(struct.pack(">I", len(f)) + f for f in frames)


def test_headers_read_as_the_writers_wrote_them():
    x = letter(**WORKER, detail="why")
    assert (x.source, x.reason, x.detail, x.where) == ("worker", "beyond_ceiling", "why", "orders.updates[2]@17")
    assert (x.size, x.original_size, x.truncated) == (len(encode(EV)), len(encode(EV)), False)
    cut = letter(b"abc", **WORKER, truncated_from="2000000")
    assert (cut.size, cut.original_size, cut.truncated) == (3, 2_000_000, True)
    bare = letter()
    assert (bare.source, bare.reason, bare.where, bare.source_partition) == ("?", "?", "-", None)
    assert letter(**{**WORKER, "partition": "two"}).source_partition is None


def test_frames_of_a_bridge_dead_letter():
    assert frames_of(framed(b"head", b"body")) == [b"head", b"body"]
    assert frames_of(framed()) == []
    assert frames_of(framed(b"head", b"body")[:-1]) is None  # cut short
    assert frames_of(framed(b"x") + b"extra") is None
    assert frames_of(b"\xff\xff\xff\xff") is None  # an absurd frame count
    assert frames_of(b"") is None


def test_decoding_worker_and_bridge_payloads():
    name, record = decode_letter(letter(**WORKER))
    assert name == "OrderUpdate" and (record["seq"], record["side"], record["user_seq"]) == (77, "SELL", 4)
    name, record = decode_letter(letter(framed(b"header", encode(EV)), source="bridge"))
    assert record["order_id"] == 5
    assert decode_letter(letter(b"\xc3\x01garbage", **WORKER)).startswith("not decodable here")
    assert "OHS_SCHEMA_REGISTRY_URL" in decode_letter(letter(b"\x00\x00\x00\x00\x07rest", **WORKER))
    assert decode_letter(letter(framed(b"only-one"), source="bridge")).startswith("no Avro payload")


@pytest.mark.parametrize(
    ("changes", "key", "value", "why"),
    [
        ({"source": "bridge"}, b"42", None, "is not a topic"),
        ({"source": "audit"}, b"42", None, "is not a topic"),
        ({"topic": ""}, b"42", None, "header is missing"),
        ({"offset": "x"}, b"42", None, "header is missing"),
        ({"truncated_from": "2000000"}, b"42", b"abc", "value was cut"),
        ({"truncated": "1"}, b"42", None, "value was cut"),
        ({"null_value": "1"}, b"42", b"", "tombstone"),
        ({}, None, None, "no key"),
        ({}, b"9" * 256, None, "key may have been cut"),
        ({"topic": "gone"}, b"42", None, "does not exist"),
        ({"partition": "3"}, b"42", None, "has no partition 3"),
    ],
)
def test_what_cannot_be_redriven_is_refused_with_the_reason(changes, key, value, why):
    x = letter(value, key, **{**WORKER, **changes})
    assert why in refusal(x, {"orders.updates": 3})
    (planned,) = plan_redrive([x], {"orders.updates": 3})
    assert why in planned.refused and planned.headers == ()


def test_a_redrive_keeps_epoch_and_seq_and_says_where_it_came_from():
    assert refusal(letter(**WORKER), {"orders.updates": 3}) == ""
    assert refusal(letter(**{**WORKER, "source": "replay"}), None) == ""
    (r,) = plan_redrive([letter(**WORKER)], {"orders.updates": 3})
    assert dict(r.headers) == {"epoch": str(EV.epoch).encode(), "seq": b"77", "redriven-from": b"orders.dlq:0:9"}
    # Headers on the dead letter win over the payload; no epoch/seq when neither says.
    (r,) = plan_redrive([letter(**WORKER, epoch="3", seq="4")])
    assert dict(r.headers)["epoch"] == b"3" and dict(r.headers)["seq"] == b"4"
    (r,) = plan_redrive([letter(b"\xc3\x01garbage", **WORKER)])
    assert [k for k, _ in r.headers] == ["redriven-from"] and not r.refused
