"""The optional compiled builds; everything else about the package is in pyproject.toml.

Three builds, each optional: without a C compiler (or with OHS_PURE_BUILD=1) pip installs the
project without them and the same Python source runs, at about half the engine's rate
(docs/engine.md, "Optional builds"):

* ``schemas._avroc``: the feed's event encoder, hand-written C (schemas/_avroc.c).
* ``engine._journalc``: the journal's command record, hand-written C (engine/_journalc.c).
* the engine's pure core (``engine.book``, ``engine.ledger``, ``engine.core``) and the service's
  loop over it (``engine.batch``), compiled by mypyc from the same standard-library-only source
  that runs without it. mypyc turns the core's
  classes into C structs and its calls into C calls (1.5x the commands per CPU-second in
  ``ohs bench engine``). Next to the compiled modules this writes ``engine/_core_build.json``,
  the SHA-256 of each compiled source: ``engine/__init__.py`` loads the Python source instead of a
  build made from other source (an edit since the last install), so a stale build never runs.

This file is a setup script rather than pyproject.toml's ``ext-modules`` table because mypyc's
extensions are made by a function (``mypyc.build.mypycify``), and because a failure of that
function must leave a working install, not a failed one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
CORE = ["engine/book.py", "engine/ledger.py", "engine/core.py", "engine/batch.py"]
"""The modules mypyc compiles (engine/__init__.py names the same ones)."""
STAMP = HERE / "engine" / "_core_build.json"


def _warn(text: str) -> None:
    print(f"ohs build: {text}", file=sys.stderr)


def _core_extensions() -> list[Extension]:
    STAMP.unlink(missing_ok=True)
    try:
        from mypyc.build import mypycify

        # One shared library inside the package (not a top-level module an editable install's
        # finder would not know); -O3 is mypyc's default. The core's own asserts stay.
        extensions = mypycify(CORE, opt_level="3", group_name="engine._core")
    except BaseException as exc:
        _warn(f"the engine core is not compiled ({type(exc).__name__}: {exc}); its Python source runs")
        return []
    for ext in extensions:
        # Without a compiler every C build fails alike and the install goes on with the source.
        ext.optional = True
    digests = {f"engine.{Path(p).stem}": hashlib.sha256((HERE / p).read_bytes()).hexdigest() for p in CORE}
    STAMP.write_text(json.dumps({"sources": digests}, indent=1, sort_keys=True) + "\n")
    return extensions


def _extensions() -> list[Extension]:
    if os.environ.get("OHS_PURE_BUILD") == "1":
        STAMP.unlink(missing_ok=True)
        _warn("OHS_PURE_BUILD=1: no optional build; the Python source runs")
        return []
    return [
        Extension(
            "schemas._avroc",
            ["schemas/_avroc.c"],
            depends=["schemas/_cslots.h"],
            optional=True,
            extra_compile_args=["-O2"],
        ),
        Extension(
            "engine._journalc",
            ["engine/_journalc.c"],
            include_dirs=["schemas"],  # _cslots.h, shared with schemas/_avroc.c
            depends=["schemas/_cslots.h"],
            optional=True,
            extra_compile_args=["-O2"],
        ),
        *_core_extensions(),
    ]


setup(ext_modules=_extensions())
