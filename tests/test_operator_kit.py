"""The operator kit, statically: dashboards, alert rules (promtool), Prometheus config, compose.

The documentation's metric reference (docs/reference/metrics.md) is the catalogue: it must list
exactly what the package exports (its
``SPECS``), and every metric name used by a dashboard or a rule must be in it, because a dashboard
querying a name nobody exports shows "No data" forever. Nothing here reads outside the repository.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
ALERTS = DASHBOARDS / "alerts"
RULES = ALERTS / "poolwatch.rules.yml"
RULE_TESTS = ALERTS / "poolwatch.rules.test.yml"
README = ROOT / "docs" / "reference" / "metrics.md"  # the metric reference
REFERENCE_HEADING = "# Metrics"
MKDOCS = ROOT / "mkdocs.yml"
RUNBOOKS = ROOT / "docs" / "runbooks"
COMPOSE = ROOT / "docker-compose.yml"
DATASOURCE_REF = "${datasource}"

EXPECTED_ALERTS = {
    "PoolWatchPoolSaturated",
    "PoolWatchCallersWaiting",
    "PoolWatchCheckoutTimeouts",
    "PoolWatchConnectionLeak",
    "PoolWatchGCReclaimedConnections",
    "PoolWatchPrePingFailureBurst",
    "PoolWatchSlowQueries",
    "PoolWatchThreadpoolStarvation",
    "PoolWatchFleetCapacityExceedsServer",
    "PoolWatchIdleInTransaction",
}

# What the issue asks each dashboard to show, as the metrics that must be queried for it.
REQUIRED_METRICS = {
    "poolwatch-pool-overview": {
        "poolwatch_connections",
        "poolwatch_connections_max",
        "poolwatch_pending_requests",
        "poolwatch_wait_seconds_bucket",
        "poolwatch_timeouts_total",
        "poolwatch_connections_overflow",
        "poolwatch_connects_total",
        "poolwatch_disconnects_total",
        "poolwatch_pre_ping_failures_total",
        "poolwatch_invalidations_total",
        "poolwatch_checkouts_queued_total",
        "poolwatch_waits_cancelled_total",
    },
    "poolwatch-routes-queries": {
        "poolwatch_use_seconds_bucket",
        "poolwatch_request_queries_bucket",
        "poolwatch_query_seconds_bucket",
        "poolwatch_query_errors_total",
        "poolwatch_query_seconds_count",
        "poolwatch_leaks_total",
        "poolwatch_gc_reclaimed_total",
        "poolwatch_oldest_checkout_age_seconds",
        "poolwatch_idle_in_transaction_seconds_bucket",
        "poolwatch_held_after_response_seconds_bucket",
    },
    # Issue 16: which cause is behind an exhausted pool.
    "poolwatch-causes": {
        "poolwatch_threadpool_threads",
        "poolwatch_threadpool_capacity",
        "poolwatch_pending_requests",
        "poolwatch_checkins_total",
        "poolwatch_connections_max",
        "poolwatch_server_connections_max",
        "poolwatch_pool_info",
        "poolwatch_held_idle_seconds_bucket",
        "poolwatch_timeouts_total",
        "poolwatch_connect_errors_total",
    },
}

# Catalogue metrics without a pool label: their panels filter by job and instance only.
POOL_LESS = {
    "poolwatch_request_queries_bucket",
    "poolwatch_request_queries_sum",
    "poolwatch_request_queries_count",
    "poolwatch_internal_errors_total",
    "poolwatch_threadpool_threads",
    "poolwatch_threadpool_capacity",
}

METRIC_NAME = re.compile(r"\bpoolwatch_[a-z0-9_]+\b")


# ---------------------------------------------------------------- helpers (also used by the e2e test)


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load_dashboards() -> dict[Path, dict[str, Any]]:
    return {path: json.loads(path.read_text()) for path in dashboard_files()}


def iter_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr) for every target of every dashboard panel."""
    found = []
    for dashboard in load_dashboards().values():
        for panel in iter_panels(dashboard):
            for target in panel.get("targets", []):
                found.append((dashboard["uid"], panel["title"], target["expr"]))
    return found


def variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, variable name, query) for every query variable."""
    found = []
    for dashboard in load_dashboards().values():
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                query = variable["query"]
                found.append(
                    (dashboard["uid"], variable["name"], query["query"] if isinstance(query, dict) else query)
                )
    return found


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


@dataclass(frozen=True)
class CatalogueRow:
    kind: str  # gauge, counter or histogram
    labels: tuple[str, ...]


def catalogue_rows() -> dict[str, CatalogueRow]:
    """README's metric reference: metric name -> type and label names, parsed from its table."""
    text = README.read_text()
    assert REFERENCE_HEADING in text, f"{README} has no {REFERENCE_HEADING!r} section"
    section = text.split(REFERENCE_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`poolwatch_[a-z0-9_]+`", cells[0]):
            # Labels read like "pool, state=`used`/`idle`" or "—" for none.
            labels = tuple(
                label.split("=", 1)[0].strip() for label in cells[2].split(",") if label.strip() != "—"
            )
            rows[cells[0].strip("`")] = CatalogueRow(kind=cells[1].split()[0], labels=labels)
    return rows


def catalogue() -> dict[str, str]:
    """README's metric reference: metric name -> type."""
    return {name: row.kind for name, row in catalogue_rows().items()}


def exported_names(metrics: dict[str, str]) -> set[str]:
    """The sample names Prometheus stores for the catalogue (histograms: _bucket, _sum, _count)."""
    names = set()
    for name, kind in metrics.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: the operator kit is verified with Prometheus' own tools. "
            "Install Debian's `prometheus` package (scripts/setup.sh does) and run again."
        )
    return path


# ---------------------------------------------------------------- the catalogue


def test_catalogue_parses_the_whole_table() -> None:
    metrics = catalogue_rows()
    assert len(metrics) >= 20, f"parsed too few rows from README's metric reference: {sorted(metrics)}"
    assert metrics["poolwatch_connections"] == CatalogueRow("gauge", ("pool", "state"))
    assert metrics["poolwatch_wait_seconds"].kind == "histogram"
    assert metrics["poolwatch_timeouts_total"].kind == "counter"
    assert metrics["poolwatch_internal_errors_total"].labels == ()


def test_readme_metric_reference_lists_exactly_what_the_package_exports() -> None:
    """Documented is exported and exported is documented, with the same type and labels."""
    from poolwatch._serve.collector import SPECS

    documented = catalogue_rows()
    exported = {name: CatalogueRow(spec.kind, spec.labels) for name, spec in SPECS.items()}
    undocumented = sorted(set(exported) - set(documented))
    assert not undocumented, f"exported but missing from README's metric reference: {undocumented}"
    unexported = sorted(set(documented) - set(exported))
    assert not unexported, f"in README's metric reference but not exported: {unexported}"
    differ = {
        name: {"README": documented[name], "SPECS": exported[name]}
        for name in exported
        if documented[name] != exported[name]
    }
    assert not differ, f"README's metric reference disagrees with SPECS: {differ}"


def test_every_metric_used_by_dashboards_and_rules_is_in_the_catalogue() -> None:
    allowed = exported_names(catalogue())
    used: dict[str, set[str]] = {}
    for uid, title, expr in panel_queries():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(f"{uid} / {title}")
    for uid, variable, query in variable_queries():
        for name in metric_names(query):
            used.setdefault(name, set()).add(f"{uid} / ${variable}")
    for rule in load_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    assert used, "no poolwatch metric found in dashboards or rules"
    unknown = {name: sorted(where) for name, where in used.items() if name not in allowed}
    assert not unknown, f"metric names not in README's metric reference: {unknown}"


# ---------------------------------------------------------------- dashboards


