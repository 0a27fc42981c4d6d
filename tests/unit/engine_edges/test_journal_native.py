"""The optional C build of the journal's command record (engine/_journalc.c): byte for byte the
record the Python code builds, for every command it takes, and None (Python builds it, the JSON
form included) for every command it must not take.

Without the build these tests skip, unless OHS_REQUIRE_NATIVE=1 (CI sets it: there the build must
not fail unnoticed)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import journal as J
from engine.commands import AdvanceTime, CancelOrder, Deposit, PlaceOrder, Withdraw
from engine.core import Engine
from engine.interfaces import SymbolSpec
from engine.settings import EngineSettings
from engine.simulator import stamped_flow
from schemas.events import OrderType, Side, TimeInForce
from schemas.wire import encode_events
from tests.unit.optional_build import built

_journalc = built("engine._journalc")

native = _journalc.record
TS = 1_796_000_000_000_000_000
I64 = 2**63


def _same(cmd: object, first: int = 7, count: int = 2, entries: bytes = b"entries") -> bytes | None:
    """The C record when it takes the command, after checking it is the Python one."""
    got = native(cmd, first, count, entries)
    if got is not None:
        assert got == J._python_record(cmd, first, count, entries)  # type: ignore[arg-type]
    return got


def test_the_journal_uses_the_build() -> None:
    assert J._native_record is native


def test_every_record_of_the_seeded_flow_is_the_python_one() -> None:
    specs = EngineSettings(_env_file=None).symbol_specs()
    engine = Engine(specs, 3)
    taken = 0
    flow = stamped_flow(specs, 300, 20_000, seed=5)
    for cmd in flow:
        result = engine.execute(cmd)
        entries = encode_events(result.events)[0] if result.events else b""
        first = result.events[0].seq if result.events else 0
        assert _same(cmd, first, len(result.events), entries) is not None
        taken += 1
    assert taken == len(flow) > 20_000  # the flow's deposits first


@pytest.mark.parametrize(
    "cmd",
    [
        PlaceOrder(TS, 1, "BTC-USD", Side.BUY, OrderType.LIMIT, TimeInForce.GTC, 3, 100, 0, "é-cid", 0),
        PlaceOrder(-I64, I64 - 1, "", Side.SELL, OrderType.MARKET, TimeInForce.IOC, -1, 0, I64 - 1, "", -5),
        PlaceOrder(TS, 2, "ETH-USD", Side.SELL, OrderType.LIMIT, TimeInForce.GTT, 2, 5, 0, "x" * 65_535, TS + 5),
        PlaceOrder(TS, 2, "日本-円", Side.BUY, OrderType.LIMIT, TimeInForce.FOK, 2, 5, 0, "🙂" * 10, 0),
        CancelOrder(TS, 1, 9),
        CancelOrder(TS, 1, 0, "cid"),
        CancelOrder(TS, 1, -I64, "ü"),
        Deposit(TS, 1, "USD", 2**62 - 1),
        Withdraw(TS, 0, "USD", 1),
        AdvanceTime(TS),
        AdvanceTime(-I64),
    ],
)
def test_the_layouts_edges_are_the_python_ones(cmd: object) -> None:
    assert _same(cmd) is not None
    assert _same(cmd, 0, 0, b"") is not None
    assert _same(cmd, 2**64 - 1, 2**32 - 1, bytes(range(256)) * 40) is not None


BASE = PlaceOrder(TS, 1, "BTC-USD", Side.BUY, OrderType.LIMIT, TimeInForce.GTC, 3, 100, 0, "cid", 0)


class _Place(PlaceOrder):
    __slots__ = ()


@pytest.mark.parametrize(
    ("cmd", "first", "count", "entries"),
    [
        (replace(BASE, user_id=I64), 1, 1, b""),  # beyond a long: Python writes JSON
        (replace(BASE, qty=-I64 - 1), 1, 1, b""),
        (replace(BASE, price=True), 1, 1, b""),  # not exactly an int
        (replace(BASE, client_order_id="\ud800"), 1, 1, b""),  # UTF-8 cannot encode it
        (replace(BASE, client_order_id="x" * 65_536), 1, 1, b""),  # longer than its length field
        (replace(BASE, side=OrderType.LIMIT), 1, 1, b""),  # a member of another enum
        (replace(BASE, symbol=b"BTC-USD"), 1, 1, b""),  # not a str: Python raises
        (_Place(*[getattr(BASE, f) for f in BASE.__dataclass_fields__]), 1, 1, b""),  # not exactly the class
        ("not a command", 1, 1, b""),
        (BASE, -1, 1, b""),  # the header's ranges: Python's struct raises
        (BASE, 2**64, 1, b""),
        (BASE, 1, 2**32, b""),
        (BASE, 1.0, 1, b""),
        (BASE, 1, 1, bytearray(b"x")),
    ],
)
def test_what_it_must_not_take_it_hands_back(cmd: object, first: object, count: object, entries: object) -> None:
    assert native(cmd, first, count, entries) is None


def test_what_it_hands_back_python_writes_as_before() -> None:
    """The declined commands that a journal may hold are the JSON form's (migrated journals)."""
    record = J._python_record(replace(BASE, user_id=I64), 1, 1, b"")
    assert record[8 + 16] == J._T_JSON


