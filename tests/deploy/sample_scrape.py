"""Hand-made /metrics of the three servers mid-run, written with the real client library.

A stand-in for live servers: the metric names, types and labels the brief lists, with values chosen
so that some alerts must fire (LLM near its budget, an OOM, a fallback, a full queue, video not
SERVING, an upstream down) and others must not (no non-finite outputs, video without a budget).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

GiB = 2**30


def _common(registry: CollectorRegistry, service: str, serving: int, depth: int) -> None:
    requests = Counter("scriptreel_rpc_requests", "", ["service", "method", "code"], registry=registry)
    requests.labels(service, "Generate", "OK").inc(5)
    requests.labels(service, "Generate", "RESOURCE_EXHAUSTED").inc()
    Histogram("scriptreel_rpc_duration_seconds", "", ["service", "method"], registry=registry).labels(
        service, "Generate"
    ).observe(0.3)
    Gauge("scriptreel_queue_depth", "", ["service"], registry=registry).labels(service).set(depth)
    Gauge("scriptreel_queue_capacity", "", ["service"], registry=registry).labels(service).set(16)
    Gauge("scriptreel_server_serving", "", ["service"], registry=registry).labels(service).set(serving)


def _model(
    registry: CollectorRegistry, model: str, precision: str, budget: int, reserved: int
) -> dict[str, Counter]:
    """Register a model server's memory and plan metrics; return its counters by short name."""

    def gauge(name: str, value: float, labels: dict[str, str] | None = None) -> None:
        labels = labels or {"device": "cuda:0"}
        Gauge(name, "", list(labels), registry=registry).labels(**labels).set(value)

    gauge("scriptreel_gpu_memory_allocated_bytes", reserved - GiB // 4)
    gauge("scriptreel_gpu_memory_reserved_bytes", reserved)
    gauge("scriptreel_gpu_memory_peak_bytes", reserved)
    gauge("scriptreel_gpu_memory_total_bytes", 16376 * 2**20)
    gauge("scriptreel_gpu_memory_used_bytes", 15 * GiB)
    gauge("scriptreel_gpu_memory_budget_bytes", budget)
    gauge("scriptreel_gpu_memory_low", 0)
    gauge("scriptreel_predicted_peak_bytes", reserved)
    gauge("scriptreel_load_peak_bytes", reserved - GiB // 2)
    gauge("scriptreel_model_weights_bytes", 3 * GiB, {"model": model, "precision": precision})
    gauge("scriptreel_model_parameters", 1.5e9, {"model": model})
    plan = {
        "model": model,
        "device": "cuda:0",
        "precision": precision,
        "compute_dtype": "float16",
        "keep_fp32": "",
        "offload": "none",
        "requested": "auto",
        "fallbacks": "",
    }
    gauge("scriptreel_model_info", 1, plan)
    Histogram("scriptreel_request_peak_memory_bytes", "", ["device"], registry=registry).labels(
        "cuda:0"
    ).observe(reserved)
    counters = {
        name: Counter(f"scriptreel_{name}", "", ["device"], registry=registry)
        for name in ("cuda_oom", "nonfinite_outputs", "admission_rejected", "gpu_cache_releases")
    }
    for counter in counters.values():
        counter.labels("cuda:0")  # exported at 0, as a server should do at start
    counters["precision_fallbacks"] = Counter(
        "scriptreel_precision_fallbacks", "", ["from_precision", "to_precision"], registry=registry
    )
    return counters


def sample_scrapes() -> dict[str, str]:
    """Exposition text by Prometheus job name."""
    llm, video, gateway = CollectorRegistry(), CollectorRegistry(), CollectorRegistry()

    _common(llm, "scriptreel.llm.v1.LlmService", serving=1, depth=16)
    llm_counters = _model(llm, "tiny-llm", "fp16", budget=7 * GiB, reserved=int(6.8 * GiB))
    for name, value in (("prompt_tokens", 120), ("generated_tokens", 480)):
        Counter(f"scriptreel_llm_{name}", "", registry=llm).inc(value)
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds"):
        Histogram(f"scriptreel_llm_{name}", "", registry=llm).observe(0.05)
    for name, value in (
        ("batch_size", 4),
        ("queue_depth", 2),
        ("kv_cache_bytes", GiB),
        ("decode_step_seconds", 0.0037),
    ):
        Gauge(f"scriptreel_llm_{name}", "", registry=llm).set(value)
    llm_counters["cuda_oom"].labels("cuda:0").inc()
    llm_counters["precision_fallbacks"].labels("fp16", "bf16").inc()

    _common(video, "scriptreel.video.v1.VideoService", serving=0, depth=0)
    _model(video, "tiny-svd", "bf16", budget=0, reserved=8 * GiB)
    Counter("scriptreel_video_steps", "", registry=video).inc(25)
    Counter("scriptreel_video_frames", "", registry=video).inc(14)
    Histogram("scriptreel_video_denoise_step_seconds", "", registry=video).observe(0.8)
    Histogram("scriptreel_video_generation_seconds", "", registry=video).observe(21.0)

    _common(gateway, "scriptreel.gateway.v1.GatewayService", serving=1, depth=1)
    Histogram("scriptreel_gateway_stage_seconds", "", ["stage"], registry=gateway).labels("script").observe(2)
    upstream = Gauge("scriptreel_gateway_upstream_up", "", ["server"], registry=gateway)
    upstream.labels("llm").set(1)
    upstream.labels("video").set(0)

    return {
        "scriptreel-llm": generate_latest(llm).decode(),
        "scriptreel-video": generate_latest(video).decode(),
        "scriptreel-gateway": generate_latest(gateway).decode(),
    }
