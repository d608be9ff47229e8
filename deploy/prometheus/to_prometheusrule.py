"""Print rules.yml as a PrometheusRule (for the Prometheus operator), keeping its text and comments.

rules.yml is the one source of the alerts; prometheusrule.yaml is this script's output, and a test
(tests/deploy/test_deploy_prometheus.py) fails when the two differ. Usage, from the repository root:

    .venv/bin/python deploy/prometheus/to_prometheusrule.py > deploy/prometheus/prometheusrule.yaml
"""

from __future__ import annotations

import textwrap
from pathlib import Path

RULES_FILE = Path(__file__).with_name("rules.yml")

HEADER = """\
# Generated from rules.yml by to_prometheusrule.py: edit rules.yml, then regenerate.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: scriptreel
  labels:
    # kube-prometheus-stack selects rules by its Helm release name; change it to yours.
    release: kube-prometheus-stack
spec:
"""


def prometheus_rule(rules_text: str) -> str:
    """Return the PrometheusRule manifest whose spec is the rules file, minus its leading comments."""
    lines = rules_text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return HEADER + textwrap.indent("".join(lines), "  ")


if __name__ == "__main__":
    print(prometheus_rule(RULES_FILE.read_text()), end="")
