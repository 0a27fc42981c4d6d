"""The gateway's request parsing (issue 12, item 3): every bound, and JSON nesting measured before
the recursive parser can see it.

Before: ``[b"CMD", b"[" * 100000]`` reached ``json.loads``, whose RecursionError ended the engine.
"""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.commands import Deposit, PlaceOrder
from engine.gateway import MAX_DEPTH, RequestError, parse_request
from schemas.wire import loads_bounded

LIMITS = {"max_bytes": 1 << 20, "max_commands": 100}


def _parse(*parts: bytes):
    return parse_request(list(parts), frames=len(parts), size=sum(map(len, parts)), **LIMITS)


def _deposit(**kw) -> dict:
    return {"type": "deposit", "user_id": 1, "asset": "USD", "amount": 5, **kw}


def test_a_valid_request_gives_unstamped_commands():
    (one,) = _parse(b"CMD", json.dumps(_deposit(ts_ns=123)).encode())
    assert one == Deposit(0, 1, "USD", 5), "the client's clock is never trusted"
    many = _parse(
        b"CMD",
        json.dumps(
            [
                _deposit(),
                {
                    "type": "place",
                    "user_id": 2,
                    "symbol": "BTC-USD",
                    "side": "BUY",
                    "order_type": "LIMIT",
                    "time_in_force": "GTC",
                    "qty": 1,
                    "price": 10,
                },
            ]
        ).encode(),
    )
    assert [type(c) for c in many] == [Deposit, PlaceOrder]


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ((b"CMD", b"[" * 100_000), "nested deeper than 2"),  # the reproducer: RecursionError before
        ((b"CMD", b"{" * 50_000), "nested deeper than 2"),
        ((b"CMD", b'[{"a":[1]}]'), "nested deeper than 2"),
        ((b"CMD", b"[" + b'["]",' * 3000 + b"1" + b',"["]' * 3000 + b"]"), "nested deeper than 2"),
        ((b"CMD", json.dumps(_deposit()).encode("utf-16")), "not JSON"),
        ((b"CMD", b'{"type": "deposit", "amount": ' + b"9" * 5000 + b"}"), "not JSON"),
        ((b"CMD", b"{not json"), "not JSON"),
        ((b"CMD", b"[]"), "1 to 100 commands"),
        ((b"CMD", json.dumps([_deposit()] * 101).encode()), "1 to 100 commands"),
        ((b"CMD", b'[{"type": "tick", "ts_ns": 5}]'), "place|cancel|deposit|withdraw"),
        ((b"CMD", b'{"type": ["place"]}'), "place|cancel|deposit|withdraw"),
        ((b"CMD", b"[1]"), "place|cancel|deposit|withdraw"),
        ((b"CMD", json.dumps(_deposit(amount=1.0)).encode()), "amount must be int"),
        ((b"CMD", json.dumps(_deposit(amount=True)).encode()), "amount must be int"),
        ((b"CMD", json.dumps(_deposit(colour="red")).encode()), "deposit:"),
        ((b"CMD", b'{"type": "place", "side": "UP"}'), "place:"),
        ((b"NOPE", b"{}"), "expected [CMD, json]"),
        ((b"CMD",), "got 1 frames"),
        ((b"CMD", b"{}", b"x"), "got 3 frames"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(parts, message):
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("|", r"\|")):
        _parse(*parts)


def test_size_and_frame_count_are_judged_before_reading():
    # The receiver keeps only the first frames of a long message and sums the sizes of all of them.
    with pytest.raises(RequestError, match="got 100000 frames"):
        parse_request([b"CMD", b"{}", b"x"], frames=100_000, size=100_000, **LIMITS)
    with pytest.raises(RequestError, match=f"exceeds the limit of {1 << 20}"):
        parse_request([], frames=2, size=(1 << 20) + 1, **LIMITS)


# ------------------------------------------------------------------------------ loads_bounded
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet="[]{}\"\\'ab\u00e9\n", max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\a', max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)


def _depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


@settings(max_examples=400)
@given(value=json_values, bound=st.integers(0, 4))
def test_bounded_loads_agrees_with_json_within_the_bound(value, bound):
    data = json.dumps(value).encode()
    if _depth(value) <= bound:
        assert loads_bounded(data, bound) == value
    else:
        with pytest.raises(ValueError, match="nested deeper"):
            loads_bounded(data, bound)


@settings(max_examples=400)
@given(
    value=json_values, cuts=st.lists(st.tuples(st.integers(0, 200), st.sampled_from(list(b'[]{}"\\,:1 '))), max_size=4)
)
def test_bounded_loads_never_lets_the_parser_recurse_past_the_bound(value, cuts):
    """Whatever the bytes (strings with brackets and escapes, broken in random places), the parser
    only ever sees text it cannot nest deeper than the bound: the interpreter's recursion limit is
    lowered so that anything deeper than a few levels would raise RecursionError."""
    data = bytearray(json.dumps(value).encode())
    for pos, byte in cuts:
        data.insert(min(pos, len(data)), byte)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(80, len(_stack()) + 30))
    try:
        result = loads_bounded(bytes(data), MAX_DEPTH)
    except ValueError:
        return
    finally:
        sys.setrecursionlimit(old)
    assert _depth(result) <= MAX_DEPTH


def _stack() -> list[object]:
    frames, f = [], sys._getframe()
    while f is not None:
        frames.append(f)
        f = f.f_back  # type: ignore[assignment]
    return frames
