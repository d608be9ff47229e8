"""Alert rules and dashboard queries, checked by promtool and evaluated by a real Prometheus server."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from deploy_commands import DEPLOY, run, tool
from metric_names import (
    DASHBOARD_FILE,
    RULES_FILE,
    assert_all_exported,
    dashboard_exprs,
    metric_names_in,
    used_metric_names,
)
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_server import PrometheusApi, free_port, running_prometheus
from sample_scrape import sample_scrapes


def grafana_to_promql(expr: str) -> str:
    """Replace the dashboard's Grafana variables with what they expand to."""
    return expr.replace("$__rate_interval", "1m").replace('=~"$job"', '=~".+"')


def test_promtool_accepts_the_rules() -> None:
    result = run(tool("promtool"), "check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_local_config() -> None:
    result = run(tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus-local.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_local_config_scrapes_the_default_metrics_ports_under_the_kubernetes_job_names() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-local.yml").read_text())
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert jobs == {
        "scriptreel-gateway": ["127.0.0.1:9101"],
        "scriptreel-llm": ["127.0.0.1:9102"],
        "scriptreel-video": ["127.0.0.1:9103"],
    }


def test_prometheusrule_is_generated_from_the_rules_file() -> None:
    result = run(sys.executable, str(DEPLOY / "prometheus" / "to_prometheusrule.py"))
    assert result.returncode == 0, result.stderr
    assert (DEPLOY / "prometheus" / "prometheusrule.yaml").read_text() == result.stdout, (
        "prometheusrule.yaml is stale: .venv/bin/python deploy/prometheus/to_prometheusrule.py"
        " > deploy/prometheus/prometheusrule.yaml"
    )


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    exprs = dashboard_exprs(json.loads(DASHBOARD_FILE.read_text()))
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(e)} for i, e in enumerate(exprs)]
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(tool("promtool"), "check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (job, le) (rate(a_bucket{job=~"x|y"}[$__rate_interval]))', {"a_bucket"}),
        ("b / on (device) group_left (model) (c > 0) > 0.9", {"b", "c"}),
        ("increase(d_total[10m]) > 0 or (d_total > 0 unless d_total offset 10m)", {"d_total"}),
        ('up{job=~"scriptreel-.*"} == 0', {"up"}),
        ("histogram_quantile(0.95, sum without (pod) (rate(e_bucket[5m]))) * 1e3", {"e_bucket"}),
        ('label_replace(f, "dst", "$1", "src", "(.*)")', {"f"}),
    ],
)
def test_metric_names_in(expr: str, names: set[str]) -> None:
    assert metric_names_in(expr) == names


def test_assert_all_exported_knows_the_suffixes_of_each_metric_type() -> None:
    scrape = (
        "# TYPE a_total counter\n"  # a labelled counter with no child yet: no sample
        "# TYPE h histogram\n"
        "# TYPE g gauge\ng 1\n"
    )
    assert_all_exported({"a_total", "h_bucket", "h_count", "g", "up"}, [scrape])
    with pytest.raises(AssertionError, match="g_total, missing"):
        assert_all_exported({"g", "missing", "g_total"}, [scrape])


def test_rules_and_dashboard_use_only_metrics_in_the_sample_scrape() -> None:
    assert_all_exported(used_metric_names(), sample_scrapes().values())


class _FixedText(Collector):
    """Serves a fixed exposition text through prometheus_client's HTTP server."""

    def __init__(self, text: str) -> None:
        self.families = list(text_string_to_metric_families(text))

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


@pytest.fixture
def sample_targets() -> Iterator[dict[str, list[str]]]:
    """The sample scrapes served on loopback, by job, plus a job whose target is down."""
    servers, targets = [], {}
    for job, text in sample_scrapes().items():
        registry = CollectorRegistry()
        registry.register(_FixedText(text))
        server, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
        servers.append(server)
        targets[job] = [f"127.0.0.1:{server.server_port}"]
    targets["scriptreel-down"] = [f"127.0.0.1:{free_port()}"]
    yield targets
    for server in servers:
        server.shutdown()
        server.server_close()


EXPECTED_ALERTS = {
    "ScriptreelVramNearBudget": ("pending", {"job": "scriptreel-llm"}),
    "ScriptreelGpuMemoryLow": ("inactive", {}),
    "ScriptreelCudaOutOfMemory": ("firing", {"job": "scriptreel-llm", "device": "cuda:0"}),
    "ScriptreelPrecisionFallback": ("firing", {"from_precision": "fp16", "to_precision": "bf16"}),
    "ScriptreelNonFiniteOutputs": ("inactive", {}),
    "ScriptreelQueueSaturated": ("pending", {"job": "scriptreel-llm"}),
    "ScriptreelNotServing": ("pending", {"job": "scriptreel-video"}),
    "ScriptreelUpstreamDown": ("pending", {"server": "video"}),
    "ScriptreelTargetDown": ("pending", {"job": "scriptreel-down"}),
}


def test_real_prometheus_fires_the_right_alerts_and_answers_every_dashboard_query(
    sample_targets: dict[str, list[str]], tmp_path: Path
) -> None:
    with running_prometheus(sample_targets, tmp_path) as prom:
        prom.wait_for(lambda: len(prom.query("up")) == 4, what="the first scrapes")
        # increase()/rate() need two samples: let a few scrapes and evaluations pass.
        expected = {name: state for name, (state, _) in EXPECTED_ALERTS.items()}
        with contextlib.suppress(AssertionError):
            prom.wait_for(lambda: _states(prom) == expected, what="alert states")
        assert _states(prom) == expected
        rules = {rule["name"]: rule for rule in prom.rules()}
        assert set(rules) == set(EXPECTED_ALERTS)
        for name, (state, labels) in EXPECTED_ALERTS.items():
            assert rules[name]["health"] == "ok", (name, rules[name].get("lastError"))
            alerts = rules[name]["alerts"]
            assert len(alerts) == (0 if state == "inactive" else 1), (name, alerts)
            for alert in alerts:
                assert labels.items() <= alert["labels"].items(), (name, alert["labels"])

        exprs = dashboard_exprs(json.loads(DASHBOARD_FILE.read_text()))

        def without_data() -> list[str]:
            return [expr for expr in exprs if not prom.query(grafana_to_promql(expr))]

        with contextlib.suppress(AssertionError):
            prom.wait_for(lambda: not without_data(), what="data for every dashboard query")
        assert not without_data(), "dashboard queries with no data from the sample servers"


def _states(prom: PrometheusApi) -> dict[str, str]:
    """Each alert's state, once its rule has been evaluated (never evaluated: 0001-01-01)."""
    return {
        rule["name"]: rule["state"] for rule in prom.rules() if not rule["lastEvaluation"].startswith("0001")
    }
