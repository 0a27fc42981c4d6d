"""The worker's RocksDB memory is bounded by its settings, not Faust's defaults (3 x 64 MiB
memtables and a 2 GiB block cache per table partition)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_PROBE = """
import json
import streams.app as a
o = a.users._new_store().rocksdb_options
print(json.dumps([o.write_buffer_size, o.max_write_buffer_number, o.block_cache_size]))
"""


def _options(tmp_path: Path, **env: str) -> list[int]:
    # streams.app reads its settings at import: a fresh interpreter per configuration.
    full = {**os.environ, "OHS_WORKER_STORE": "rocksdb://", "OHS_WORKER_DATA_DIR": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_defaults_bound_each_partition_to_about_32_mib(tmp_path: Path) -> None:
    assert _options(tmp_path) == [8 << 20, 2, 16 << 20]


def test_the_settings_reach_the_store(tmp_path: Path) -> None:
    got = _options(tmp_path, OHS_WORKER_ROCKSDB_WRITE_BUFFER_MB="4", OHS_WORKER_ROCKSDB_BLOCK_CACHE_MB="64")
    assert got == [4 << 20, 2, 64 << 20]
