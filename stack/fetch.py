"""Fetch the servers (Kafka, Cassandra, optionally the schema registry) with Maven into the cache.

Maven resolves each server's runtime classpath from its POM (``stack/maven/``)
and copies it into ``<cache>/<name>-<version>/lib`` (the registry ships as an
application archive, which its POM unpacks there instead); a ``.complete`` marker is
written only after a successful copy, so an interrupted download is redone and
a completed one is never fetched again. Maven's own repository also lives in
the cache (``<cache>/m2``) so nothing is written to the user's ``~/.m2``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from stack.errors import StackError

__all__ = ["ensure_dist"]

_UNPACKED = {"registry"}
"""Servers whose POM unpacks an application archive (``package``) instead of a classpath."""


def ensure_dist(cache: Path, name: str, version: str, log: Callable[[str], None]) -> Path:
    """Return the ``lib`` dir holding ``name``'s jars, downloading them if needed."""
    dist = cache / f"{name}-{version}"
    lib = dist / "lib"
    marker = dist / ".complete"
    if marker.exists():
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError("Maven (mvn) is not on PATH: it is needed once to fetch the servers' jars")
    pom = resources.files("stack") / "maven" / f"{name}-pom.xml"
    version_property = f"-D{name}.version={version}"
    cache.mkdir(parents=True, exist_ok=True)
    # Staged inside the cache so the final rename is atomic (same filesystem).
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    started = time.monotonic()
    log(f"fetching {name} {version} from Maven Central into {dist} ...")
    with resources.as_file(pom) as pom_path:
        cmd = [mvn, "-B", "-q", "-f", str(pom_path), f"-Dmaven.repo.local={cache / 'm2'}", version_property]
        if name in _UNPACKED:
            cmd += ["package", f"-Dohs.output={staging}"]
        else:
            cmd += ["dependency:copy-dependencies", f"-DoutputDirectory={staging}", "-DincludeScope=runtime"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        out = (proc.stdout + proc.stderr)[-3000:]
        raise StackError(f"Maven could not fetch {name} {version} (exit {proc.returncode}):\n{out}")
    if dist.exists():
        shutil.rmtree(dist)
    dist.mkdir(parents=True)
    staging.rename(lib)
    marker.write_text(f"{version}\n")
    shutil.rmtree(lib / ".markers", ignore_errors=True)
    jars = len(list(lib.rglob("*.jar")))
    log(f"fetched {name} {version}: {jars} jars in {time.monotonic() - started:.1f}s")
    return lib
