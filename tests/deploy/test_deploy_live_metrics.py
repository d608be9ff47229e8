"""Against live servers: every metric the deploy assets use is exported, and a real Prometheus
scrapes the three servers and answers for weights, memory and requests after a CreateVideo.

The servers come from the `live_metrics_targets` fixture (conftest.py beside this file).
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

from metric_names import assert_all_exported, used_metric_names
from prometheus_server import running_prometheus

JOBS = {"scriptreel-gateway", "scriptreel-llm", "scriptreel-video"}


def test_every_metric_the_dashboard_and_alerts_use_is_exported(live_metrics_targets: dict[str, str]) -> None:
    scrapes = []
    for address in live_metrics_targets.values():
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            scrapes.append(response.read().decode())
    assert_all_exported(used_metric_names(), scrapes)


def test_prometheus_scrapes_the_stack(live_metrics_targets: dict[str, str], tmp_path: Path) -> None:
    with running_prometheus(
        {job: [address] for job, address in live_metrics_targets.items()}, tmp_path
    ) as prom:
        prom.wait_for(
            lambda: {s["metric"]["job"] for s in prom.query("up == 1")} == JOBS, what="three servers up"
        )
        for job in ("scriptreel-llm", "scriptreel-video"):
            weights = prom.query(f'scriptreel_model_weights_bytes{{job="{job}"}} > 0')
            assert weights and weights[0]["metric"]["precision"], job
            assert prom.query(f'scriptreel_gpu_memory_allocated_bytes{{job="{job}"}}'), job
            assert prom.query(f'scriptreel_model_info{{job="{job}"}} == 1'), job
        created = prom.query('sum(scriptreel_rpc_requests_total{method="CreateVideo", code="OK"})')
        assert created and float(created[0]["value"][1]) >= 1
        assert all(rule["health"] == "ok" for rule in prom.rules())
