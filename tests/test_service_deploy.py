"""The monitoring files against a live service: every metric name that a dashboard query, an alert or
the HPA's custom metric uses exists in a real `/metrics` scrape, with the label names and label values
the queries select; and the runbook's table of label values is what the code emits.

One `onerec serve` (tests/plugins/servers.py) answers a few HTTP and gRPC requests, then is scraped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.plugins.servers import ServiceLauncher, grpc_stub

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "onerec-serving.json"
# Series that Prometheus makes itself, not the service.
PROMETHEUS_SERIES = {"up"}
# Labels that Prometheus (scrape config, service discovery) adds; the service does not emit them.
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS |= {"inf", "nan"}

# ---- PromQL: the metric names, selectors and grouping labels of an expression ----------------------


def metric_names(expr: str) -> set[str]:
    """Metric names of a PromQL expression (not functions, keywords, labels or template variables)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        if match.group(2) is None and match.group(1).lower() not in KEYWORDS:
            names.add(match.group(1))
    return names


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, op, value)]) of every `metric{...}` selector."""
    out = []
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
        matchers = re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', match.group(2))
        out.append((match.group(1), matchers))
    return out


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
        for label in group.split(",")
        if label.strip()
    }


def test_promql_helpers() -> None:
    """The helpers find what they should, so the live checks below cannot pass by finding nothing."""
    expr = (
        'histogram_quantile(0.99, sum by (le, api) (rate(foo_seconds_bucket{job="$job", a=~"x|y"}[$__rate_interval])))'
        ' / clamp_min(sum(rate(bar_total[5m])), 1e-9) * 2^30 + absent(up{job="onerec"}) and on (instance) baz'
    )
    assert metric_names(expr) == {"foo_seconds_bucket", "bar_total", "up", "baz"}
    assert selectors(expr)[0] == ("foo_seconds_bucket", [("job", "=", "$job"), ("a", "=~", "x|y")])
    assert grouping_labels(expr) == {"le", "api"}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", var["definition"]))
    return exprs


def alert_exprs() -> list[str]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r["expr"] for group in doc["groups"] for r in group["rules"]]


def adapter_exprs() -> list[str]:
    doc = yaml.safe_load((DEPLOY / "prometheus-adapter" / "config.yaml").read_text())
    return [r["seriesQuery"] for r in doc["rules"]]


# ---- the live service --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(service_launcher: ServiceLauncher, demo_store: Path) -> Any:
    handle = service_launcher.start(demo_store, env={"ONEREC_MAX_BATCH_SIZE": "4"})
    yield handle
    service_launcher.stop(handle)


@pytest.fixture(scope="module")
def exposition(live: Any) -> str:
    """/metrics after an HTTP and a gRPC recommend, an event, and a request refused as invalid."""
    from onerec_proto import pb2

    with httpx.Client(base_url=live.http_url, timeout=30) as http:
        ok = http.post("/v1/recommend", json={"user_id": "deploy-1", "history": ["1", "2"], "num_items": 3})
        assert ok.status_code == 200, ok.text
        assert http.post("/v1/events", json={"user_id": "deploy-1", "items": ["3"]}).status_code < 300
        assert http.post("/v1/recommend", json={"user_id": "deploy-2", "num_items": -1}).status_code == 422
        channel, stub = grpc_stub(live.grpc_target)
        try:
            stub.Recommend(pb2.RecommendRequest(user_id="deploy-3", history=["4"], num_items=3), timeout=30)
        finally:
            channel.close()
        return http.get("/metrics").text


@pytest.fixture(scope="module")
def scraped(exposition: str) -> dict[str, list[dict[str, str]]]:
    """sample name -> label sets of its samples."""
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


def _values(scraped: dict[str, list[dict[str, str]]], metric: str, label: str) -> set[str]:
    return {labels[label] for labels in scraped.get(metric, []) if label in labels}


def _not_served(scraped: dict[str, list[dict[str, str]]], exprs: list[str]) -> list[str]:
    names = {n for e in exprs for n in metric_names(e)}
    return sorted(n for n in names - PROMETHEUS_SERIES if n not in scraped)


@pytest.mark.parametrize(
    "source,exprs,at_least",
    [("dashboard", dashboard_exprs, 15), ("alerts", alert_exprs, 10), ("prometheus-adapter", adapter_exprs, 1)],
)
def test_every_queried_metric_exists_in_a_live_scrape(
    scraped: dict[str, list[dict[str, str]]], source: str, exprs: Any, at_least: int
) -> None:
    queries = exprs()
    names = {n for e in queries for n in metric_names(e)} - PROMETHEUS_SERIES
    assert len(names) >= at_least, f"{source}: suspiciously few metric names: {names}"
    missing = _not_served(scraped, queries)
    assert not missing, f"{source} queries metrics that /metrics does not serve: {missing}"


def test_the_live_check_catches_a_metric_the_service_does_not_serve(
    scraped: dict[str, list[dict[str, str]]],
) -> None:
    """Negative control: a misspelt name in a query is reported."""
    assert _not_served(scraped, ['sum(rate(onerec_request_total{job="$job"}[5m]))']) == ["onerec_request_total"]
    assert _not_served(scraped, ['sum(rate(onerec_requests_total{job="$job"}[5m]))']) == []


@pytest.mark.parametrize("source,exprs", [("dashboard", dashboard_exprs), ("alerts", alert_exprs)])
def test_selected_labels_and_values_exist(scraped: dict[str, list[dict[str, str]]], source: str, exprs: Any) -> None:
    from service.errors import outcome_for_status

    outcomes = {outcome_for_status(status) for status in range(100, 600)} | {"cancelled"}
    for expr in exprs():
        present = {n for n in metric_names(expr) if n in scraped}
        labels_here = {label for n in present for labels in scraped[n] for label in labels}
        for label in grouping_labels(expr) - TARGET_LABELS:
            assert label in labels_here, f"{source}: groups by `{label}`, which no series of {expr!r} has"
        for metric, matchers in selectors(expr):
            if metric in PROMETHEUS_SERIES:
                continue
            for label, op, value in matchers:
                if label in TARGET_LABELS or "$" in value:
                    continue
                emitted = _values(scraped, metric, label)
                assert emitted, f"{source}: {metric} has no label `{label}` in the scrape"
                if op in ("=", "=~") and re.fullmatch(r"[\w/|.-]+", value):
                    known = outcomes if label == "outcome" else emitted
                    unknown = set(value.split("|")) - known
                    assert not unknown, f"{source}: {metric}{{{label}{op}{value!r}}}: never emitted: {unknown}"


def test_endpoints_of_both_front_ends_are_labelled_as_the_queries_expect(
    scraped: dict[str, list[dict[str, str]]],
) -> None:
    endpoints = _values(scraped, "onerec_requests_total", "endpoint")
    apis = _values(scraped, "onerec_requests_total", "api")
    assert {"/v1/recommend", "Recommend"} <= endpoints and {"http", "grpc"} <= apis


def _runbook_table() -> dict[tuple[str, str], set[str]]:
    """Rows `| metric | label | values |` of the runbook's label-value table."""
    rows = {}
    for line in (DEPLOY / "runbook.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`onerec_") and cells[1].startswith("`"):
            values = set(re.findall(r"`([^`]+)`", cells[2]))
            rows[(cells[0].strip("`"), cells[1].strip("`"))] = values
    return rows


def test_runbook_label_values_are_the_ones_the_code_emits(scraped: dict[str, list[dict[str, str]]]) -> None:
    from service.errors import outcome_for_status

    table = _runbook_table()
    assert len(table) >= 6, "the runbook lists the label values of the main counters"
    # label sets that the service creates at start: the documented values are exactly these
    complete = {
        ("onerec_guarantee_violations_total", "kind"),
        ("onerec_model_reloads_total", "result"),
        ("onerec_feature_store_errors_total", "kind"),
        ("onerec_capture_records_total", "result"),
        ("onerec_degraded_responses_total", "reason"),
    }
    assert complete <= set(table), complete - set(table)
    for (metric, label), documented in table.items():
        emitted = _values(scraped, metric, label)
        assert emitted, f"runbook documents {metric}{{{label}}}, which the scrape does not have"
        assert emitted <= documented, f"{metric}{{{label}}}: emitted but undocumented: {emitted - documented}"
        if (metric, label) in complete:
            assert documented == emitted, f"{metric}{{{label}}}: documented {documented}, emitted {emitted}"
    outcomes = {outcome_for_status(status) for status in range(100, 600)} | {"cancelled"}
    assert table[("onerec_requests_total", "outcome")] == outcomes
