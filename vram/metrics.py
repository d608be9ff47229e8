"""The Prometheus metrics of the model servers' memory and precision (DESIGN.md section 4).

Defined once here; the monitor and the engines update them. Live device figures are read at scrape
time by `DeviceMemoryCollector`, so a scrape never shows stale allocator numbers.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_MEM_BUCKETS = tuple(2.0**i for i in range(20, 38))  # 1 MiB .. 128 GiB

MODEL_WEIGHTS_BYTES = Gauge(
    "scriptreel_model_weights_bytes",
    "Bytes of the loaded model's parameters and buffers, as stored.",
    ["model", "precision"],
)
MODEL_PARAMETERS = Gauge("scriptreel_model_parameters", "Parameters of the loaded model.", ["model"])
MODEL_INFO = Gauge(
    "scriptreel_model_info",
    "The resolved precision plan, as labels (value 1).",
    ["model", "device", "precision", "compute_dtype", "keep_fp32", "offload", "requested", "fallbacks"],
)
PREDICTED_PEAK_BYTES = Gauge(
    "scriptreel_predicted_peak_bytes", "Peak memory the plan predicted before loading.", ["device"]
)
LOAD_PEAK_BYTES = Gauge(
    "scriptreel_load_peak_bytes",
    "Peak allocated bytes measured during load and warm-up (0 on CPU).",
    ["device"],
)
REQUEST_PEAK_BYTES = Histogram(
    "scriptreel_request_peak_memory_bytes",
    "Peak allocated device bytes during each request.",
    ["device"],
    buckets=_MEM_BUCKETS,
)
CUDA_OOM_TOTAL = Counter("scriptreel_cuda_oom_total", "CUDA out-of-memory errors caught.", ["device"])
NONFINITE_TOTAL = Counter(
    "scriptreel_nonfinite_outputs_total", "Requests failed by NaN/Inf logits or latents.", ["device"]
)
FALLBACKS_TOTAL = Counter(
    "scriptreel_precision_fallbacks_total",
    "Precision fallbacks at load or warm-up.",
    ["from_precision", "to_precision"],
)
ADMISSION_REJECTED_TOTAL = Counter(
    "scriptreel_admission_rejected_total",
    "Requests refused before starting because their predicted peak did not fit.",
    ["device"],
)
CACHE_RELEASES_TOTAL = Counter(
    "scriptreel_gpu_cache_releases_total", "Times the monitor released the allocator's cache.", ["device"]
)
LOW_MEMORY = Gauge(
    "scriptreel_gpu_memory_low", "1 when free device memory is under the configured minimum.", ["device"]
)