def test_dashboards_are_valid_json_with_unique_uids() -> None:
    files = dashboard_files()
    assert len(files) >= 2, f"expected the pool overview and routes dashboards in {DASHBOARDS}"
    uids = []
    for path in files:
        try:
            dashboard = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            pytest.fail(f"{path.name} is not valid JSON: {error}")
        assert isinstance(dashboard.get("uid"), str) and dashboard["uid"], f"{path.name}: no uid"
        assert len(dashboard["uid"]) <= 40, f"{path.name}: Grafana uids are at most 40 characters"
        assert dashboard.get("title"), f"{path.name}: no title"
        assert "id" not in dashboard or dashboard["id"] is None, f"{path.name}: provisioned ids clash"
        uids.append(dashboard["uid"])
    assert len(uids) == len(set(uids)), f"duplicate dashboard uids: {uids}"
    assert set(REQUIRED_METRICS) <= set(uids)


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_dashboard_variables(path: Path) -> None:
    variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
    assert {"datasource", "job", "instance", "pool"} <= set(variables), sorted(variables)
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    for name in ("job", "instance", "pool"):
        variable = variables[name]
        assert variable["type"] == "query", name
        assert variable["datasource"]["uid"] == DATASOURCE_REF, name
        # The plain-string form (as grafonnet writes it) that every Grafana version reads.
        query = variable["query"]
        assert isinstance(query, str), name
        assert query.startswith("label_values(") and query.endswith(f", {name})"), query
        assert variable["definition"] == query, name
    # Each variable narrows by the ones before it, so the pool list matches the chosen job.
    assert "$job" in variables["instance"]["query"]
    assert "$instance" in variables["pool"]["query"]


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_every_panel_has_a_target_on_the_datasource_variable(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    panels = iter_panels(dashboard)
    assert panels, f"{path.name} has no panels"
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
    for panel in panels:
        where = f"{path.name} / {panel.get('title')!r}"
        assert panel.get("title"), f"{where}: no title"
        assert panel.get("description"), f"{where}: no description (what does it answer?)"
        assert panel.get("datasource", {}).get("uid") == DATASOURCE_REF, f"{where}: datasource"
        targets = panel.get("targets") or []
        assert targets, f"{where}: no target"
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"{where}: duplicate refIds"
        for target in targets:
            assert target.get("datasource", {}).get("uid") == DATASOURCE_REF, f"{where}: target"
            expr = target.get("expr", "")
            assert metric_names(expr), f"{where}: target queries no poolwatch metric: {expr!r}"
            # Every query follows the job/instance selectors, and the pool one when it has a pool.
            assert 'job=~"$job"' in expr and 'instance=~"$instance"' in expr, f"{where}: {expr}"
            if metric_names(expr) - POOL_LESS:
                assert 'pool=~"$pool"' in expr, f"{where}: not filtered by $pool: {expr}"
            assert "[$__rate_interval]" in expr or "rate(" not in expr, f"{where}: {expr}"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"{where}: gridPos {grid}"


@pytest.mark.parametrize("uid", sorted(REQUIRED_METRICS))
def test_dashboards_cover_what_the_issue_asks(uid: str) -> None:
    used = set().union(*(metric_names(e) for u, _, e in panel_queries() if u == uid))
    missing = REQUIRED_METRICS[uid] - used
    assert not missing, f"{uid} does not show {sorted(missing)}"


def test_grafana_provisioning() -> None:
    datasources = yaml.safe_load((DASHBOARDS / "provisioning/datasources/prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus" and prometheus["access"] == "proxy"
    assert prometheus["url"] == "http://prometheus:9090"  # the compose service
    providers = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/poolwatch.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


# ---------------------------------------------------------------- alert rules


def site_url() -> str:
    """The documentation site's address (mkdocs.yml), which runbook_url annotations start with."""
    match = re.search(r"^site_url:\s*(\S+)\s*$", MKDOCS.read_text(), re.MULTILINE)
    assert match and match[1].endswith("/"), "mkdocs.yml has no site_url ending in /"
    return match[1]


def test_every_runbook_page_belongs_to_an_alert() -> None:
    pages = {path.stem for path in RUNBOOKS.glob("*.md")} - {"index"}
    assert pages == EXPECTED_ALERTS, sorted(pages ^ EXPECTED_ALERTS)


def test_rules_have_annotations_and_a_runbook_anchor() -> None:
    rules = load_rules()
    names = [rule["alert"] for rule in rules]
    assert set(names) == EXPECTED_ALERTS, sorted(names)
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in rules:
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), rule["alert"]
        page = f"docs/runbooks/{rule['alert']}.md"
        assert annotations.get("runbook") == page, rule["alert"]
        assert (ROOT / page).is_file(), f"{rule['alert']}: no runbook page {page}"
        assert annotations.get("runbook_url") == f"{site_url()}runbooks/{rule['alert']}/", rule["alert"]
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, rule["alert"]


def test_rule_tests_cover_every_alert_firing_and_not_firing() -> None:
    document = yaml.safe_load(RULE_TESTS.read_text())
    firing: set[str] = set()
    silent: set[str] = set()
    for group in document["tests"]:
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    assert firing == EXPECTED_ALERTS, f"never tested firing: {sorted(EXPECTED_ALERTS - firing)}"
    assert silent == EXPECTED_ALERTS, f"never tested silent: {sorted(EXPECTED_ALERTS - silent)}"


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(EXPECTED_ALERTS)} rules found" in result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=ALERTS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_check_prometheus_config(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    config = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    # In the stack the rules are mounted at /etc/prometheus/rules; here, point at the file itself.
    assert config["rule_files"] == ["/etc/prometheus/rules/poolwatch.rules.yml"]
    config["rule_files"] = [str(RULES)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(local)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- the demo stack


def _compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict) and isinstance(document.get("services"), dict)
    return document


def _bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to the repository) of a service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith((".", "/")):
            mounts[target] = source
    return mounts


