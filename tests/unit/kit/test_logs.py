"""JSON log lines: one object per record, extras as keys, exceptions kept."""

from __future__ import annotations

import json
import logging

from kit.logs import JsonFormatter


def _record(**extra):
    logger = logging.getLogger("ohs.test")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        return logger.makeRecord("ohs.test", logging.WARNING, __file__, 1, "gap %d..%d", (5, 9), sys.exc_info(),
                                 extra=extra)  # fmt: skip


def test_json_lines_carry_message_level_extras_and_the_exception():
    doc = json.loads(JsonFormatter().format(_record(epoch=7, seqs=[5, 9])))
    assert doc["msg"] == "gap 5..9" and doc["level"] == "WARNING" and doc["logger"] == "ohs.test"
    assert doc["epoch"] == 7 and doc["seqs"] == "[5, 9]"
    assert "ValueError: boom" in doc["exc"]
    assert doc["ts"].endswith("Z")
