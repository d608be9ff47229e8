"""Prometheus metrics of the LLM engine: tokens, latency per token, batch and queue (DESIGN.md 4).

Memory and precision metrics live in `vram.metrics`; request counts per RPC belong to the servicer.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

PROMPT_TOKENS_TOTAL = Counter("scriptreel_llm_prompt_tokens_total", "Prompt tokens prefilled.")
GENERATED_TOKENS_TOTAL = Counter("scriptreel_llm_generated_tokens_total", "Tokens generated.")
TIME_TO_FIRST_TOKEN = Histogram(
    "scriptreel_llm_time_to_first_token_seconds",
    "Seconds from a request's submission (queueing included) to its first generated token.",
    buckets=_LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "scriptreel_llm_time_per_output_token_seconds",
    "Mean seconds between a request's generated tokens after the first (one sample per request).",
    buckets=_TOKEN_BUCKETS,
)
BATCH_SIZE = Gauge("scriptreel_llm_batch_size", "Sequences in the running decode batch.")
QUEUE_DEPTH = Gauge("scriptreel_llm_queue_depth", "Requests waiting to join the batch.")
KV_CACHE_BYTES = Gauge(
    "scriptreel_llm_kv_cache_bytes",
    "Bytes of the KV cache: the decode slots (allocated at start) plus the prompts being prefilled.",
)
DECODE_STEP_SECONDS = Gauge(
    "scriptreel_llm_decode_step_seconds",
    "Seconds one decoding step of one sequence takes on the device alone (its CUDA graph replayed back "
    "to back at start); 0 without CUDA graphs. The same compiled step varies by process (issue 4).",
)
