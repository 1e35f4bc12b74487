"""Prometheus: the alert rules pass `promtool check rules`, their unit tests pass `promtool test rules`,
every alert has a test that fires it and one that keeps it quiet, and each kind of test can fail.
Also the compose Prometheus and Alertmanager configurations, the runbook links and the exported metrics.
"""

from __future__ import annotations

import re
import runpy
import shutil
from pathlib import Path
from typing import Any

import yaml

from service.metrics import FAMILIES
from tests.test_deploy_tools import ROOT, require_tool, run_tool

PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "alerts.yml"
UNIT_TESTS = PROM / "alerts_test.yml"
RUNBOOK = ROOT / "deploy" / "runbook.md"
METRIC = re.compile(r"\bonerec_[a-z_]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")
RUNBOOK_URL = re.compile(r"^\{\{ \$externalLabels\.runbook_base \}\}#([a-z0-9-]+)$")


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for group in doc["groups"] for r in group["rules"] if "alert" in r]


def alert_names() -> set[str]:
    return {r["alert"] for r in alert_rules()}


def _family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in FAMILIES:
            return name[: -len(suffix)]
    return name


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    result = run_tool([promtool, "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    promtool = require_tool("promtool")
    result = run_tool([promtool, "test", "rules", UNIT_TESTS.name], cwd=PROM)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_test() -> None:
    doc = yaml.safe_load(UNIT_TESTS.read_text())
    assert doc["rule_files"] == [RULES.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in doc["tests"]:
        assert group.get("external_labels", {}).get("runbook_base"), "tests render runbook_url like production"
        for case in group.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
            for alert in case.get("exp_alerts") or []:
                assert alert.get("exp_annotations", {}).get("runbook_url", "").startswith("https://")
    names = alert_names()
    assert names - firing == set(), "alerts without a test that fires them"
    assert names - quiet == set(), "alerts without a test that keeps them quiet"
    assert (firing | quiet) <= names, "tests of alerts that do not exist"


def _failed_alertnames(output: str) -> set[str]:
    return set(re.findall(r"alertname: (\w+), time:", output))


def _run_with_rules(tmp_path: Path, rules: dict[str, Any]) -> str:
    promtool = require_tool("promtool")
    (tmp_path / RULES.name).write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    result = run_tool([promtool, "test", "rules", UNIT_TESTS.name], cwd=tmp_path)
    assert result.returncode != 0, "the unit tests passed against broken rules"
    return result.stdout + result.stderr


def test_every_firing_test_fails_when_its_alert_never_fires(tmp_path: Path) -> None:
    """Mutation: each alert's expression can never be true; every firing test must then fail."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["expr"] = "vector(0) > 1"
    assert _failed_alertnames(_run_with_rules(tmp_path, doc)) == alert_names()


def test_every_quiet_test_fails_when_its_alert_always_fires(tmp_path: Path) -> None:
    """Mutation: each alert is always true at once; every quiet test must then fail."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["expr"] = "vector(1)"
            rule.pop("for", None)
    assert _failed_alertnames(_run_with_rules(tmp_path, doc)) == alert_names()


def test_required_alerts_exist() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    exprs = {name: " ".join(r["expr"].split()) for name, r in rules.items()}
    assert any('absent(up{job="onerec"})' in e for e in exprs.values())
    assert any('onerec_model_reloads_total{job="onerec", result="error"}' in e for e in exprs.values())
    shed = [e for e in exprs.values() if 'outcome="overloaded"' in e]
    assert shed and all(" / " in e for e in shed), "shedding is alerted as a share of requests"
    assert any(e.startswith('changes(onerec_ready{job="onerec"}') for e in exprs.values()), "readiness flapping"
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("page", "ticket"), name
        assert 'job="onerec"' in rule["expr"], f"{name}: select the onerec job"


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_runbook_urls_point_at_a_section_of_the_runbook() -> None:
    text = re.sub(r"^```.*?^```", "", RUNBOOK.read_text(), flags=re.M | re.S)  # no headings in code blocks
    anchors = {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        match = RUNBOOK_URL.match(url)
        assert match, f"{rule['alert']}: runbook_url must be {{{{ $externalLabels.runbook_base }}}}#section"
        assert match.group(1) in anchors, f"{rule['alert']}: no runbook section #{match.group(1)}"
        assert match.group(1) == rule["alert"].lower(), "one runbook section per alert, named after it"


def test_alert_rules_use_only_exported_metrics() -> None:
    names = {m for r in alert_rules() for m in METRIC.findall(r["expr"])}
    assert names and {n for n in names if _family(n) not in FAMILIES} == set()


def test_compose_prometheus_config(tmp_path: Path) -> None:
    """promtool check config on the compose configuration, with the rule file next to it."""
    promtool = require_tool("promtool")
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert config["global"]["external_labels"]["runbook_base"].startswith("https://")
    assert [j["job_name"] for j in config["scrape_configs"]][0] == "onerec"
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    config["rule_files"] = ["alerts.yml"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(RULES, tmp_path / "alerts.yml")
    result = run_tool([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_config_routes_every_severity() -> None:
    amtool = require_tool("amtool")
    path = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
    result = run_tool([amtool, "check-config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(path.read_text())
    receivers = {r["name"] for r in config["receivers"]}
    routed = {m for route in config["route"]["routes"] for m in route["matchers"]}
    for severity in {r["labels"]["severity"] for r in alert_rules()}:
        assert f'severity="{severity}"' in routed, severity
    assert {route["receiver"] for route in config["route"]["routes"]} <= receivers


def test_prometheus_rule_for_the_operator_is_current() -> None:
    script = ROOT / "deploy" / "k8s" / "monitoring" / "gen_prometheusrule.py"
    module = runpy.run_path(str(script))
    current = (script.parent / "prometheusrule.yaml").read_text()
    assert current == module["render"](), "regenerate: python deploy/k8s/monitoring/gen_prometheusrule.py"
