"""docker-compose.yml and the Grafana files it provisions.

The compose file validates against the compose specification (check-jsonschema's vendored schema),
every image is pinned, the services start in the right order, and Grafana gets its datasource and
the dashboard from deploy/grafana/. The dashboard has the variables and panels operators need, with
units; tests/test_service_deploy.py checks its queries against a live scrape.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.test_deploy_tools import ROOT, require_tool, run_tool

COMPOSE = ROOT / "docker-compose.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "onerec-serving.json"
SHUTDOWN_MARGIN_S = 10.0


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, Any]:
    return compose()["services"]


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "m" else 1)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (or volume name)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        out[target] = source
    return out


def test_compose_file_matches_the_compose_specification() -> None:
    checker = require_tool("check-jsonschema")
    result = run_tool([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_can_fail(tmp_path: Path) -> None:
    """Negative control: a misspelt key is rejected by the same call."""
    checker = require_tool("check-jsonschema")
    broken = compose()
    broken["services"]["redis"]["heathcheck"] = broken["services"]["redis"].pop("healthcheck")
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = run_tool([checker, "--builtin-schema", "vendor.compose-spec", str(path)])
    assert result.returncode != 0


def test_every_image_is_pinned() -> None:
    for name, service in services().items():
        image = service["image"]
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: image {image} is not pinned"


def test_the_stack_has_every_service_and_starts_in_order() -> None:
    svc = services()
    assert {"redis", "model-init", "onerec", "prometheus", "alertmanager", "grafana"} <= set(svc)
    depends = svc["onerec"]["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["model-init"]["condition"] == "service_completed_successfully"
    assert svc["redis"]["healthcheck"]["test"]
    init = svc["model-init"]
    script = " ".join(init["command"])
    assert "onerec build" in script and "ls -A /models" in script, "model-init builds only into an empty store"
    assert _mounts(init)["/models"] == _mounts(svc["onerec"])["/models"] == "models"
    assert any(v.endswith(":ro") for v in svc["onerec"]["volumes"]), "the server only reads the store"
    assert svc["onerec"]["environment"]["ONEREC_REDIS_URL"].startswith("redis://redis:")
    for name in ("onerec", "model-init"):
        assert svc[name]["read_only"] is True and svc[name]["cap_drop"] == ["ALL"], name
    for name, service in svc.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"


def test_stop_grace_period_covers_the_drain() -> None:
    onerec = services()["onerec"]
    drain = float(onerec["environment"]["ONEREC_DRAIN_TIMEOUT_S"])
    assert _seconds(onerec["stop_grace_period"]) >= drain + SHUTDOWN_MARGIN_S


def test_prometheus_alertmanager_and_grafana_are_wired() -> None:
    svc = services()
    prom = _mounts(svc["prometheus"])
    assert prom["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert prom["/etc/prometheus/alerts.yml"] == "./deploy/prometheus/alerts.yml"
    am = _mounts(svc["alertmanager"])
    assert am["/etc/alertmanager/alertmanager.yml"] == "./deploy/alertmanager/alertmanager.yml"
    for source in {**prom, **am}.values():
        if source.startswith("./"):
            assert (ROOT / source).is_file(), source
    graf = _mounts(svc["grafana"])
    assert graf["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "onerec.yml").read_text())
    dash_path = provider["providers"][0]["options"]["path"]
    assert (ROOT / graf[dash_path] / DASHBOARD.name).is_file()
    home = svc["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_path}/{DASHBOARD.name}"


def test_grafana_datasource_is_the_dashboards_datasource() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    prometheus = next(d for d in doc["datasources"] if d["type"] == "prometheus")
    assert prometheus["url"] == "http://prometheus:9090"
    dash = json.loads(DASHBOARD.read_text())
    variable = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == prometheus["uid"]
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"


def test_dashboard_variables_panels_and_units() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"job", "namespace", "instance"} <= set(variables)
    for name in ("namespace", "instance"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*", name
    exprs = {t["expr"]: panel for panel in dash["panels"] for t in panel["targets"]}
    for expr in exprs:
        if "onerec_" in expr or expr.startswith("up{"):
            for var in ("job", "namespace", "instance"):
                assert f"${var}" in expr, f"query ignores ${var}: {expr}"

    def panel_with(pattern: str) -> dict[str, Any]:
        found = [p for e, p in exprs.items() if re.search(pattern, e)]
        assert found, pattern
        return found[0]

    assert panel_with(r"^up\{")["fieldConfig"]["defaults"]["unit"] == "none"
    assert panel_with(r"^onerec_ready\{")["fieldConfig"]["defaults"]["unit"] == "none"
    assert panel_with(r'outcome="overloaded".*/ sum')["fieldConfig"]["defaults"]["unit"] == "percentunit"
    for by in ("endpoint", "api"):
        for q in ("0.5", "0.99"):
            panel = panel_with(rf"histogram_quantile\({q}, sum by \(le, {by}\) \(rate\(onerec_request_duration")
            assert panel["fieldConfig"]["defaults"]["unit"] == "s", (by, q)
    units = {"reqps", "s", "percentunit", "none", "short", "ops", "bytes"}
    for panel in dash["panels"]:
        assert panel["fieldConfig"]["defaults"]["unit"] in units, panel["title"]
        for override in panel["fieldConfig"]["overrides"]:
            assert override["properties"][0]["value"] in units
        if any("_seconds" in t["expr"] and "histogram_quantile" in t["expr"] for t in panel["targets"]):
            refs = [t["refId"] for t in panel["targets"] if "histogram_quantile" in t["expr"]]
            overridden = {o["matcher"]["options"] for o in panel["fieldConfig"]["overrides"]}
            assert panel["fieldConfig"]["defaults"]["unit"] == "s" and not set(refs) & overridden, panel["title"]
