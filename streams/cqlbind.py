"""Binding values to prepared statements with serializers chosen once per column.

cassandra-driver's ``BoundStatement.bind`` looks up each column's type, builds
a column descriptor for the (unused) encryption policy and dispatches to the
type's serializer for every value of every row: ~13 µs per 20-column row on
this project's machine, the largest cost of the worker after Faust itself.
``Binder`` picks each column's serializer when the statement is prepared and
fills the ``BoundStatement`` the driver sends (its documented ``values``, the
serialized bytes per marker). Types it does not know are serialized by the
driver's own type, so it is never wrong, only sometimes not faster;
``tests/unit/streams/test_cqlbind.py`` checks that every serializer gives the
driver's bytes.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable, Sequence
from typing import Any

from cassandra import cqltypes
from cassandra.query import BoundStatement, PreparedStatement

__all__ = ["Binder", "serializer_for"]

_Q = struct.Struct(">q").pack
_I = struct.Struct(">i").pack
_UDAY = struct.Struct(">I").pack
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


_text = str.encode
"""UTF-8 is str.encode's default: a C call per value, no Python frame."""


def _blob(value: bytes) -> bytes:
    if type(value) is bytes:
        return value
    if not isinstance(value, bytes | bytearray | memoryview):  # bytes(5) would be five zero bytes
        raise TypeError(f"blob value must be bytes, not {type(value).__name__}")
    return bytes(value)


def _date(value: dt.date) -> bytes:
    # CQL date: days since 1970-01-01, offset by 2**31 so the uint32 sorts as the date does.
    return _UDAY(value.toordinal() - _EPOCH_ORDINAL + 2**31)


def _map_of(key: Callable[[Any], bytes], val: Callable[[Any], bytes]) -> Callable[[dict[Any, Any]], bytes]:
    def encode(themap: dict[Any, Any]) -> bytes:
        parts = [_I(len(themap))]
        for k, v in themap.items():
            kb, vb = key(k), val(v)
            parts.append(_I(len(kb)))
            parts.append(kb)
            parts.append(_I(len(vb)))
            parts.append(vb)
        return b"".join(parts)

    return encode


def serializer_for(cql_type: Any, protocol_version: int) -> Callable[[Any], bytes]:
    """A function value -> serialized bytes for one column type (the driver's when unknown)."""
    if cql_type is cqltypes.LongType or cql_type is cqltypes.CounterColumnType:
        return _Q
    if cql_type is cqltypes.Int32Type:
        return _I
    if cql_type is cqltypes.UTF8Type or cql_type is cqltypes.VarcharType:
        return _text
    if cql_type is cqltypes.BytesType:
        return _blob
    if cql_type is cqltypes.SimpleDateType:
        return _date
    if isinstance(cql_type, type) and issubclass(cql_type, cqltypes.MapType) and protocol_version >= 3:
        key_type, value_type = cql_type.subtypes  # type: ignore[attr-defined]
        return _map_of(serializer_for(key_type, protocol_version), serializer_for(value_type, protocol_version))

    def generic(value: Any) -> bytes:
        out: bytes = cql_type.serialize(value, protocol_version)
        return out

    return generic


class Binder:
    """``bind(values)`` for one prepared statement, as ``PreparedStatement.bind`` would do it
    for positional values without unset ones."""

    def __init__(self, prepared: PreparedStatement) -> None:
        self.prepared = prepared
        version = prepared.protocol_version
        self._serializers = [serializer_for(col.type, version) for col in prepared.column_metadata]
        self._names = [col.name for col in prepared.column_metadata]
        # What BoundStatement(prepared) sets, once: each bind copies it instead of running the
        # constructor chain (Statement.__init__ with its eight defaults) per row.
        self._template = dict(BoundStatement(prepared).__dict__)

    def bind(self, values: Sequence[Any]) -> BoundStatement:
        if len(values) != len(self._serializers):
            raise ValueError(f"{len(values)} values for {len(self._serializers)} markers of {self.prepared}")
        bound = BoundStatement.__new__(BoundStatement)
        bound.__dict__.update(self._template)
        bound.raw_values = values
        try:
            bound.values = [None if v is None else ser(v) for ser, v in zip(self._serializers, values, strict=True)]
        except (TypeError, struct.error, AttributeError) as exc:
            for name, ser, v in zip(self._names, self._serializers, values, strict=True):
                try:
                    None if v is None else ser(v)
                except (TypeError, struct.error, AttributeError):
                    raise TypeError(f"invalid value for column {name!r}: {v!r:.80} ({exc})") from exc
            raise
        return bound
