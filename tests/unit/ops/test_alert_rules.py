"""The alerting rules of deploy/prometheus/rules: valid, unit-tested, documented, wired into compose.

``promtool check rules`` and ``promtool test rules`` run the rules against the series of
deploy/prometheus/tests/*.test.yml (Debian's ``prometheus`` package provides promtool; ``.ci/run``
installs it and sets ``OHS_REQUIRE_PROMTOOL=1`` so CI fails rather than skips without it). The
static checks below need no promtool: every rule names only metrics the processes export (or
the contract of issue 15 for those being written), carries a ``for:``, a severity, a summary and
a runbook anchor that exists in docs/operations.md, and is tested both firing and not firing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.ops.test_deploy import (
    PROMETHEUS,
    ROOT,
    known_series,
    load_yaml,
    prometheus_jobs,
    promql_job_matchers,
    promql_label_names,
    promql_metric_names,
    services,
)

RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
TESTS_DIR = ROOT / "deploy" / "prometheus" / "tests"
OPERATIONS = ROOT / "docs" / "operations.md"
SEVERITIES = {"critical", "warning", "info"}
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"job", "instance"}


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def promtool_tests() -> list[Path]:
    return sorted(TESTS_DIR.glob("*.test.yml"))


def alerts() -> list[dict[str, Any]]:
    return [
        rule
        for path in rule_files()
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("OHS_REQUIRE_PROMTOOL"):
        pytest.fail("promtool is not on PATH and OHS_REQUIRE_PROMTOOL is set (apt-get install prometheus)")
    pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus); set OHS_REQUIRE_PROMTOOL=1 to fail")


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT)


# ------------------------------------------------------------------------------------ promtool


def test_promtool_checks_the_rules():
    assert rule_files(), f"no rules under {RULES_DIR}"
    proc = run("check", "rules", *rule_files())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in proc.stdout + proc.stderr


def test_promtool_unit_tests_of_the_rules_pass():
    assert promtool_tests(), f"no promtool tests under {TESTS_DIR}"
    proc = run("test", "rules", *promtool_tests())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_can_fail(tmp_path):
    """The harness itself: a test expecting an alert that the series cannot raise must fail."""
    (tmp_path / "rules.yml").write_text((RULES_DIR / "ohs-alerts.yml").read_text())
    (tmp_path / "t.test.yml").write_text(
        yaml.safe_dump(
            {
                "rule_files": ["rules.yml"],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [{"series": 'up{job="worker", instance="w:6066"}', "values": "1x10"}],
                        "alert_rule_test": [
                            {"eval_time": "5m", "alertname": "OhsWorkerDown", "exp_alerts": [{"exp_labels": {}}]}
                        ],
                    }
                ],
            }
        )
    )
    proc = run("test", "rules", tmp_path / "t.test.yml")
    assert proc.returncode != 0 and "FAILED" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ static checks


def test_every_alert_has_a_for_a_severity_a_summary_and_a_runbook_anchor():
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)), "duplicate alert names"
    headings = {_anchor(h) for h in re.findall(r"^#{2,4} (.+)$", OPERATIONS.read_text(), re.M)}
    for a in alerts():
        name = a["alert"]
        assert re.fullmatch(r"Ohs[A-Z]\w+", name), name
        assert "for" in a, f"{name}: no `for:`"
        assert a["labels"]["severity"] in SEVERITIES, name
        ann = a["annotations"]
        assert ann.get("summary") and ann.get("description"), name
        url = ann["runbook_url"]
        assert url == f"docs/operations.md#{name.lower()}", f"{name}: runbook_url {url}"
        assert url.split("#", 1)[1] in headings, f"{name}: docs/operations.md has no heading `{name}`"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def test_every_alert_names_only_known_metrics_and_labels():
    series = known_series()
    for a in alerts():
        expr = a["expr"]
        names = promql_metric_names(expr)
        assert names, f"{a['alert']}: no metric in {expr!r}"
        unknown = names - set(series) - {"up"}
        assert not unknown, f"{a['alert']}: {sorted(unknown)} is exported by no process"
        labels = set(TARGET_LABELS)
        for name in names & set(series):
            labels |= series[name][1]
        assert promql_label_names(expr) <= labels, f"{a['alert']}: labels {promql_label_names(expr) - labels}"
        assert promql_job_matchers(expr) <= set(prometheus_jobs()), f"{a['alert']}: unknown job"
        for text in a["annotations"].values():
            used = set(re.findall(r"\$labels\.(\w+)", text))
            assert used <= labels | {"alertname"}, f"{a['alert']}: annotation uses {used - labels}"


def test_every_alert_is_tested_firing_and_not_firing():
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in promtool_tests():
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - firing == set(), f"never tested firing: {sorted(names - firing)}"
    assert names - quiet == set(), f"never tested not firing: {sorted(names - quiet)}"
    assert (firing | quiet) <= names, f"tests of unknown alerts: {sorted((firing | quiet) - names)}"


def test_the_compose_prometheus_loads_the_rules():
    config = load_yaml(PROMETHEUS)
    (pattern,) = config["rule_files"]
    mounts = dict(v.split(":")[:2] for v in services()["prometheus"]["volumes"] if v.startswith("."))
    assert mounts["./deploy/prometheus/rules"] == str(Path(pattern).parent)
    assert all(path.match(Path(pattern).name) for path in rule_files())
