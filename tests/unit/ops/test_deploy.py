"""The deployment files agree with the code: docker-compose.yml, the Dockerfile, Prometheus and Grafana.

Everything here but the last test is static and needs no Docker: every metric a dashboard query
names is one the code exports, every OHS_* variable compose sets is a setting of the process it
is given to, the endpoints, ports, topics and volumes of the services fit together, and
Prometheus scrapes the ports the settings use. The ``compose`` test brings the stack up for real
when a Docker engine is reachable and skips, saying why, when none is.

"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from pydantic_settings import BaseSettings

from ohs.configdoc import SETTINGS_CLASSES, _env_names

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARD = GRAFANA / "dashboards" / "order-history.json"
DASHBOARD_UID = "ohs-order-history"
YAML_FILES = (COMPOSE, PROMETHEUS, DATASOURCES, DASHBOARD_PROVIDERS)

# ``ohs <subcommand>`` run by a compose service -> the settings class that process reads.
PROCESS_SETTINGS = {
    "engine": "engine.settings:EngineSettings",
    "bridge": "bridge.settings:BridgeSettings",
    "worker": "streams.settings:WorkerSettings",
    "db": "streams.settings:WorkerSettings",
    "api": "api.settings:ApiSettings",
}
# Process -> (module holding its Prometheus metrics, settings field of the port serving /metrics).
METRICS = {
    "bridge": ("bridge.metrics", "metrics_port"),
    "worker": ("streams.metrics", "web_port"),
    "api": ("api.metrics", "port"),
    "engine": ("engine.metrics", "metrics_port"),
}
# The port a process's metrics are scraped on while its settings do not name one yet.
CONTRACT_PORTS = {"engine": 9465}
# Series every process exports (issue 15): `ohs_build_info{component, version} 1`.
BUILD_INFO = ("gauge", {"component", "version"})
# The metrics contract of processes whose metrics module is being written (issue 15): alert rules
# and dashboards may name these before the module exists; once it exists it must export them, with
# these types and at least these labels.
CONTRACT: dict[str, dict[str, tuple[str, set[str]]]] = {
    "engine": {
        "ohs_engine_commands_total": ("counter", set()),
        "ohs_engine_events_total": ("counter", set()),
        "ohs_engine_rejected_total": ("counter", set()),
        "ohs_engine_feed_dropped_total": ("counter", set()),
        "ohs_engine_replay_requests_total": ("counter", set()),
        "ohs_engine_replayed_events_total": ("counter", set()),
        "ohs_engine_gateway_errors_total": ("counter", set()),
        "ohs_engine_last_seq": ("gauge", set()),
        "ohs_engine_epoch": ("gauge", set()),
    },
    "api": {
        "ohs_api_requests_total": ("counter", {"route", "status"}),
        "ohs_api_request_seconds_bucket": ("histogram", {"route", "le"}),
        "ohs_api_ws_subscribers": ("gauge", set()),
        "ohs_api_live_tail_delay_seconds": ("gauge", set()),
    },
}
# Process -> (settings field of its HTTP port, path its compose health check probes).
HTTP_HEALTH = {"bridge": ("metrics_port", "/health"), "worker": ("web_port", "/health"), "api": ("port", "/health")}
# Metrics endpoints of the third-party services: their own defaults, not set in compose.
THIRD_PARTY_METRICS = {"redpanda": (9644, "/public_metrics")}
# Series Prometheus writes itself for every target.
PROMETHEUS_SERIES = {"up"}


# --------------------------------------------------------------------------------------------
# A loader for the YAML subset of the deployment files
# --------------------------------------------------------------------------------------------


@cache
def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    doc = load_yaml(COMPOSE)
    assert isinstance(doc, dict)
    return doc


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


# --------------------------------------------------------------------------------------------
# Compose helpers
# --------------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)")


def interpolation_names(value: str) -> set[str]:
    return {m["name"] or m["bare"] for m in _VAR.finditer(value) if m.group(0) != "$$"}


def interpolate(value: str) -> str:
    """What compose makes of ``value`` when none of the variables it names is set."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m["op"] and m["op"].endswith("-"):
            return m["arg"]
        if m["op"] and m["op"].endswith("?"):
            raise AssertionError(f"{m.group(0)} requires a variable to be set")
        return ""

    return _VAR.sub(sub, value)


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command") or []
    return [interpolate(str(c)) for c in (cmd.split() if isinstance(cmd, str) else cmd)]


