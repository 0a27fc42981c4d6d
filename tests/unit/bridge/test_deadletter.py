"""Dead letters always fit the broker and still say what they stood for."""

from __future__ import annotations

import hashlib
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.deadletter import DeadLetter, dead_letter, record_size

LIMIT = 1_000_000


def _framed(frames):
    return struct.pack(">I", len(frames)) + b"".join(struct.pack(">I", len(f)) + f for f in frames)


def test_a_3_mb_event_becomes_a_dead_letter_under_the_limit_with_its_size_and_hash():
    payload = b"\xc3\x01" + b"x" * 3_000_000
    frames = [b"H" * 36, payload]
    dl = dead_letter(frames, "oversized_event", "too big", limit=LIMIT, epoch=5, seq=9, accounted=True)
    h = dict(dl.headers)
    assert record_size(dl.value, dl.headers) <= LIMIT
    assert h["truncated"] == b"1" and h["accounted"] == b"1"
    assert h["epoch"] == b"5" and h["seq"] == b"9" and h["reason"] == b"oversized_event"
    assert (
        int(h["size"]) == len(_framed(frames)) and h["sha256"].decode() == hashlib.sha256(_framed(frames)).hexdigest()
    )
    assert h["payload_sha256"].decode() == hashlib.sha256(payload).hexdigest()
    assert int(h["payload_size"]) == len(payload)
    assert _framed(frames).startswith(dl.value) and len(dl.value) > LIMIT // 2  # a prefix, as much as fits


def test_a_small_input_is_kept_whole_and_unaccounted_without_seq_headers():
    dl = dead_letter([b"one"], "bad_frame_count", "1 frames, want 2", limit=LIMIT)
    h = dict(dl.headers)
    assert dl.value == _framed([b"one"])
    assert "truncated" not in h and "accounted" not in h and "seq" not in h and "payload_sha256" not in h


def test_a_hostile_detail_never_breaks_encoding_and_is_capped():
    dl = dead_letter([b"a", b"b"], "x", "\udcff" * 5000 + "é" * 2000, limit=LIMIT)
    detail = dict(dl.headers)["detail"]
    assert len(detail) <= 1000
    detail.decode()  # valid UTF-8


def test_the_minimal_dead_letter_has_no_value_and_keeps_the_identity():
    dl = dead_letter([b"h", b"p" * 5000], "oversized_event", "d" * 900, limit=LIMIT, epoch=1, seq=2, accounted=True)
    small = dl.minimal()
    h = dict(small.headers)
    assert small.value == b"" and h["truncated"] == b"1" and h["sha256"] == dict(dl.headers)["sha256"]
    assert h["seq"] == b"2" and len(h["detail"]) <= 200
    assert isinstance(small, DeadLetter) and small.accounted


@settings(deadline=None)  # behaviour, not speed
@given(
    frames=st.lists(st.binary(max_size=3000), min_size=0, max_size=5),
    limit=st.integers(16_384, 40_000),
    detail=st.text(max_size=3000),
)
def test_any_input_fits_any_limit(frames, limit, detail):
    dl = dead_letter(frames, "r", detail, limit=limit, epoch=1, seq=1, accounted=True)
    assert record_size(dl.value, dl.headers) <= limit
    assert _framed(frames).startswith(dl.value)