def test_compose_services_and_build() -> None:
    services = _compose()["services"]
    assert {"postgres", "demo", "load", "prometheus", "grafana"} <= set(services)
    for name in ("demo", "load"):
        build = services[name]["build"]
        assert (ROOT / build["context"]).resolve() == ROOT, f"{name}: build context"
        assert (ROOT / build["context"] / build["dockerfile"]).is_file(), f"{name}: Dockerfile"
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    demo = services["demo"]
    assert "@postgres:5432/" in demo["environment"]["DATABASE_URL"]
    assert str(demo["environment"]["DEMO_MISBEHAVE"]).lower() == "true"
    command = services["load"]["command"]
    assert command[:3] == ["python", "-m", "demo_app.load"]
    assert "http://demo:8000" in command and "--allow-remote" in command


def test_compose_volumes_point_at_existing_files() -> None:
    services = _compose()["services"]
    named = set(_compose().get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: named volume {source} is not declared"


def test_compose_wires_prometheus_and_grafana_to_the_kit() -> None:
    services = _compose()["services"]
    prometheus = _bind_mounts(services["prometheus"])
    assert prometheus["/etc/prometheus/prometheus.yml"] == "./dashboards/prometheus.yml"
    config = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert (ROOT / prometheus[rule_file]).resolve() == RULES, rule_file
    (scrape,) = config["scrape_configs"]
    (target,) = scrape["static_configs"][0]["targets"]
    assert target == "demo:8000" and "8000:8000" in services["demo"]["ports"]

    grafana = _bind_mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning/datasources"] == "./dashboards/provisioning/datasources"
    assert grafana["/etc/grafana/provisioning/dashboards"] == "./dashboards/provisioning/dashboards"
    providers = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/poolwatch.yml").read_text())
    folder = providers["providers"][0]["options"]["path"]
    mounted = {
        (ROOT / source).resolve() for target, source in grafana.items() if target.startswith(folder + "/")
    }
    assert mounted == {path.resolve() for path in dashboard_files()}, "not every dashboard mounted"


def test_dockerfile_builds_the_demo_from_source() -> None:
    text = (ROOT / "demo_app" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1[1-9]", text, re.MULTILINE)
    for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE):
        *sources, _destination = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    assert '"--host", "0.0.0.0"' in text  # reachable from Prometheus in another container
    assert "demo_app.main:app" in text


# ---------------------------------------------------------------- load generator arguments


def test_load_generator_refuses_remote_hosts_unless_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    from demo_app.load import is_loopback_url, parse_args

    for url in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"):
        assert is_loopback_url(url), url
    for url in ("http://10.0.0.5:8000", "https://example.com", "http://demo:8000"):
        assert not is_loopback_url(url), url
        with pytest.raises(SystemExit):
            parse_args(["--url", url])
        assert "not a loopback host" in capsys.readouterr().err
        assert parse_args(["--url", url, "--allow-remote"]).url == url
    for bad in (["--duration", "0"], ["--duration", "100000"], ["--concurrency", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


# ---------------------------------------------------------------- misbehaving endpoints, bounded


def test_misbehaving_endpoints_are_bounded_and_explain_sqlite(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    with warnings.catch_warnings():  # starlette's own nudge towards httpx2, not ours to act on
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    from demo_app.main import create_app
    from demo_app.settings import DemoSettings

    # By their environment names (aliases), which mypy does not see.
    settings = DemoSettings(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}", DEMO_MISBEHAVE=True)  # type: ignore[call-arg]
    with TestClient(create_app(settings, CollectorRegistry())) as client:
        for i in range(3):
            client.post("/users", json={"email": f"u{i}@example.com", "name": "u"})
        n_plus_one = client.get("/misbehave/n-plus-one", params={"users": 3})
        assert n_plus_one.status_code == 200 and n_plus_one.json()["queries"] == 4
        # Every duration and count has a ceiling: nothing here can hang the demo.
        for path, params in [
            ("/misbehave/slow-query", {"seconds": 11}),
            ("/misbehave/hold", {"seconds": 31}),
            ("/misbehave/n-plus-one", {"users": 51}),
        ]:
            assert client.get(path, params=params).status_code == 422, path
        assert client.post("/misbehave/leak", params={"seconds": 121}).status_code == 422
        # SQLite: pg_sleep is the demo's stand-in; no backend to terminate, so no such endpoint.
        slow = client.get("/misbehave/slow-query", params={"seconds": 0.1})
        assert slow.status_code == 200 and slow.json()["slept_seconds"] == 0.1
        assert client.get("/misbehave/dead-connection").status_code == 404
        # The failure is the endpoint's point: reported, not a server error.
        error = client.get("/misbehave/query-error")
        assert error.status_code == 200 and error.json()["error"] == "OperationalError"
        assert client.get("/misbehave/hold", params={"seconds": 0}).status_code == 200
