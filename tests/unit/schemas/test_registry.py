"""The registry wire format's header swaps, against an in-memory twin of the registry client."""

from __future__ import annotations

import io
import json

import pytest
from fastavro import parse_schema, schemaless_writer

from schemas.codec import SCHEMA_DIR, CodecError, current_schemas, decode, encode
from schemas.events import OrderStatus
from schemas.registry import Registry, is_registry_frame
from tests.unit.schemas.test_codec import SAMPLES


class TwinClient:
    """Just the calls Registry makes, with ids handed out like a registry does."""

    def __init__(self) -> None:
        self.by_id: dict[int, str] = {}
        self.subjects: dict[str, list[int]] = {}

    def register_schema(self, subject, schema):
        known = {text: schema_id for schema_id, text in self.by_id.items()}
        schema_id = known.get(schema.schema_str, len(self.by_id) + 1)
        self.by_id[schema_id] = schema.schema_str
        self.subjects.setdefault(subject, []).append(schema_id)
        return schema_id

    def get_schema(self, schema_id):
        from confluent_kafka.schema_registry import Schema
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        if schema_id not in self.by_id:
            raise SchemaRegistryError(404, 40403, "Schema not found")
        return Schema(self.by_id[schema_id], "AVRO")


TOPICS = {"OrderUpdate": "orders.updates", "Trade": "orders.trades", "BalanceUpdate": "balances.updates"}


def test_registered_frames_swap_headers_and_keep_the_avro_body():
    reg = Registry("http://twin", TwinClient())
    ids = reg.register(TOPICS)
    assert sorted(ids.values()) == [1, 2, 3]
    for event in SAMPLES.values():
        single = encode(event)
        framed = reg.to_registry(single)
        assert is_registry_frame(framed) and not is_registry_frame(single)
        assert framed[5:] == single[10:], "the body must be untouched"
        assert int.from_bytes(framed[1:5], "big") in ids.values()
        # A reader that has never seen the id (a fresh process) looks it up and gets the same bytes.
        fresh = Registry("http://twin", reg.client)
        assert fresh.to_single_object(framed) == single
        assert decode(fresh.to_single_object(framed)) == event


def test_a_newer_writer_schema_from_the_registry_is_read_by_resolution():
    client = TwinClient()
    Registry("http://twin", client).register(TOPICS)
    newer = json.loads((SCHEMA_DIR / "OrderUpdate.avsc").read_text())
    newer["fields"].append({"name": "venue", "type": "string", "default": "main"})
    new_id = client.register_schema("orders.updates-value", type("S", (), {"schema_str": json.dumps(newer)})())
    event = SAMPLES["OrderUpdate"]
    record = {f: getattr(event, f) for f in event.__dataclass_fields__}
    record = {k: (v.value if hasattr(v, "value") else v) for k, v in record.items()} | {"venue": "x"}
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(newer), record)
    framed = b"\x00" + new_id.to_bytes(4, "big") + buf.getvalue()
    got = decode(Registry("http://twin", client).to_single_object(framed))
    assert got == event and got.status in OrderStatus


def test_bad_frames_have_reasons():
    reg = Registry("http://twin", TwinClient())
    with pytest.raises(CodecError) as exc:
        reg.to_single_object(b"\x00\x00\x00\x00\x63body")
    assert exc.value.reason == "unknown_schema_id"
    with pytest.raises(CodecError) as exc:
        reg.to_single_object(b"\x00\x01")
    assert exc.value.reason == "truncated"
    with pytest.raises(CodecError) as exc:
        reg.to_registry(encode(SAMPLES["Trade"]))  # nothing registered yet
    assert exc.value.reason == "unregistered_schema"
    assert set(current_schemas()) == set(TOPICS)