texts = st.text(max_size=40)
longs = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-(2**63), 2**63 - 1, 0, -1]))
ints = st.one_of(longs, st.integers(), st.booleans())


@settings(max_examples=400, deadline=None)
@given(
    ts=ints,
    user=ints,
    qty=ints,
    price=ints,
    budget=ints,
    expire=ints,
    side=st.sampled_from([*Side, OrderType.MARKET]),
    otype=st.sampled_from(list(OrderType)),
    tif=st.sampled_from(list(TimeInForce)),
    symbol=texts,
    cid=texts,
    first=st.integers(0, 2**64 - 1),
    count=st.integers(0, 2**32 - 1),
    entries=st.binary(max_size=300),
)
def test_any_place_order_is_the_python_record_or_handed_back(
    ts, user, qty, price, budget, expire, side, otype, tif, symbol, cid, first, count, entries
) -> None:
    cmd = PlaceOrder(ts, user, symbol, side, otype, tif, qty, price, budget, cid, expire)
    got = _same(cmd, first, count, entries)
    plain = all(type(v) is int and -(2**63) <= v < 2**63 for v in (ts, user, qty, price, budget, expire))
    fine = plain and isinstance(side, Side) and all(_utf8(t) for t in (symbol, cid))
    assert (got is not None) == fine


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from([CancelOrder, Deposit, Withdraw, AdvanceTime]), a=ints, b=ints, c=ints, text=texts)
def test_any_other_command_is_the_python_record_or_handed_back(kind, a, b, c, text) -> None:
    cmd = {
        CancelOrder: lambda: CancelOrder(a, b, c, text),
        Deposit: lambda: Deposit(a, b, text, c),
        Withdraw: lambda: Withdraw(a, b, text, c),
        AdvanceTime: lambda: AdvanceTime(a),
    }[kind]()
    got = _same(cmd)
    used = (a,) if kind is AdvanceTime else (a, b, c)
    fine = all(type(v) is int and -(2**63) <= v < 2**63 for v in used) and (kind is AdvanceTime or _utf8(text))
    assert (got is not None) == fine


def _utf8(text: str) -> bool:
    try:
        return len(text.encode()) <= 65_535
    except UnicodeEncodeError:
        return False


def test_a_journal_written_with_the_build_is_the_one_written_without(tmp_path, monkeypatch) -> None:
    symbols = [SymbolSpec("BTC-USD", "BTC", "USD")]
    flows = {}
    for name, record in (("c", native), ("python", None)):
        monkeypatch.setattr(J, "_native_record", record)
        engine = Engine(symbols, 1)
        journal = J.Journal.open(tmp_path / name, symbols, fsync="never")
        for cmd in stamped_flow(symbols, 50, 3_000, seed=2):
            result = engine.execute(cmd)
            journal.append(cmd, result.events)
        journal.close()
        data = (tmp_path / name / "journal.log").read_bytes()
        (head,) = J._REC.unpack_from(data)[:1]
        flows[name] = data[8 + head :]  # the records after the header (which holds the epoch)
    assert flows["c"] == flows["python"] and len(flows["c"]) > 100_000


@pytest.mark.parametrize(
    "layouts",
    [
        (("not a type", 1, ()),),
        ((PlaceOrder, 256, ()),),
        ((PlaceOrder, 1, (("ts_ns", 3, ()),)),),
        ((PlaceOrder, 1, (("ts_ns", 0, ()),) * 17),),
    ],
)
def test_a_bad_layout_is_refused_and_the_journal_configures_again(layouts) -> None:
    try:
        with pytest.raises((TypeError, ValueError)):
            _journalc.configure(layouts, J.crc32)
        assert native(BASE, 1, 1, b"") is None  # refused: nothing configured
    finally:
        _journalc.configure(J._LAYOUTS, J.crc32)
    assert _same(BASE) is not None
