"""The Confluent schema-registry wire format, beside the registry-free single-object encoding.

When ``OHS_SCHEMA_REGISTRY_URL`` is set (Redpanda's built-in registry, Confluent Schema Registry,
Apicurio's ccompat API, Karapace), the bridge registers the current schemas under the topic-name
strategy subjects (``<topic>-value``) and writes records as ``00`` + the 4-byte big-endian
schema id + the same Avro body; registry-aware consumers anywhere (Kafka Connect, ksqlDB,
confluent-kafka's AvroDeserializer) read them without our code.

Only the 10-byte header differs between the two frames: the Avro body is byte-for-byte the
same, so re-framing is a header swap, never a decode and re-encode. Inside the pipeline (the
worker, Cassandra's payload columns, the API) events travel as single-object encoding, which
needs no registry to read: a registry frame is converted back on arrival, and an id this
process has not seen is looked up once in the registry (a newer writer schema is then read by
Avro resolution into the current one).
"""

from __future__ import annotations

import struct
import threading
from typing import Any

from schemas.codec import MAGIC, CodecError, RegistryUnavailable, add_writer, current_schemas

__all__ = ["REGISTRY_MAGIC", "Registry", "is_registry_frame"]

REGISTRY_MAGIC = 0
_CONFLUENT = struct.Struct(">bI")
_SINGLE = struct.Struct("<2sQ")


def is_registry_frame(data: bytes) -> bool:
    return len(data) >= _CONFLUENT.size and data[0] == REGISTRY_MAGIC


class Registry:
    """A registry client with the two header swaps, caching every id it has seen.

    Thread-safe: the worker converts frames on its event loop while a lookup may be running in
    the driver's thread pool.
    """

    def __init__(self, url: str, client: Any | None = None) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self.url = url
        self.client = client if client is not None else SchemaRegistryClient({"url": url})
        self._id_of_fp: dict[int, int] = {}
        self._fp_of_id: dict[int, int] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()

    def register(self, topics: dict[str, str]) -> dict[str, int]:
        """Register the current schema of each record name under ``<topic>-value``; returns the
        schema id per topic. Registering an unchanged schema again returns its existing id."""
        from confluent_kafka.schema_registry import Schema
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        schemas = current_schemas()
        ids = {}
        for record, topic in topics.items():
            fp, text = schemas[record]
            try:
                schema_id = int(self.client.register_schema(f"{topic}-value", Schema(text, "AVRO")))
            except SchemaRegistryError as exc:
                # 409: the registry's compatibility rules refuse this schema for the subject.
                raise CodecError("registry_refused", f"{topic}-value: {exc}") from exc
            except Exception as exc:  # httpx transport errors: the registry is unreachable
                raise RegistryUnavailable(f"{self.url}: {exc}") from exc
            with self._lock:
                self._id_of_fp[fp] = schema_id
                self._fp_of_id[schema_id] = fp
            ids[topic] = schema_id
        return ids

    def to_registry(self, data: bytes) -> bytes:
        """Single-object frame -> registry frame (the writer schema must have been registered)."""
        if len(data) < _SINGLE.size or data[:2] != MAGIC:
            raise CodecError("bad_magic", f"starts with {data[:2].hex()}, not c301")
        (_, fp) = _SINGLE.unpack_from(data)
        schema_id = self._id_of_fp.get(fp)
        if schema_id is None:
            raise CodecError("unregistered_schema", f"fingerprint {fp:016x} has no registry id")
        return _CONFLUENT.pack(REGISTRY_MAGIC, schema_id) + data[_SINGLE.size :]

    def to_single_object(self, data: bytes) -> bytes:
        """Registry frame -> single-object frame; looks the id up in the registry once."""
        if len(data) < _CONFLUENT.size:
            raise CodecError("truncated", f"{len(data)} bytes is shorter than the 5-byte registry header")
        magic, schema_id = _CONFLUENT.unpack_from(data)
        if magic != REGISTRY_MAGIC:
            raise CodecError("bad_magic", f"starts with {data[:1].hex()}, not 00")
        fp = self._fp_of_id.get(schema_id)
        if fp is None:
            fp = self._lookup(schema_id)
        return _SINGLE.pack(MAGIC, fp) + data[_CONFLUENT.size :]

    def _lookup(self, schema_id: int) -> int:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            schema = self.client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            raise CodecError("unknown_schema_id", f"{schema_id}: {exc}") from exc
        except Exception as exc:
            # Retriable: the record is fine, the registry is not reachable right now.
            raise RegistryUnavailable(f"{self.url}: {exc}") from exc
        fp = add_writer(str(schema.schema_str))
        with self._lock:
            self._fp_of_id[schema_id] = fp
            self._id_of_fp.setdefault(fp, schema_id)
        return fp