def is_ohs_service(svc: dict[str, Any]) -> bool:
    """Runs the project's image (built from the Dockerfile), whose entrypoint is ``ohs``."""
    return "build" in svc


def process(name: str) -> str:
    svc = services()[name]
    assert is_ohs_service(svc), f"{name} does not run the project's image"
    cmd = command(svc)
    assert cmd and cmd[0] in PROCESS_SETTINGS, f"service {name}: unknown ohs process {cmd[:1]}"
    return cmd[0]


def ohs_services() -> dict[str, str]:
    """Service name -> ohs subcommand, for the services of the project's image."""
    return {name: process(name) for name, svc in services().items() if is_ohs_service(svc)}


def service_of(proc: str) -> str:
    names = [name for name, p in ohs_services().items() if p == proc]
    assert len(names) == 1, f"expected one service running `ohs {proc}`, found {names}"
    return names[0]


def one_shots() -> set[str]:
    """Services others wait to complete successfully: they run once and exit."""
    return {
        dep
        for svc in services().values()
        if isinstance(svc.get("depends_on"), dict)
        for dep, spec in svc["depends_on"].items()
        if spec.get("condition") == "service_completed_successfully"
    }


def healthcheck_text(svc: dict[str, Any]) -> str:
    test = (svc.get("healthcheck") or {}).get("test") or []
    return " ".join(test) if isinstance(test, list) else str(test)


