"""Deployment files stay consistent with the code: metric names, settings names, probes, ports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from service.metrics import FAMILIES
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\bonerec_[a-z_]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def _family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in FAMILIES:
            return name[: -len(suffix)]
    return name


def _unknown_metrics(exprs: list[str]) -> set[str]:
    names = {m for e in exprs for m in METRIC.findall(e)}
    return {n for n in names if _family(n) not in FAMILIES}


def test_alert_rules_use_only_exported_metrics() -> None:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    rules = [r for group in doc["groups"] for r in group["rules"]]
    assert len(rules) >= 8
    assert not _unknown_metrics([r["expr"] for r in rules])
    runbook = (DEPLOY / "runbook.md").read_text().lower()
    for rule in rules:
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert f"## {anchor.replace('-', ' ')}" in runbook.replace("/", " ").replace("(", "").replace(")", ""), anchor


def test_dashboard_uses_only_exported_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana" / "onerec-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 14
    assert not _unknown_metrics(exprs)


def test_k8s_settings_and_probes_match_the_service() -> None:
    config = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())
    for key in config["data"]:
        assert key.startswith("ONEREC_") and key[7:].lower() in Settings.model_fields, key
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    drain = float(config["data"]["ONEREC_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > drain + 5  # preStop sleep + drain fit in the grace period
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(config["data"]["ONEREC_HTTP_PORT"]), "grpc": int(config["data"]["ONEREC_GRPC_PORT"])}


def test_promtool_accepts_the_rules_when_installed() -> None:
    """promtool (Debian package `prometheus`) is optional here; the YAML checks above always run."""
    promtool = shutil.which("promtool")
    rules = DEPLOY / "prometheus" / "alerts.yml"
    doc = yaml.safe_load(rules.read_text())
    assert all("alert" in r and "expr" in r for g in doc["groups"] for r in g["rules"])
    if promtool is None:
        return
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=rules.parent, capture_output=True, text=True, timeout=60
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
