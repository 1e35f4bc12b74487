"""Write prometheusrule.yaml from deploy/prometheus/alerts.yml (the one source of the alert rules).

    python deploy/k8s/monitoring/gen_prometheusrule.py           # rewrite the file
    python deploy/k8s/monitoring/gen_prometheusrule.py --check   # exit 1 when it is out of date

tests/test_deploy_prometheus.py runs the check, so an edit of alerts.yml without a regeneration fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parent.parent / "prometheus" / "alerts.yml"
OUT = HERE / "prometheusrule.yaml"
HEADER = """\
# Generated from deploy/prometheus/alerts.yml by gen_prometheusrule.py: edit alerts.yml, then run
#   python deploy/k8s/monitoring/gen_prometheusrule.py
# For clusters with the Prometheus operator. The operator's Prometheus must select this object
# (its ruleSelector; kube-prometheus-stack selects `release: <its release name>` by default: add that
# label in kustomization.yaml) and set externalLabels.runbook_base (see alerts.yml).
"""


def render() -> str:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "onerec", "labels": {"app.kubernetes.io/name": "onerec"}},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.safe_dump(rule, sort_keys=False, width=1000, allow_unicode=True)


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is out of date: run python deploy/k8s/monitoring/gen_prometheusrule.py")
            return 1
        print(f"{OUT.name} is current")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