def host_port(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    assert parts.hostname and parts.port, f"no host:port in {address!r}"
    return parts.hostname, parts.port


def published_container_ports(svc: dict[str, Any]) -> set[int]:
    ports = set()
    for spec in svc.get("ports") or []:
        assert isinstance(spec, str), f"write ports as quoted strings, got {spec!r}"
        ports.add(int(spec.rsplit(":", 1)[-1].split("/")[0]))
    return ports


# --------------------------------------------------------------------------------------------
# Settings helpers
# --------------------------------------------------------------------------------------------


def settings_class(target: str) -> type[BaseSettings]:
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def env_names(cls: type[BaseSettings]) -> set[str]:
    """The environment variables the class reads, as the configuration reference spells them."""
    return {n.strip() for name, field in cls.model_fields.items() for n in _env_names(cls, name, field).split("/")}


def all_setting_names() -> set[str]:
    targets = set(SETTINGS_CLASSES.values()) | set(PROCESS_SETTINGS.values())
    return set().union(*(env_names(settings_class(t)) for t in targets))


@contextmanager
def only_env(env: dict[str, str]) -> Iterator[None]:
    """os.environ without any OHS_* variable of the test run, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OHS_")}
    with mock.patch.dict(os.environ, {**base, **env}, clear=True):
        yield


def effective(name: str) -> Any:
    """The settings the process of compose service ``name`` runs with."""
    cls = settings_class(PROCESS_SETTINGS[process(name)])
    with only_env(environment(services()[name])):
        return cls()


# --------------------------------------------------------------------------------------------
# Metrics and PromQL helpers
# --------------------------------------------------------------------------------------------

_SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
}


def collectors(module_name: str) -> list[MetricWrapperBase]:
    """The metrics a module defines, at module level or on the holder objects it exports (M, W)."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return []
        raise
    found: dict[int, MetricWrapperBase] = {}
    for attr in dir(module):
        obj = getattr(module, attr)
        if isinstance(obj, MetricWrapperBase):
            found[id(obj)] = obj
        elif not isinstance(obj, type) and hasattr(obj, "__dict__") and not callable(obj):
            found.update({id(v): v for v in vars(obj).values() if isinstance(v, MetricWrapperBase)})
    return list(found.values())


def _series(family_name: str, kind: str, labels: set[str]) -> dict[str, tuple[str, set[str]]]:
    return {
        family_name + suffix: (kind, labels | ({"le"} if suffix == "_bucket" else set()))
        for suffix in _SERIES_SUFFIXES[kind]
    }


@cache
def exported_series() -> dict[str, tuple[str, set[str]]]:
    """Series name -> (metric type, label names), for every metric the processes export."""
    out: dict[str, tuple[str, set[str]]] = {}
    for module_name, _ in METRICS.values():
        for collector in collectors(module_name):
            # Label names are not part of describe()'s output: the wrapper keeps them.
            labels = set(getattr(collector, "_labelnames", ()))
            for family in collector.describe():
                out.update(_series(family.name, family.type, labels))
    return out


@cache
def known_series() -> dict[str, tuple[str, set[str]]]:
    """What rules and dashboards may name: the exported series, plus the contract of the processes
    whose metrics module does not exist yet, plus ``ohs_build_info``."""
    out = dict(exported_series())
    for proc, contract in CONTRACT.items():
        if not collectors(METRICS[proc][0]):
            for name, (kind, labels) in contract.items():
                family = name.removesuffix("_total") if kind == "counter" else name
                out.update(_series(family, kind, labels))
    out.setdefault("ohs_build_info", BUILD_INFO)
    return out


_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_GRAFANA_VAR = re.compile(r"\$\{?\w+(?::\w+)?\}?")
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "atan2", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, aggregations
    (followed by '('), keywords, label names or Grafana variables."""
    e = _GRAFANA_VAR.sub(" ", expr)
    e = _STRING.sub('""', e)
    e = _MATCHERS.sub(" ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = _LABEL_LIST.sub(" ", e)
    return {m[1] for m in _IDENT.finditer(e) if not m[2] and m[1].lower() not in _PROMQL_WORDS}


def promql_label_names(expr: str) -> set[str]:
    e = _STRING.sub('""', _GRAFANA_VAR.sub(" ", expr))
    names = set()
    for group in _MATCHERS.findall(e) + _LABEL_LIST.findall(e):
        names |= {m for m in re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=|,|$)", group.strip())}
    return names


def promql_job_matchers(expr: str) -> set[str]:
    jobs = set()
    for op, value in re.findall(r"\bjob\s*(=~|=)\s*\"([^\"]*)\"", expr):
        jobs |= set(value.split("|")) if op == "=~" else {value}
    return jobs


# --------------------------------------------------------------------------------------------
# Dashboard helpers
# --------------------------------------------------------------------------------------------


@cache
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # panels of a collapsed row
    return out


def targets() -> list[tuple[str, dict[str, Any]]]:
    return [(p["title"], t) for p in panels() for t in p.get("targets", [])]


def prometheus_jobs() -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in load_yaml(PROMETHEUS)["scrape_configs"]}


def datasource_uid() -> str:
    (ds,) = [d for d in load_yaml(DATASOURCES)["datasources"] if d["type"] == "prometheus"]
    return ds["uid"]


def duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", text)
    assert m, f"not a simple duration: {text!r}"
    return int(m[1]) * units[m[2]]


# ============================================================================================
# (a) Dashboard queries name only exported metrics
# ============================================================================================


def test_the_processes_export_the_dashboard_contract():
    series = exported_series()
    assert "ohs_bridge_received_total" in series and "ohs_worker_write_seconds_bucket" in series
    assert series["ohs_worker_lag_messages"] == ("gauge", {"topic", "partition"})


def test_promql_parsing():
    expr = (
        'histogram_quantile(0.99, sum by (le, job) (rate(ohs_worker_write_seconds_bucket{job=~"worker|x"}'
        "[$__rate_interval] offset 5m))) / ignoring(job) group_left sum without (instance) (up) and on() vector(1e3)"
    )
    assert promql_metric_names(expr) == {"ohs_worker_write_seconds_bucket", "up"}
    assert promql_label_names(expr) == {"le", "job", "instance"}
    assert promql_job_matchers(expr) == {"worker", "x"}
    assert promql_metric_names("max(a:b_c) - max(d)") == {"a:b_c", "d"}


def test_the_processes_that_export_metrics_honour_the_contract():
    series = exported_series()
    for proc, contract in CONTRACT.items():
        if not collectors(METRICS[proc][0]):
            continue  # not written yet: known_series() stands in for it
        for name, (kind, labels) in contract.items():
            assert name in series, f"{METRICS[proc][0]} does not export {name} (issue 15's contract)"
            got_kind, got_labels = series[name]
            assert got_kind == kind and labels <= got_labels, f"{name}: {got_kind} {got_labels}, want {kind} {labels}"
    if "ohs_build_info" in series:
        kind, labels = series["ohs_build_info"]
        assert kind == BUILD_INFO[0] and BUILD_INFO[1] <= labels, series["ohs_build_info"]


def test_every_dashboard_query_names_only_metrics_the_code_exports():
    series = known_series()
    assert targets()
    for title, target in targets():
        names = promql_metric_names(target["expr"])
        assert names, f"panel {title!r}: no metric in {target['expr']!r}"
        unknown = names - set(series) - PROMETHEUS_SERIES
        assert not unknown, (
            f"panel {title!r}: {sorted(unknown)} not exported by {sorted(m for m, _ in METRICS.values())}"
        )


def test_every_label_a_dashboard_query_uses_exists_on_its_metrics():
    series = known_series()
    target_labels = {"job", "instance"}  # attached by Prometheus to every scraped series
    for title, target in targets():
        known = set(target_labels)
        for name in promql_metric_names(target["expr"]) & set(series):
            known |= series[name][1]
        unknown = promql_label_names(target["expr"]) - known
        assert not unknown, f"panel {title!r}: labels {sorted(unknown)} exist on none of its metrics"
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        assert legend_labels <= known, f"panel {title!r}: legend uses {sorted(legend_labels - known)}"


def test_dashboard_job_matchers_name_prometheus_jobs():
    for title, target in targets():
        jobs = promql_job_matchers(target["expr"])
        assert jobs <= set(prometheus_jobs()), f"panel {title!r}: no scrape job {sorted(jobs - set(prometheus_jobs()))}"


def test_the_dashboard_covers_every_stage():
    exprs = " ".join(t["expr"] for _, t in targets())
    for name in (
        "ohs_bridge_received_total", "ohs_bridge_produced_total", "ohs_bridge_acked_total",
        "ohs_worker_records_total", "ohs_worker_applied_total", "ohs_worker_lag_messages", "ohs_worker_lag_seconds",
        "ohs_worker_write_seconds_bucket", "ohs_worker_batch_records_bucket", "ohs_bridge_dead_lettered_total",
        "ohs_worker_dead_lettered_total", "ohs_bridge_gaps_total", "ohs_bridge_replayed_total",
        "ohs_bridge_engine_seq", "ohs_bridge_watermark", "ohs_bridge_produce_latency_seconds_bucket",
        "ohs_worker_write_retries_total", "ohs_build_info",
        *(name for contract in CONTRACT.values() for name in contract if name != "ohs_engine_epoch"),
    ):  # fmt: skip
        name = f"{name}_bucket" if known_series().get(f"{name}_bucket") else name
        assert re.search(rf"\b{name}\b", exprs), f"no panel shows {name}"


def test_every_query_can_be_narrowed_to_an_instance():
    (var,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "instance"]
    assert var["type"] == "query" and var["includeAll"] and var["multi"] and var["allValue"] == ".*"
    assert var["datasource"] == {"type": "prometheus", "uid": datasource_uid()}
    m = re.fullmatch(r"label_values\((.+), instance\)", var["query"]["query"])
    assert m and promql_metric_names(m[1]) == {"up"} and promql_job_matchers(m[1]) == set(METRICS), var["query"]
    for title, target in targets():
        e = _STRING.sub('""', target["expr"].replace('"$instance"', "INSTANCE"))
        selectors = re.findall(r"\b(?:ohs_\w+|up)\b(?!\s*\()(\{[^}]*\})?", e)
        assert selectors and all("instance=~INSTANCE" in (m or "") for m in selectors), f"panel {title!r}: {e}"


# ============================================================================================
# (b) The dashboard itself
# ============================================================================================


def test_dashboard_loads_with_a_fixed_uid_and_unique_panel_ids():
    d = dashboard()
    assert d["uid"] == DASHBOARD_UID and len(d["uid"]) <= 40
    assert d.get("id") is None, "a provisioned dashboard must not carry a database id"
    assert d["title"] and 36 <= d["schemaVersion"] <= 41
    ids = [p["id"] for p in panels()]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), f"panel ids {ids}"


def test_every_panel_has_a_target_and_uses_the_provisioned_datasource():
    uid = datasource_uid()
    for panel in panels():
        assert panel.get("targets"), f"panel {panel['title']!r} has no target"
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"panel {panel['title']!r}: refIds {ref_ids}"
        for t in panel["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
            assert t["expr"].strip(), panel["title"]


def test_dashboard_panels_do_not_overlap():
    cells: dict[tuple[int, int], str] = {}
    for p in panels():
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"panel {p['title']!r} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]!r} and {p['title']!r} overlap"
                cells[(x, y)] = p["title"]


def test_grafana_provisioning_matches_compose_mounts():
    grafana = services()["grafana"]
    mounts = {src: dst for src, dst, *_ in (v.split(":") for v in grafana["volumes"]) if src.startswith(".")}
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dash_dir = mounts["./deploy/grafana/dashboards"]
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == dash_dir
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dir}/{DASHBOARD.name}"
    (ds,) = load_yaml(DATASOURCES)["datasources"]
    host, port = host_port(ds["url"])
    assert host in services() and port == 9090 and ds["uid"] == datasource_uid()
    # $__rate_interval is built on the datasource's scrape interval: it must be the pipeline's.
    pipeline_jobs = [
        job
        for job in prometheus_jobs().values()
        if any(host_port(t)[0] in ohs_services() for s in job["static_configs"] for t in s["targets"])
    ]
    intervals = {duration_s(job.get("scrape_interval", "1m")) for job in pipeline_jobs}
    assert intervals == {duration_s(ds["jsonData"]["timeInterval"])}


# ============================================================================================
# (c) docker-compose.yml, Prometheus and the Dockerfile
# ============================================================================================


def test_compose_parses_with_the_expected_services():
    doc = compose()
    assert doc["name"] == "order-history"
    assert {"redpanda", "scylla", "migrate", "engine", "bridge", "worker", "api", "prometheus", "grafana"} <= set(
        doc["services"]
    )
    assert set(ohs_services().values()) == {"db", "engine", "bridge", "worker", "api"}
    assert {name for name, p in ohs_services().items() if p == "db"} == one_shots() == {"migrate"}


def test_every_service_has_a_healthcheck_or_is_a_one_shot():
    for name, svc in services().items():
        if name in one_shots():
            assert svc.get("restart") == "no" and "healthcheck" not in svc, name
            continue
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name}: no health check"
        assert isinstance(hc["test"], list) and hc["test"][0] in ("CMD", "CMD-SHELL"), name
        assert svc.get("restart") == "unless-stopped", f"{name}: restart policy"


def test_images_are_pinned():
    for name, svc in services().items():
        image = svc["image"]
        if is_ohs_service(svc):
            assert svc["build"]["context"] == "." and (ROOT / svc["build"]["dockerfile"]).exists(), name
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag and tag not in ("", "latest"), f"{name}: image {image!r} is not pinned"
        assert re.search(r"\d", tag), f"{name}: tag {tag!r} names no version"


def test_depends_on_targets_exist_and_conditions_fit():
    for name, svc in services().items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: write depends_on with conditions"
        for dep, spec in deps.items():
            assert dep in services() and dep != name, f"{name} depends on unknown service {dep}"
            cond = spec["condition"]
            if cond == "service_healthy":
                assert "healthcheck" in services()[dep], f"{name} waits for {dep} to be healthy: it has no check"
            else:
                assert cond == "service_completed_successfully" and dep in one_shots(), f"{name} -> {dep}: {cond}"


def test_named_volumes_are_declared_and_used_and_bind_mounts_exist():
    declared = set(compose()["volumes"])
    used = set()
    for name, svc in services().items():
        for spec in svc.get("volumes") or []:
            src, dst = spec.split(":")[:2]
            assert dst.startswith("/"), f"{name}: {spec}"
            if src.startswith((".", "/", "~")):
                assert (ROOT / src).exists(), f"{name}: bind mount source {src} does not exist"
            else:
                assert src in declared, f"{name}: volume {src} is not declared"
                used.add(src)
    assert used == declared, f"declared but unused volumes: {sorted(declared - used)}"


def test_every_ohs_variable_is_a_setting_of_the_process_it_is_given_to():
    valid = all_setting_names()
    for name, svc in services().items():
        env = environment(svc)
        raw = json.dumps(svc)
        for var in interpolation_names(raw):
            assert not var.startswith("OHS_") or var in valid, f"{name}: ${{{var}}} is not a setting"
        ohs_vars = {k for k in env if k.startswith("OHS_")}
        assert ohs_vars <= valid, f"{name}: {sorted(ohs_vars - valid)} are not settings (docs/configuration.md)"
        if not is_ohs_service(svc):
            assert not ohs_vars, f"{name} does not run ohs: {sorted(ohs_vars)}"
            continue
        cls = settings_class(PROCESS_SETTINGS[process(name)])
        unread = ohs_vars - env_names(cls)
        assert not unread, f"{name} (ohs {process(name)}): {cls.__name__} does not read {sorted(unread)}"
        effective(name)  # and it accepts the values


def test_no_endpoint_in_compose_is_a_loopback_address():
    # Inside a container, 127.0.0.1 is the container itself, never another service.
    for name, svc in services().items():
        for var, value in environment(svc).items():
            if var.startswith("OHS_"):
                assert not re.search(r"\b(127\.0\.0\.1|localhost)\b", value), f"{name}: {var}={value}"


def test_engine_binds_every_interface_and_the_bridge_connects_to_it():
    engine, bridge = service_of("engine"), service_of("bridge")
    e, b = effective(engine), effective(bridge)
    for endpoint in (e.feed_endpoint, e.replay_endpoint, e.gateway_endpoint):
        assert host_port(endpoint)[0] in ("0.0.0.0", "*"), f"engine binds {endpoint}: unreachable from the bridge"
    assert host_port(b.feed_endpoint) == (engine, host_port(e.feed_endpoint)[1])
    assert host_port(b.replay_endpoint) == (engine, host_port(e.replay_endpoint)[1])
    dep = services()[bridge]["depends_on"]
    assert dep[engine]["condition"] == "service_healthy"


def test_kafka_registry_and_cql_endpoints_are_the_compose_services():
    redpanda = " ".join(command(services()["redpanda"]))
    advertised = re.search(r"--advertise-kafka-addr=(\S+)", redpanda)
    registry = re.search(r"--schema-registry-addr=\S+:(\d+)", redpanda)
    assert advertised and registry
    internal = {addr.split("://", 1)[1] for addr in advertised[1].split(",") if addr.startswith("internal://")}
    kafka_clients = [service_of(p) for p in ("bridge", "worker", "api")]
    for name in kafka_clients:
        s = effective(name)
        assert s.kafka_bootstrap in internal, f"{name}: {s.kafka_bootstrap} is not redpanda's internal listener"
        assert services()[name]["depends_on"]["redpanda"]["condition"] == "service_healthy", name
    for name in (service_of("bridge"), service_of("worker")):
        url = effective(name).schema_registry_url
        assert url and host_port(url) == ("redpanda", int(registry[1])), f"{name}: registry {url}"
    for name in (service_of("db"), service_of("worker"), service_of("api")):
        s = effective(name)
        assert s.hosts == ["scylla"] and s.cql_port == 9042, name
    assert "9042:9042" in services()["scylla"]["ports"]


def test_the_processes_agree_on_topics_partitions_group_and_keyspace():
    b, w, a, m = (effective(service_of(p)) for p in ("bridge", "worker", "api", "db"))
    assert b.topic_updates == w.topic_updates == a.topic_updates
    assert b.topic_dlq == w.topic_dlq
    assert b.partitions == w.partitions, "the worker's tables are co-partitioned with the bridge's topics"
    assert a.worker_group == w.group, "the API streams what the worker group has committed"
    assert a.keyspace == w.keyspace == m.keyspace


def test_the_worker_and_api_start_after_the_migration():
    for proc in ("worker", "api"):
        deps = services()[service_of(proc)]["depends_on"]
        assert deps[service_of("db")]["condition"] == "service_completed_successfully", proc
    assert services()[service_of("db")]["depends_on"]["scylla"]["condition"] == "service_healthy"


def test_state_lives_on_named_volumes():
    def mounted(name: str, path: Path) -> bool:
        svc = services()[name]
        targets = [v.split(":")[1] for v in svc.get("volumes") or [] if not v.startswith((".", "/"))]
        return any(path.is_relative_to(t) for t in targets)

    engine, worker = service_of("engine"), service_of("worker")
    assert mounted(engine, Path(effective(engine).journal_dir)), "the engine journal must survive the container"
    w = effective(worker)
    assert w.store == "rocksdb://" and mounted(worker, Path(w.data_dir)), "RocksDB tables must survive the container"


def test_engine_runs_the_simulator_and_keeps_serving():
    cmd = command(services()[service_of("engine")])
    assert cmd[:2] == ["engine", "simulate"] and "--serve" in cmd
    rate = float(cmd[cmd.index("--rate") + 1])
    assert 0 < rate <= 1000, "a modest rate: the stack runs on a laptop"


def test_http_health_checks_probe_the_ports_the_settings_use():
    for name, proc in ohs_services().items():
        text = healthcheck_text(services()[name])
        s = effective(name)
        if proc in HTTP_HEALTH:
            field, path = HTTP_HEALTH[proc]
            assert f"http://127.0.0.1:{getattr(s, field)}{path}" in text, f"{name}: {text}"
            assert "python" in text and "urllib" in text, name
        elif proc == "engine":
            for endpoint in (s.feed_endpoint, s.replay_endpoint):
                assert str(host_port(endpoint)[1]) in text, f"{name}: health check ignores {endpoint}"


def test_published_ports_are_ports_the_processes_serve_and_the_api_listens_on_all_interfaces():
    for name, proc in ohs_services().items():
        ports = published_container_ports(services()[name])
        if proc in HTTP_HEALTH:
            assert ports <= {getattr(effective(name), HTTP_HEALTH[proc][0])}, name
        else:
            assert not ports, f"{name} publishes {ports}"
    api = effective(service_of("api"))
    assert api.host == "0.0.0.0" and api.port in published_container_ports(services()[service_of("api")])


def test_prometheus_scrapes_the_compose_services_on_their_settings_ports():
    jobs = prometheus_jobs()
    assert len(jobs) == len(load_yaml(PROMETHEUS)["scrape_configs"]), "duplicate job names"
    scraped = set()
    for job_name, job in jobs.items():
        path = job.get("metrics_path", "/metrics")
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = host_port(target)
                assert host in services(), f"job {job_name}: {host} is not a compose service"
                if host in THIRD_PARTY_METRICS:
                    assert (port, path) == THIRD_PARTY_METRICS[host], f"job {job_name}: {target}{path}"
                else:
                    proc = process(host)
                    assert proc in METRICS, f"job {job_name}: ohs {proc} exports no metrics"
                    field = METRICS[proc][1]
                    want = getattr(effective(host), field, None)
                    if want is None:  # the process's settings do not name its metrics port yet
                        want = CONTRACT_PORTS.get(proc)
                    assert port == want, f"job {job_name}: {target}, the process serves /metrics on {want}"
                    assert path == "/metrics", job_name
                scraped.add(host)
    with_metrics = {name for name, proc in ohs_services().items() if proc in METRICS}
    assert with_metrics == {"bridge", "worker", "engine", "api"}
    assert with_metrics <= scraped, f"not scraped: {sorted(with_metrics - scraped)}"
    assert "redpanda" in scraped


def test_dockerfile_installs_the_project_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    instructions = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines() if line.strip()]
    instructions = [i for i in instructions if not i.startswith("#")]
    froms = [i for i in instructions if i.startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage build"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert any(re.search(r"\bpip install \.(\s|$)", i) for i in instructions)
    assert not re.search(r"pip install (-e|--editable)\b", text)
    assert 'ENTRYPOINT ["ohs"]' in instructions
    users = [i.split()[1] for i in instructions if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert not re.search(r"\b(openjdk|default-jre|temurin|java)\b", text, re.I), "no JVM in the image"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {m for m in re.findall(r"^COPY (\S+) ", text, re.M)}
    missing = {p for p in packages if p not in copied and (ROOT / p).is_dir()}
    assert not missing, f"packages not copied into the image: {sorted(missing)}"
    assert {"pyproject.toml", "README.md"} <= copied


def test_dockerignore_keeps_local_state_out_and_the_sources_in():
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()}
    patterns = {p for p in patterns if not p.startswith("#")}
    assert {".venv", ".ohs", ".git"} <= patterns
    assert {".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", "**/__pycache__"} <= patterns
    for copied in re.findall(r"^COPY (\S+) ", DOCKERFILE.read_text(), re.M):
        assert copied not in patterns, f".dockerignore excludes {copied}, which the Dockerfile copies"


# ============================================================================================
# (d) The stack on a real Docker engine
# ============================================================================================


def _docker_unreachable() -> str | None:
    """Why the compose stack cannot run here, or None."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker CLI on PATH"
    try:
        info = subprocess.run(
            [docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker info` failed: {exc}"
    if info.returncode != 0 or not info.stdout.strip():
        return (info.stderr.strip() or info.stdout.strip() or f"`docker info` exited {info.returncode}").splitlines()[0]
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if version.returncode != 0:
        return f"Docker {info.stdout.strip()} is reachable but `docker compose` (v2) is not installed"
    return None


def _bridge_watermark(stack: Any) -> int | None:
    """The watermark the bridge's /health reports, read inside its container (its HTTP server binds
    the container's loopback)."""
    name = service_of("bridge")
    probe = (
        "import json, urllib.request; print(json.load(urllib.request.urlopen("
        f"'http://127.0.0.1:{effective(name).metrics_port}/health', timeout=4))['watermark'])"
    )
    try:
        out, _, _ = stack.exec_in_container(["python", "-c", probe], service_name=name)
    except subprocess.CalledProcessError:
        return None  # not serving yet, or 503
    return int(out.strip()) if out.strip().isdigit() else None


def _logs_tail(stack: Any, *names: str) -> str:
    try:
        out, err = stack.get_logs(*names)
    except subprocess.CalledProcessError as exc:
        return f"(no logs: {exc})"
    return (out + err)[-6000:]


@pytest.mark.compose
@pytest.mark.timeout(1800)
def test_compose_stack_serves_the_api_and_the_bridge_watermark_grows(monkeypatch):
    reason = _docker_unreachable()
    if reason:
        pytest.skip(f"no Docker engine reachable: {reason}")
    from stack.process import port_in_use

    busy = sorted(
        p for svc in services().values() for p in published_container_ports(svc) if port_in_use("127.0.0.1", p)
    )
    if busy:
        pytest.skip(f"host ports {busy} are taken (a local stack or another compose project is running)")
    # Its own project: `down --volumes` at the end must not touch a developer's order-history stack.
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", f"ohs-compose-test-{os.getpid()}")
    from testcontainers.compose import DockerCompose

    api = service_of("api")
    stack = DockerCompose(ROOT, compose_file_name=COMPOSE.name, build=True, wait=True)
    try:
        try:
            stack.start()  # build, then `up --wait`: every service healthy, the migration completed
        except subprocess.CalledProcessError as exc:
            stderr = (exc.stderr or b"").decode(errors="replace")[-3000:]
            pytest.fail(f"`docker compose up` exited {exc.returncode}:\n{stderr}\n{_logs_tail(stack)}")

        host, port = stack.get_service_host_and_port(api, effective(api).port)
        with urllib.request.urlopen(f"http://{host or '127.0.0.1'}:{port}/health", timeout=10) as resp:
            status, health = resp.status, json.load(resp)
        assert status == 200 and health["status"] == "ok", health

        seen: list[int] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            mark = _bridge_watermark(stack)
            if mark is not None and (not seen or mark != seen[-1]):
                seen.append(mark)
            if len(seen) >= 2 and seen[-1] > seen[0]:
                break
            time.sleep(2)
        else:
            pytest.fail(
                f"the bridge watermark did not grow within 180 s: {seen}\n"
                f"{_logs_tail(stack, service_of('engine'), service_of('bridge'))}"
            )
    finally:
        stack.stop()
