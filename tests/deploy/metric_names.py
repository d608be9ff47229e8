"""Metric names in PromQL, and whether live servers export them (so dashboards cannot drift from code).

`metric_names_in` reads the names a PromQL expression selects; `used_metric_names` collects them
from the alert rules and the dashboard; `assert_all_exported` checks them against /metrics scrapes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES_FILE = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD_FILE = DEPLOY / "grafana" / "scriptreel-dashboard.json"

# Series that Prometheus makes itself at each scrape: no server exports them.
MADE_BY_PROMETHEUS = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
    }
)
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
    }
)
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_BRACES = re.compile(r"\{[^}]*\}|\[[^\]]*\]")
# An identifier not glued to a number, a unit or a $variable, and not followed by "(" (a function).
_NAME = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
# Sample names each metric type exposes, as suffixes of its family name.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "info": ("_info",),
}


def metric_names_in(expr: str) -> set[str]:
    """Return the metric names a PromQL expression selects, e.g. {"up"} for 'sum by (job) (up == 0)'."""
    text = _STRINGS.sub('""', expr)
    text = _LABEL_LISTS.sub(" ", text)
    text = _BRACES.sub(" ", text)
    return {name for name in _NAME.findall(text) if name not in _KEYWORDS}


def rule_exprs(rules_text: str) -> list[str]:
    """Every `expr` of a Prometheus rules file."""
    return [rule["expr"] for group in yaml.safe_load(rules_text)["groups"] for rule in group["rules"]]


def dashboard_exprs(dashboard: Mapping) -> list[str]:
    """Every query of a Grafana dashboard's panels (rows included) and template variables."""
    exprs = []
    panels = list(dashboard.get("panels", []))
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        exprs.extend(target["expr"] for target in panel.get("targets", []) if target.get("expr"))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query or "")
        if match:
            exprs.append(match.group(1))
    return exprs


def used_metric_names() -> set[str]:
    """The metric names that deploy/prometheus/rules.yml and the Grafana dashboard query."""
    exprs = rule_exprs(RULES_FILE.read_text()) + dashboard_exprs(json.loads(DASHBOARD_FILE.read_text()))
    return set().union(*(metric_names_in(expr) for expr in exprs))


def exported_names(scrape_text: str) -> set[str]:
    """Every sample name a /metrics text can carry, including families that have no sample yet."""
    names = set()
    for family in text_string_to_metric_families(scrape_text):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def assert_all_exported(names: Iterable[str], scrape_texts: Iterable[str]) -> None:
    """Fail, listing them, if some metric names are in none of the scrapes (Prometheus's own excepted)."""
    exported = set().union(*(exported_names(text) for text in scrape_texts))
    missing = sorted(set(names) - exported - MADE_BY_PROMETHEUS)
    assert not missing, f"used in deploy/ but exported by no server: {', '.join(missing)}"
