"""Sampling profiles of the pipeline's processes during a benchmark (py-spy), summarized per component.

``ohs bench e2e --profile DIR`` attaches ``py-spy record`` to the worker and the bridge for the
flow of each rate and writes, per process, the raw collapsed stacks (``<name>-<tag>.txt``, for a
flame graph: ``flamegraph.pl`` or speedscope read them) and a summary: the share of the samples
whose innermost Python frame is in each component (a package of ours, a library, or a module of
the standard library), the functions with the most such samples, and the project's functions
most often on the stack at all (inclusive: what each of our steps costs with what it calls). py-spy samples only threads
that are running Python (not idle, not in native code without Python frames above it), so the
shares are of the Python CPU of the process, which is what a Python change can move.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["component_of", "py_spy", "start", "summarize"]

OURS = frozenset({"engine", "bridge", "streams", "schemas", "kit", "api", "audit", "stack", "ohs"})
"""The project's packages: the inclusive list names only their functions (the frames above them,
the event loop and the command line, are on every sample and say nothing)."""
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def component_of(path: str) -> str:
    """A frame's file as a component: ``faust``, ``aiokafka``, ``streams``, ``stdlib:asyncio`` ...

    py-spy names a file by its path under the ``sys.path`` entry it came from (``faust/agents/
    agent.py``, ``asyncio/events.py``), so its first part is the top-level package."""
    parts = Path(path).parts
    if "site-packages" in parts:  # a path py-spy could not shorten
        parts = parts[parts.index("site-packages") + 1 :]
    if not parts:
        return "other"
    top = parts[0].removesuffix(".py")
    if top in sys.stdlib_module_names:
        return f"stdlib:{top}"
    return top if top.isidentifier() else "other"


def py_spy() -> str | None:
    """py-spy beside this interpreter (the project's venv, not always on PATH), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start(pid: int, out: Path, duration_s: float, rate_hz: int = 100) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` of ``pid`` into ``out`` (collapsed stacks); None without py-spy."""
    exe = py_spy()
    if exe is None:
        return None
    cmd = [exe, "record", "--pid", str(pid), "--rate", str(rate_hz), "--duration", str(max(1, int(duration_s)))]
    cmd += ["--format", "raw", "--nonblocking", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Self samples per component and the ``top`` functions, from py-spy's collapsed stacks."""
    by_component: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        names = [_name(frame) for frame in stack.split(";")]
        total += n
        by_component[names[-1][1]] += n
        by_function[names[-1][0]] += n
        for name in {name for name, component in names if component in OURS}:  # once per sample
            inclusive[name] += n
    share = {k: round(v / total, 4) for k, v in by_component.most_common()} if total else {}
    functions = [[k, round(v / total, 4)] for k, v in by_function.most_common(top)] if total else []
    within = [[k, round(v / total, 4)] for k, v in inclusive.most_common(top)] if total else []
    return {
        "samples": total,
        "self_share_by_component": share,
        "top_self_functions": functions,
        "top_inclusive_functions": within,
    }


def _name(frame: str) -> tuple[str, str]:
    """(``func (component: file)``, component) of one collapsed-stack frame."""
    m = _FRAME.match(frame)
    func, file = (m["func"], m["file"]) if m else (frame, "")
    component = component_of(file)
    return f"{func} ({component}: {Path(file).name})", component
