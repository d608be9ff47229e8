"""The Grafana dashboard: valid JSON that Grafana lays out, on the data-source variable, covering
every metric the servers export (queries themselves are checked in test_deploy_prometheus.py)."""

from __future__ import annotations

import json

from metric_names import DASHBOARD_FILE, dashboard_exprs, metric_names_in

# Every family the servers export (the brief's list): each must appear on some panel.
EXPORTED_FAMILIES = [
    "scriptreel_gpu_memory_allocated_bytes",
    "scriptreel_gpu_memory_reserved_bytes",
    "scriptreel_gpu_memory_peak_bytes",
    "scriptreel_gpu_memory_total_bytes",
    "scriptreel_gpu_memory_used_bytes",
    "scriptreel_gpu_memory_budget_bytes",
    "scriptreel_gpu_memory_low",
    "scriptreel_model_weights_bytes",
    "scriptreel_model_parameters",
    "scriptreel_model_info",
    "scriptreel_predicted_peak_bytes",
    "scriptreel_load_peak_bytes",
    "scriptreel_request_peak_memory_bytes",
    "scriptreel_cuda_oom",
    "scriptreel_nonfinite_outputs",
    "scriptreel_precision_fallbacks",
    "scriptreel_admission_rejected",
    "scriptreel_gpu_cache_releases",
    "scriptreel_rpc_requests",
    "scriptreel_rpc_duration_seconds",
    "scriptreel_queue_depth",
    "scriptreel_queue_capacity",
    "scriptreel_server_serving",
    "scriptreel_llm_prompt_tokens",
    "scriptreel_llm_generated_tokens",
    "scriptreel_llm_time_to_first_token_seconds",
    "scriptreel_llm_time_per_output_token_seconds",
    "scriptreel_llm_batch_size",
    "scriptreel_llm_queue_depth",
    "scriptreel_llm_kv_cache_bytes",
    "scriptreel_llm_decode_step_seconds",
    "scriptreel_video_denoise_step_seconds",
    "scriptreel_video_steps",
    "scriptreel_video_frames",
    "scriptreel_video_generation_seconds",
    "scriptreel_gateway_stage_seconds",
    "scriptreel_gateway_upstream_up",
]


def all_panels(dashboard: dict) -> list[dict]:
    return [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]


def test_dashboard_is_laid_out_on_a_24_column_grid_with_unique_ids() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]


def test_every_query_uses_the_data_source_variable() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_every_exported_metric_is_on_a_panel() -> None:
    used = set().union(*map(metric_names_in, dashboard_exprs(json.loads(DASHBOARD_FILE.read_text()))))
    suffixes = ("", "_total", "_bucket")
    missing = [f for f in EXPORTED_FAMILIES if not any(f + s in used for s in suffixes)]
    assert not missing, missing
